//! Fuzzing of what greater reads from files a user gives it or a run leaves behind: model
//! files, task files and their data, a run's checkpoint and step log, chat templates.
//! Mutated copies of valid inputs (bytes flipped, cut, deleted or repeated; numbers and
//! syntax from a dictionary spliced in) must give a value or an error, never a panic, an
//! abort or a hang.
//!
//! CI tries a few hundred inputs per target. The long run,
//!
//! ```text
//! GREATER_FUZZ_CASES=20000 cargo test --release --test fuzz -- --nocapture --test-threads 1
//! ```
//!
//! prints per target the inputs tried and how many were accepted or refused. A panic fails
//! the target and prints the smallest input proptest finds; an abort ends the process (a
//! crash); an input still running after a minute ends it with its target named (a hang).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use greater::model::generate::{generate, Request};
use greater::optimize::run::{run, Changes, Start};
use greater::runtime::{LanguageModel, OpenOptions};
use greater::settings::OptimizeConfig;
use greater::tasks::{Count, Task, TaskOptions};
use greater::tokenizer::{BudgetedAlloc, ChatTemplate, SystemTurn};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestRunner};

#[global_allocator]
static ALLOC: BudgetedAlloc = BudgetedAlloc;

/// Inputs per target: `GREATER_FUZZ_CASES`, or a short run.
fn cases(short: u32) -> u32 {
    std::env::var("GREATER_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(short)
}

/// One change to an input.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Insert(Index, &'static [u8]),
    Delete(Index, usize),
    Cut(Index),
    /// Repeat `len` bytes from the index `times` times.
    Repeat(Index, usize, usize),
    /// Overwrite 4 or 8 bytes with a little-endian number (counts, lengths, types in GGUF).
    Number(Index, u64, bool),
}

const NUMBERS: &[u64] = &[0, 1, 2, 7, 255, 256, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX];

fn edits(dictionary: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<Index>(), select(dictionary)).prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<Index>(), 1..32usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<Index>().prop_map(Edit::Cut),
        (any::<Index>(), 1..64usize, 1..8usize).prop_map(|(i, n, t)| Edit::Repeat(i, n, t)),
        (any::<Index>(), select(NUMBERS), any::<bool>())
            .prop_map(|(i, v, w)| Edit::Number(i, v, w)),
    ];
    proptest::collection::vec(edit, 1..4)
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |i: &Index, b: &Vec<u8>| if b.is_empty() { 0 } else { i.index(b.len()) };
        match e {
            Edit::Flip(i, x) if !b.is_empty() => {
                let k = at(i, &b);
                b[k] ^= x | 1;
            }
            Edit::Insert(i, s) => {
                let k = at(i, &b);
                b.splice(k..k, s.iter().copied());
            }
            Edit::Delete(i, n) => {
                let k = at(i, &b);
                b.drain(k..(k + n).min(b.len()));
            }
            Edit::Cut(i) => b.truncate(at(i, &b)),
            Edit::Repeat(i, n, times) => {
                let k = at(i, &b);
                let piece = b[k..(k + n).min(b.len())].to_vec();
                for _ in 0..*times {
                    b.splice(k..k, piece.iter().copied());
                }
            }
            Edit::Number(i, v, wide) => {
                let bytes = v.to_le_bytes();
                let width = if *wide { 8 } else { 4 };
                let k = at(i, &b);
                for (j, &x) in bytes[..width].iter().enumerate() {
                    if let Some(slot) = b.get_mut(k + j) {
                        *slot = x;
                    }
                }
            }
            Edit::Flip(..) => {}
        }
    }
    b
}

/// What a target's inputs came to.
#[derive(Default)]
struct Tally {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl Tally {
    fn count<T>(&self, outcome: &anyhow::Result<T>) {
        let n = if outcome.is_ok() { &self.accepted } else { &self.refused };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// The input under way and when it started, watched by a thread that ends the process when
/// one runs for longer than a minute.
static UNDER_WAY: Mutex<Option<(Instant, &'static str)>> = Mutex::new(None);

fn watched<T>(target: &'static str, f: impl FnOnce() -> T) -> T {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            if let Some((t, target)) = *UNDER_WAY.lock().unwrap() {
                if t.elapsed() > Duration::from_secs(60) {
                    eprintln!("fuzz {target}: an input ran for more than 60 s (a hang)");
                    std::process::exit(3);
                }
            }
        });
    });
    *UNDER_WAY.lock().unwrap() = Some((Instant::now(), target));
    let value = f();
    *UNDER_WAY.lock().unwrap() = None;
    value
}

/// Runs `check` on `cases` mutated copies of one of `seeds` (picked per input); a panic
/// fails the test with proptest's smallest failing input.
fn fuzz(
    target: &'static str,
    cases: u32,
    seeds: &[Vec<u8>],
    dictionary: &'static [&'static [u8]],
    check: impl Fn(usize, &[u8]) -> anyhow::Result<()>,
) {
    for (i, seed) in seeds.iter().enumerate() {
        if let Err(e) = check(i, seed) {
            panic!("fuzz {target}: seed {i} is refused: {e:#}");
        }
    }
    let tally = Tally::default();
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let result = runner.run(&(0..seeds.len(), edits(dictionary)), |(s, e)| {
        let input = apply(&seeds[s], &e);
        let outcome = watched(target, || check(s, &input));
        tally.count(&outcome);
        Ok(())
    });
    let (accepted, refused) =
        (tally.accepted.load(Ordering::Relaxed), tally.refused.load(Ordering::Relaxed));
    eprintln!(
        "fuzz {target}: {} inputs tried, {accepted} accepted, {refused} refused with an error, {} panics",
        accepted + refused,
        usize::from(result.is_err())
    );
    if let Err(e) = result {
        panic!("fuzz {target}: {e}");
    }
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

const TEXT: &[&[u8]] = &[
    b"nan",
    b"-1",
    b"0",
    b"1e309",
    b"18446744073709551616",
    b"\"",
    b"\"\"",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b"\n",
    b"\r\n",
    b"=",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"\0",
    b"\xef\xbb\xbf",
    b"\xc3",
    b"\\u0000",
    b"choices = 0",
    b"choices = 99999",
    b"answer_kind = \"choice\"",
    b"question_template = \"{q}{",
    b"\"position\": 1000000",
    b"\"step\": 999",
    b"\"prompt\": []",
];

#[test]
fn gguf_model_files() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed.gguf");
    common::write_tiny_gguf(&seed, "llama", true, common::byte_vocab(), 64);
    let seeds = [std::fs::read(&seed).unwrap()];
    let dictionary: &[&[u8]] = &[b"GGUF", b"\0\0\0\0", b"\xff\xff\xff\xff", b"general.alignment"];
    fuzz("gguf", cases(1000), &seeds, dictionary, |_, input| {
        let path = write(&tmp.path().join("case.gguf"), input);
        let lm = LanguageModel::open(path.to_str().unwrap(), &OpenOptions::default(), &mut |_| {})?;
        let ids = lm.chat_ids(&SystemTurn::Template, "1 + 1 =")?;
        let cfg = lm.generate_config(3, None);
        generate(&lm.model, vec![Request { prefix: Default::default(), ids }], &cfg)?;
        Ok(())
    });
}

#[test]
fn task_files_and_their_data() {
    let rows = "{\"question\": \"Tom has 3 apples and buys 2. How many?\", \"answer\": \"5\"}\n\
                {\"question\": \"What is 7 - 9?\", \"answer\": \"-2\"}\n";
    let csv = "question,answer\n\"Tom has 3 apples, buys 2. Has he 5?\",yes\nIs 8 odd?,no\n";
    let choices = "{\"question\": \"Pick: (A) 1 (B) 2\", \"answer\": \"(B)\"}\n\
                   {\"question\": \"Pick: (A) x (B) y\", \"answer\": \"A\"}\n";
    let spec = |data: &str, kind: &str| {
        format!("name = \"t\"\ndata = \"{data}\"\nquestion = \"question\"\nanswer = \"answer\"\nanswer_kind = \"{kind}\"\n")
    };
    // Seeds: a task file (over JSONL, CSV or multiple-choice data), or a data file under a
    // fixed task file.
    let seeds = [
        spec("rows.jsonl", "integer").into_bytes(),
        spec("rows.csv", "yes_no").into_bytes(),
        (spec("choices.jsonl", "choice") + "choices = 2\n").into_bytes(),
        rows.as_bytes().to_vec(),
        csv.as_bytes().to_vec(),
    ];
    let opts = TaskOptions { data_dir: None, seed: 0, difficulty: 1, count: 0 };
    fuzz("task", cases(1000), &seeds, TEXT, |which, input| {
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("rows.jsonl"), rows.as_bytes());
        write(&dir.path().join("rows.csv"), csv.as_bytes());
        write(&dir.path().join("choices.jsonl"), choices.as_bytes());
        let toml = match which {
            3 => {
                write(&dir.path().join("rows.jsonl"), input);
                write(&dir.path().join("t.toml"), &seeds[0])
            }
            4 => {
                write(&dir.path().join("rows.csv"), input);
                write(&dir.path().join("t.toml"), &seeds[1])
            }
            _ => write(&dir.path().join("t.toml"), input),
        };
        let task = Task::load(toml.to_str().unwrap(), &opts)?;
        greater::tasks::Split::new(task.examples.len(), 1, 0, 1, 0)?;
        Ok(())
    });
}

#[test]
fn a_runs_checkpoint_and_step_log_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny.gguf");
    common::write_tiny_gguf(&model, "llama", true, common::byte_vocab(), 512);
    let settings = OptimizeConfig {
        model: model.display().to_string(),
        task: "arithmetic".into(),
        difficulty: 1,
        train: 3,
        dev: 0,
        test: Count::N(2),
        steps: 2,
        max_reasoning: 5,
        initial_prompt: Some("Go on.".into()),
        start: greater::settings::StartFrom::Initial,
        ..OptimizeConfig::default()
    };
    let finished = tmp.path().join("run");
    let stop = Arc::new(AtomicBool::new(false));
    run(Start::New(settings), &finished, &stop, &mut |_| {}).unwrap();
    let file = |name: &str| std::fs::read(finished.join(name)).unwrap();
    let seeds = [file("checkpoint.json"), file("steps.jsonl")];
    fuzz("run records", cases(300), &seeds, TEXT, |which, input| {
        let dir = tempfile::tempdir()?;
        for entry in std::fs::read_dir(&finished)? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
        }
        write(&dir.path().join(["checkpoint.json", "steps.jsonl"][which]), input);
        let resumed = Start::Resume(Changes { steps: Some(1), data_dir: None });
        run(resumed, dir.path(), &stop, &mut |_| {})?;
        Ok(())
    });
}

#[test]
fn chat_templates() {
    let chatml = "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n\
You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n\
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let llama3 = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] | trim }}<|end_header_id|>\n\n\
{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    let seeds = [chatml.as_bytes().to_vec(), llama3.as_bytes().to_vec()];
    let dictionary: &[&[u8]] = &[
        b"{{",
        b"}}",
        b"{%",
        b"%}",
        b"{% for i in range(99999) %}",
        b"{% endfor %}",
        b"{% set ns = namespace(s='ab') %}",
        b"{% set ns.s = ns.s ~ ns.s %}",
        b"{{ 'x' * 99999 }}",
        b"{% macro m(x) %}{{ m(x ~ x) }}{% endmacro %}{{ m('a') }}",
        b"{{ raise_exception('no') }}",
        b"messages[0]",
        b"loop.index",
        b"|trim",
        b"|tojson",
        b"{% if %}",
        b"\0",
    ];
    fuzz("chat template", cases(1000), &seeds, dictionary, |_, input| {
        let source = String::from_utf8_lossy(input);
        let chat = ChatTemplate::new(&source, Some("<s>"), Some("</s>"))?;
        for system in [SystemTurn::Template, SystemTurn::None, SystemTurn::Text("Be brief.".into())]
        {
            chat.render_turn(&system, "What is 2 + 2?")?;
        }
        Ok(())
    });
}

/// Values a numeric flag may be given: the edges of the integer and float types, of the
/// settings' ranges, and text that is no number.
const FLAG_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "8",
    "64",
    "511",
    "512",
    "-1",
    "-0",
    "0.5",
    "1000",
    "1001",
    "32768",
    "100001",
    "1000000000",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e12",
    "1e-300",
    "1e309",
    "nan",
    "inf",
    "",
    "margin:99",
];

/// The command line of one settings input: `optimize` (one short step) or `eval` (one
/// question) on the tiny model, with `(flag, value)` pairs after the base flags.
fn settings_command(
    model: &Path,
    out: &Path,
    optimize: bool,
    given: &[(String, &str)],
) -> Vec<String> {
    let model = model.to_str().unwrap();
    let base: &[&str] = if optimize {
        &["optimize", "-m", model, "--train", "2", "--dev", "0", "--test", "1", "--steps", "1"]
    } else {
        &["eval", "-m", model, "--train", "0", "--dev", "0", "--test", "1"]
    };
    let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
    args.extend(["--max-reasoning", "3", "--difficulty", "1"].map(String::from));
    if optimize {
        args.extend(["--out".to_string(), out.display().to_string()]);
    }
    for (flag, value) in given {
        args.extend([flag.clone(), value.to_string()]);
    }
    args
}

/// How one settings input ended.
enum Ended {
    Finished,
    Refused,
    Stopped,
}

/// Runs the release binary on `args` under a 4 GiB address-space limit; Ctrl-C after a
/// second, and a failure when it runs on 20 s later, dies of a signal (an abort), panics, or
/// refuses without an error line.
fn run_limited(args: &[String]) -> Result<Ended, String> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_greater"));
    command.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 4 << 30, rlim_max: 4 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).ok();
        text
    });
    let started = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if !interrupted && started.elapsed() > Duration::from_secs(1) {
            // SAFETY: a signal to the child this function spawned and still waits for.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupted = true;
        }
        if started.elapsed() > Duration::from_secs(21) {
            child.kill().ok();
            child.wait().ok();
            return Err("still running 20 s after Ctrl-C (a hang)".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = reader.join().unwrap();
    if stderr.contains("panicked") {
        return Err(format!("a panic: {stderr}"));
    }
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(Ended::Finished),
        (Some(2), _) if stderr.contains("error:") => Ok(Ended::Refused),
        (Some(130), _) if interrupted => Ok(Ended::Stopped),
        (code, signal) => Err(format!("exit {code:?}, signal {signal:?}: {stderr}")),
    }
}

#[test]
fn the_clis_numeric_settings_at_their_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny.gguf");
    common::write_tiny_gguf(&model, "llama", true, common::byte_vocab(), 512);
    let flag = |name: &str| format!("--{}", name.replace('_', "-"));
    let floats = ["temperature", "control_weight", "answer_weight", "restart_below", "accept"];
    let flags: Vec<String> = OptimizeConfig::default()
        .count_ranges()
        .iter()
        .map(|r| flag(r.0))
        .chain(floats.iter().map(|n| flag(n)))
        .collect();
    let (finished, refused, stopped) =
        (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let config = Config { cases: cases(1000), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let input =
        (any::<bool>(), proptest::collection::vec((0..flags.len(), 0..FLAG_VALUES.len()), 1..4));
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&input, |(optimize, picks)| {
        let given: Vec<(String, &str)> =
            picks.iter().map(|&(f, v)| (flags[f].clone(), FLAG_VALUES[v])).collect();
        let out = tmp.path().join(format!("run{}", case.fetch_add(1, Ordering::Relaxed)));
        let args = settings_command(&model, &out, optimize, &given);
        match run_limited(&args) {
            Ok(Ended::Finished) => finished.fetch_add(1, Ordering::Relaxed),
            Ok(Ended::Refused) => refused.fetch_add(1, Ordering::Relaxed),
            Ok(Ended::Stopped) => stopped.fetch_add(1, Ordering::Relaxed),
            Err(why) => panic!("greater {}: {why}", args.join(" ")),
        };
        Ok(())
    });
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    eprintln!(
        "fuzz settings: {} inputs tried, {} finished, {} refused with an error, {} stopped by Ctrl-C, {} failures",
        n(&finished) + n(&refused) + n(&stopped),
        n(&finished),
        n(&refused),
        n(&stopped),
        usize::from(result.is_err())
    );
    if let Err(e) = result {
        panic!("fuzz settings: {e}");
    }
}
