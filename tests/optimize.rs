//! The optimiser: candidate proposal, shortlist and schedule as pure functions; resumable,
//! reproducible runs on a tiny random model; an end-to-end run on SmolLM2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use greater::app;
use greater::eval::{paired, user_ids, Record};
use greater::layout::Layout;
use greater::model::{KvCache, Pass, Precision};
use greater::optimize::ape::{
    instruction_from_reply, proposal_request, reply_start, PROPOSALS_PER_ROUND,
};
use greater::optimize::candidates::{
    candidates_from_subsets, choose, combine_gradients, draw_subsets, propose, shortlist,
    ProposalConfig,
};
use greater::optimize::run::{run, Changes, Event, Start};
use greater::optimize::schedule::{next_position, restarts, Next};
use greater::optimize::select::choose_on_dev;
use greater::optimize::Optimizer;
use greater::protocol::{ProtocolEvent, Shard};
use greater::records::{
    Contender, EvalSummary, Label, Paired, ProtocolConfig, ProtocolTable, Score, Search,
    StepRecord, Summary, TaskRow, TokenStep,
};
use greater::report::text::{budget_warning, verdict};
use greater::report::write_screen_outputs;
use greater::runtime::{LanguageModel, OpenOptions};
use greater::settings::{Accept, GradientSum, Method, OptimizeConfig, StartFrom};
use greater::stats::mcnemar_exact;
use greater::tasks::{Count, Split, Task, PAPER_INITIAL_PROMPT, ZERO_SHOT_COT};
use greater::tokenizer::SystemTurn;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const RANKED: [&[u32]; 4] =
    [&[1, 2, 3, 4, 5, 6], &[2, 1, 4, 3, 6, 5], &[1, 3, 2, 5, 4, 6], &[7, 8, 1, 2, 3, 4]];

fn ranked() -> Vec<Vec<u32>> {
    RANKED.iter().map(|r| r.to_vec()).collect()
}

#[test]
fn candidates_are_the_union_of_subset_intersections() {
    // k = 2: {1,2} & {1,2} = {1,2}; {1,3} & {7,8} = {}. With the current token 9: 3 tokens.
    let subsets = vec![vec![0, 1], vec![2, 3]];
    assert_eq!(candidates_from_subsets(&ranked(), &subsets, 9, 2, 3), vec![1, 2, 9]);
    // Asking for 6 widens k: k = 4 gives {1,2,3,4} and {1,2,3}: 5 tokens; k = 6 gives
    // {1..6} and {1,2,3,4,5}: with 9, 7 tokens.
    assert_eq!(candidates_from_subsets(&ranked(), &subsets, 9, 2, 6), vec![1, 2, 3, 4, 5, 6, 9]);
    // The current token is counted once when it is already a candidate.
    assert_eq!(candidates_from_subsets(&ranked(), &[vec![0, 1, 2]], 1, 2, 1), vec![1]);
    // Widening stops when k covers the longest ranking: k = 6 gives {1,2,3,4}.
    assert_eq!(candidates_from_subsets(&ranked(), &[vec![0, 3]], 9, 2, 50), vec![1, 2, 3, 4, 9]);
}

#[test]
fn subsets_are_seeded_distinct_and_sorted() {
    let draw = |seed| draw_subsets(10, 6, 5, &mut ChaCha8Rng::seed_from_u64(seed));
    let a = draw(4);
    assert_eq!(a, draw(4));
    assert_ne!(a, draw(5));
    for s in &a {
        assert_eq!(s.len(), 5);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        assert!(s.iter().all(|&e| e < 10));
    }
    // Fewer examples than the subset size: every subset is all of them.
    assert_eq!(
        draw_subsets(3, 2, 5, &mut ChaCha8Rng::seed_from_u64(0)),
        vec![vec![0, 1, 2], vec![0, 1, 2]]
    );
    // With all examples in every subset the proposal is the plain intersection, widened:
    // k = 2 gives {} (example 3 ranks 7, 8 first), k = 4 gives {1, 2}.
    let cfg = ProposalConfig { top_k: 2, subsets: 3, subset_size: 4, min_candidates: 3 };
    assert_eq!(propose(&ranked(), 9, &cfg, &mut ChaCha8Rng::seed_from_u64(1)), vec![1, 2, 9]);
}

#[test]
fn shortlist_takes_the_most_negative_gradients_and_may_keep_the_current_token() {
    let candidates = [10, 11, 12, 13, 14, 15];
    let gradient = [0.5, -2.0, -0.1, -3.0, -2.0, 1.0];
    // 13 (-3.0), then 11 and 14 tie at -2.0: the lower id first.
    assert_eq!(
        shortlist(&candidates, &gradient, None, 3),
        vec![(13, -3.0), (11, -2.0), (14, -2.0)]
    );
    // Reference: the current token (13) is a candidate like any other and leads the list.
    assert_eq!(shortlist(&candidates, &gradient, None, 1), vec![(13, -3.0)]);
    // With keep_current = false it is left out, however good its gradient.
    assert_eq!(shortlist(&candidates, &gradient, Some(13), 2), vec![(11, -2.0), (14, -2.0)]);
    assert_eq!(shortlist(&[12], &[0.0], Some(12), 3), vec![]);
}

/// Scores with these values and mistake counts, of 3 questions.
fn scored(values: &[(f64, usize)]) -> Vec<Score> {
    values
        .iter()
        .map(|&(score, mistakes)| Score {
            score,
            mistakes,
            cut: Some(0),
            n: 3,
            nll: 0.0,
            answer_nll: 0.0,
            reasoning_tokens: None,
        })
        .collect()
}

#[test]
fn a_step_takes_the_lowest_score_ties_to_the_later_and_the_sentence_end_at_once() {
    let plain = |v: &[f64]| scored(&v.iter().map(|&s| (s, 0)).collect::<Vec<_>>());
    let current = &scored(&[(0.5, 0)])[0];
    // Scores in gradient order: the lowest wins.
    assert_eq!(choose(&plain(&[0.5, 0.3, 0.4]), false, None, Accept::Always), Some(1));
    // Ties go to the later (lower-gradient) token, as the reference's `<=`.
    assert_eq!(choose(&plain(&[0.3, 0.5, 0.3]), false, None, Accept::Always), Some(2));
    // The sentence-end rule takes the last checked token although an earlier one scored better.
    assert_eq!(choose(&plain(&[0.1, 0.9]), true, None, Accept::Always), Some(1));
    // Reference: a worse move is taken anyway; not-worse keeps the current prompt instead.
    assert_eq!(choose(&plain(&[0.6, 0.7]), false, Some(current), Accept::Always), Some(0));
    assert_eq!(choose(&plain(&[0.6, 0.7]), false, Some(current), Accept::NotWorse), None);
    assert_eq!(choose(&plain(&[0.6, 0.5]), false, Some(current), Accept::NotWorse), Some(1));
    assert_eq!(choose(&[], false, None, Accept::Always), None);
}

#[test]
fn accept_margin_moves_only_to_a_candidate_that_saves_n_mistakes() {
    // (candidates as (score, mistakes), the current prompt's mistakes, N, at once, chosen)
    type Row = (&'static [(f64, usize)], usize, usize, bool, Option<usize>);
    let table: [Row; 7] = [
        // The best score saves one; the margin wants two, which the second saves.
        (&[(0.40, 1), (0.45, 0)], 2, 2, false, Some(1)),
        (&[(0.40, 1), (0.45, 0)], 2, 1, false, Some(0)),
        // Nothing saves enough: the step stays, however good the scores.
        (&[(0.10, 2), (0.20, 2)], 2, 1, false, None),
        (&[(0.10, 1)], 2, 2, false, None),
        // The sentence-end token is taken at once only if it saves enough itself.
        (&[(0.10, 0), (0.30, 1)], 2, 2, true, None),
        (&[(0.10, 1), (0.30, 0)], 2, 2, true, Some(1)),
        // Among the ones that save enough, ties go to the later as always.
        (&[(0.30, 0), (0.30, 0), (0.10, 3)], 3, 3, false, Some(1)),
    ];
    for (i, (candidates, now, n, at_once, chosen)) in table.into_iter().enumerate() {
        let current = &scored(&[(0.9, now)])[0];
        assert_eq!(
            choose(&scored(candidates), at_once, Some(current), Accept::Margin(n)),
            chosen,
            "row {i}"
        );
    }
    // On the candidates a real run checked (the fixed-seed fixture's steps), for every current
    // mistake count and margin: a move saves at least N, and one happens whenever a candidate
    // would.
    let steps = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/before-redesign/steps.jsonl"),
    )
    .unwrap();
    for line in steps.lines() {
        let step: serde_json::Value = serde_json::from_str(line).unwrap();
        let checked: Vec<Score> = step["checked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| serde_json::from_value(c["score"].clone()).unwrap())
            .collect();
        for now in 0..=3 {
            for n in 1..=3 {
                let current = &scored(&[(0.9, now)])[0];
                let pick = choose(&checked, false, Some(current), Accept::Margin(n));
                let any = checked.iter().any(|s| s.mistakes + n <= now);
                assert_eq!(pick.is_some(), any, "{line}: {now} mistakes now, margin {n}");
                if let Some(i) = pick {
                    assert!(checked[i].mistakes + n <= now, "{line}: margin {n}");
                }
            }
        }
    }
    assert_eq!("margin:2".parse::<Accept>(), Ok(Accept::Margin(2)));
    assert_eq!("margin:0".parse::<Accept>(), Ok(Accept::NotWorse));
    assert_eq!("not-worse".parse::<Accept>(), Ok(Accept::NotWorse));
    assert_eq!(Accept::Margin(3).to_string(), "margin:3");
    assert_eq!(
        "margin:two".parse::<Accept>().unwrap_err(),
        "accept margin:two: N must be a whole number of mistakes"
    );
}

#[test]
fn gradients_sum_raw_under_the_reference_and_normalised_per_example_otherwise() {
    let grads = [vec![3.0, 4.0], vec![0.0, -2.0], vec![0.0, 0.0]];
    assert_eq!(combine_gradients(&grads, GradientSum::Raw), vec![3.0, 2.0]);
    assert_eq!(combine_gradients(&grads, GradientSum::PerExample), vec![0.6, -0.19999999]);
}

#[test]
fn schedule_wraps_after_a_sentence_end_and_grows_otherwise() {
    assert_eq!(next_position(2, 5, " step", false), Next::At(3));
    assert_eq!(next_position(4, 5, " answer.", false), Next::At(0));
    // The reference's sentence end: any token text holding a ".".
    assert_eq!(next_position(4, 5, ". Then", false), Next::At(0));
    assert_eq!(next_position(4, 5, "!", false), Next::Grow);
    assert_eq!(next_position(4, 5, " answer", false), Next::Grow);
    // A restart goes back to 0 from anywhere, without growing.
    assert_eq!(next_position(2, 5, " step", true), Next::At(0));
    assert_eq!(next_position(4, 5, " answer", true), Next::At(0));
}

#[test]
fn a_step_restarts_only_when_its_score_is_strictly_below_the_threshold() {
    assert!(restarts(Some(0.1), 0.12));
    assert!(!restarts(Some(0.12), 0.12));
    assert!(!restarts(Some(0.5), 0.12));
    // Nothing chosen and no current score: nothing to compare.
    assert!(!restarts(None, 0.12));
    // Threshold 0 never restarts (scores are never negative).
    assert!(!restarts(Some(0.0), 0.0));
}

/// A tiny random llama GGUF that can tokenize any text.
fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    common::write_tiny_gguf(&path, "llama", true, common::byte_vocab(), 512);
    path
}

fn tiny_settings(model: &Path, steps: usize) -> OptimizeConfig {
    OptimizeConfig {
        model: model.display().to_string(),
        task: "arithmetic".into(),
        difficulty: 1,
        train: 3,
        dev: 0,
        test: Count::N(2),
        steps,
        max_reasoning: 5,
        initial_prompt: Some("Go on.".into()),
        // The tiny models' tests check behaviour, with f32's exact sums, from the initial
        // prompt and with the template's system turn, as they were written.
        precision: Precision::F32,
        start: StartFrom::Initial,
        system: SystemTurn::Template,
        ..OptimizeConfig::default()
    }
}

/// The token search's part of a step.
fn tok(r: &StepRecord) -> &TokenStep {
    r.token().expect("a token step")
}

fn steps_without_timings(dir: &Path) -> Vec<StepRecord> {
    std::fs::read_to_string(dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: StepRecord = serde_json::from_str(l).unwrap();
            r.seconds = Default::default();
            r
        })
        .collect()
}

fn run_quietly(start: Start, out: &Path) {
    app::optimize(start, out, &Arc::new(AtomicBool::new(false)), &mut |_| {}).unwrap();
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    run_quietly(Start::New(tiny_settings(&model, 4)), &whole);
    run_quietly(Start::New(tiny_settings(&model, 2)), &split);
    assert_eq!(steps_without_timings(&split).len(), 2);
    run_quietly(Start::Resume(Changes { steps: Some(4), ..Changes::default() }), &split);
    let (a, b) = (steps_without_timings(&whole), steps_without_timings(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(read(&whole, "best_prompt.txt"), read(&split, "best_prompt.txt"));
    assert_eq!(read(&whole, "checkpoint.json"), read(&split, "checkpoint.json"));
    // A step moves to the best checked token. (With this byte-level vocabulary the leading
    // space token has no admissible alternative, so a step there checks nothing.)
    assert!(a.iter().any(|r| tok(r).chosen.is_some()));
    for r in &a {
        assert!(tok(r).candidates.iter().any(|c| r.prompt_before.contains(c.text.trim())));
        assert!(tok(r).checked.len() <= 3);
        if let Some(chosen) = &tok(r).chosen {
            let best = tok(r).checked.iter().map(|c| c.score.score).fold(f64::INFINITY, f64::min);
            assert_eq!(
                tok(r).checked.iter().find(|c| c.id == chosen.id).unwrap().score.score,
                best
            );
        }
    }
}

#[test]
fn a_run_killed_mid_step_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let reference = tmp.path().join("reference");
    run_quietly(Start::New(tiny_settings(&model, 8)), &reference);

    let resumed = killed_after_its_first_step_and_resumed(tmp.path(), &tiny_settings(&model, 8));
    assert_eq!(resumed, steps_without_timings(&reference));
}

/// The step records of a `greater optimize` child with `settings`, killed after its first
/// step (before its last) and resumed to the end.
fn killed_after_its_first_step_and_resumed(
    tmp: &Path,
    settings: &OptimizeConfig,
) -> Vec<StepRecord> {
    let (mut child, killed) = spawn_run_until_first_step(tmp, settings, "killed");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(checkpoint_step(&killed) < settings.steps, "the child finished before it was killed");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--resume", killed.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    steps_without_timings(&killed)
}

#[test]
fn train_batches_are_drawn_afresh_each_step_and_again_the_same_after_a_kill_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let settings = OptimizeConfig { train: 6, train_batch: Some(2), ..tiny_settings(&model, 8) };
    let reference = tmp.path().join("reference");
    run_quietly(Start::New(settings.clone()), &reference);
    let steps = steps_without_timings(&reference);
    let batches: Vec<Vec<usize>> =
        steps.iter().map(|r| tok(r).questions.clone().expect("the step's questions")).collect();
    for b in &batches {
        assert!(b.len() == 2 && b[0] < b[1] && b[1] < 6, "{b:?}");
    }
    assert!(batches.iter().any(|b| *b != batches[0]), "every step drew {:?}", batches[0]);
    for r in &steps {
        let best = tok(r).best_on_questions.as_ref().expect("the best re-scored");
        assert_eq!(best.n, 2, "the best is scored on the step's questions only");
        for c in &tok(r).checked {
            assert_eq!(c.score.n, 2);
        }
    }

    assert_eq!(killed_after_its_first_step_and_resumed(tmp.path(), &settings), steps);

    // The pool must be larger than a batch.
    let whole = OptimizeConfig { train_batch: Some(6), ..settings };
    let err = run(
        Start::New(whole),
        &tmp.path().join("whole"),
        &Arc::new(AtomicBool::new(false)),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("train_batch 6 must be below the train split's 6 questions"),
        "{err}"
    );
}

#[test]
fn the_dev_plateau_stop_measures_only_its_own_dev_questions_never_choosing_or_test_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let settings =
        OptimizeConfig { dev: 4, dev_patience: 2, dev_every: 1, ..tiny_settings(&model, 8) };
    let out = tmp.path().join("run");
    let summary =
        run(Start::New(settings.clone()), &out, &Arc::new(AtomicBool::new(false)), &mut |_| {})
            .unwrap();
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap()
    };
    let config = read("config.json");
    assert_eq!(config["settings"]["stop_dev"], 2, "the config records the count it set aside");
    let index =
        |v: &serde_json::Value| -> Vec<usize> { serde_json::from_value(v.clone()).unwrap() };
    let (dev, test) = (index(&config["split"]["dev"]), index(&config["split"]["test"]));
    let state: greater::records::State = serde_json::from_value(read("checkpoint.json")).unwrap();
    assert_eq!(state.dev_checks.len(), state.step, "one check a step");
    for c in &state.dev_checks {
        assert_eq!(c.questions, dev[..2], "step {}", c.step);
        assert!(c.questions.iter().all(|q| !test.contains(q) && !dev[2..].contains(q)));
    }
    // The tiny model gains nothing on dev: two checks without a gain stop it at the third.
    assert!(state.dev_plateaued(2));
    assert_eq!(state.step, 3);
    // The returned prompt is chosen on the other dev questions only.
    for c in &summary.contenders {
        assert_eq!(c.dev.as_ref().unwrap().n, 2, "{}", c.label);
    }

    let err = run(
        Start::New(OptimizeConfig { dev: 1, ..settings }),
        &tmp.path().join("one"),
        &Arc::new(AtomicBool::new(false)),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("dev_patience needs dev questions of its own"), "{err}");
}

/// Starts `greater optimize` on the tiny model in a child process and waits for its first
/// logged step.
fn spawn_until_first_step(
    tmp: &Path,
    model: &Path,
    name: &str,
    steps: usize,
) -> (std::process::Child, PathBuf) {
    spawn_run_until_first_step(tmp, &tiny_settings(model, steps), name)
}

/// Starts `greater optimize` with `settings` in a child process and waits for its first
/// logged step.
fn spawn_run_until_first_step(
    tmp: &Path,
    settings: &OptimizeConfig,
    name: &str,
) -> (std::process::Child, PathBuf) {
    let out = tmp.join(name);
    let config = tmp.join(format!("{name}.toml"));
    std::fs::write(&config, toml::to_string(settings).unwrap()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = out.join("steps.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !log.exists() || std::fs::read_to_string(&log).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the child never finished a step");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (child, out)
}

fn checkpoint_step(dir: &Path) -> usize {
    let state: greater::records::State =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap())
            .unwrap();
    state.step
}

#[test]
fn ctrl_c_keeps_the_last_checkpoint_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (child, out) = spawn_until_first_step(tmp.path(), &model, "interrupted", 200);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "interrupted: finished steps are saved; continue with greater optimize --resume"
        ),
        "{stderr}"
    );
    let step = checkpoint_step(&out);
    assert!((1..200).contains(&step));
    assert_eq!(steps_without_timings(&out).len(), step);
}

#[test]
fn smollm2_two_steps_write_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args([
            "optimize",
            "--model",
            "smollm2-135m",
            "--task",
            "arithmetic",
            "--train",
            "4",
            "--dev",
            "0",
            "--test",
            "4",
        ])
        .args(["--steps", "2", "--max-reasoning", "32", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("budget: 2 steps"), "{stdout}");
    // Output not a terminal: a line for each evaluation when it ends.
    assert!(stdout.contains("test: zero-shot CoT: 4 questions in "), "{stdout}");
    for f in [
        "config.json",
        "steps.jsonl",
        "checkpoint.json",
        "best_prompt.txt",
        "summary.json",
        "summary.md",
    ] {
        assert!(out_dir.join(f).exists(), "missing {f}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["model_sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(config["split"]["train"].as_array().unwrap().len(), 4);
    assert_eq!(config["settings"]["top_k"], 40);
    assert_eq!(config["settings"]["connector"], ". Use");
    assert_eq!(steps_without_timings(&out_dir).len(), 2);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    let labels: Vec<&str> = summary["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["zero-shot CoT", "initial", "optimised"]);
    let best = std::fs::read_to_string(out_dir.join("best_prompt.txt")).unwrap();
    assert_eq!(summary["best_prompt"], best.as_str());
    assert!(stdout.contains("| optimised |"), "{stdout}");
    // Cut reasonings: each evaluation's count is its records' count, and the summary says so.
    // An evaluation of a prompt measured before under another label shares that one's records.
    let evaluations = summary["evaluations"].as_array().unwrap();
    let (mut cut, mut n) = (0, 0);
    for e in evaluations {
        let first = evaluations.iter().position(|f| f["prompt"] == e["prompt"]).unwrap();
        let file = ["zero_shot_cot", "initial", "optimised"][first];
        let text = std::fs::read_to_string(out_dir.join(format!("test-{file}.jsonl"))).unwrap();
        let records: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let cut_here = records.iter().filter(|r| r["cut_by_budget"].as_bool().unwrap()).count();
        assert_eq!(e["cut_by_budget"].as_u64().unwrap() as usize, cut_here, "{file}");
        (cut, n) = (cut + cut_here, n + records.len());
    }
    let summary_md = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(summary_md.contains("| reasoning cut at 32 tokens |"), "{summary_md}");
    assert_eq!(
        summary_md.contains("ran into the 32-token reasoning budget"),
        10 * cut > n,
        "{cut} of {n} cut: {summary_md}"
    );
}

#[test]
fn the_summary_warns_when_more_than_a_tenth_of_test_reasonings_ran_into_the_budget() {
    let eval = |cut: usize, n: usize| EvalSummary {
        label: Label::Initial,
        prompt: "p".into(),
        accuracy: 0.0,
        correct: 0,
        n,
        interval: (0.0, 1.0),
        seconds: 0.0,
        cut_by_budget: Some(cut),
        unparsed: Some(0),
    };
    assert_eq!(budget_warning(&[eval(10, 100), eval(20, 200)], 256), None, "exactly a tenth");
    assert_eq!(budget_warning(&[], 256), None);
    let uncounted = EvalSummary { cut_by_budget: None, ..eval(0, 100) };
    assert_eq!(
        budget_warning(&[uncounted.clone(), eval(10, 100)], 256),
        None,
        "a run of before the count"
    );
    assert_eq!(
        budget_warning(&[eval(11, 100), eval(20, 200)], 256).as_deref(),
        Some("31 of 300 test reasonings ran into the 256-token reasoning budget and had their answer forced mid-reasoning; with a larger `--max-reasoning` these accuracies may differ.")
    );
}

#[test]
fn the_verdict_gives_the_gain_and_the_test_questions_only_one_prompt_got_right() {
    let eval = |label: Label, correct: usize| EvalSummary {
        label,
        prompt: label.to_string(),
        accuracy: correct as f64 / 50.0,
        correct,
        n: 50,
        interval: (0.0, 1.0),
        seconds: 0.0,
        cut_by_budget: Some(0),
        unparsed: Some(0),
    };
    let mut summary: Summary = serde_json::from_value(serde_json::json!({
        "steps": 12, "best_prompt": "train #1", "selected": "train #1", "selected_by": "dev accuracy",
        "best_train_score": 0.5, "majority_floor": 0.06, "contenders": [], "evaluations": [],
    }))
    .unwrap();
    summary.evaluations =
        vec![eval(Label::ZeroShotCot, 4), eval(Label::Initial, 7), eval(Label::Optimised, 13)];
    assert_eq!(
        verdict(&summary),
        "Gain: the optimised prompt scores +18.0 points over zero-shot CoT and +12.0 over the initial prompt on 50 test questions."
    );
    summary.paired =
        Some(Paired { n: 50, only_first: 10, only_second: 1, p_value: mcnemar_exact(10, 1) });
    assert_eq!(
        verdict(&summary),
        "Gain: the optimised prompt scores +18.0 points over zero-shot CoT and +12.0 over the initial prompt on 50 test questions. Question by question: 10 right only with the optimised prompt, 1 only with zero-shot CoT (exact McNemar p = 0.012)."
    );
}

// ---- The reference's step on a tiny model, its loss and gradient, the shared layout ----

fn open_quietly(path: &Path) -> LanguageModel {
    LanguageModel::open(path.to_str().unwrap(), &OpenOptions::default(), &mut |_| {}).unwrap()
}

fn arithmetic(train: usize) -> (Task, Split) {
    Task::load_split("arithmetic", None, 0, 1, (train, 2, Count::N(2))).unwrap()
}

fn no_interrupt() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

#[test]
fn reference_steps_take_a_period_at_once_and_grow_with_underscore() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    // Every admissible token is shortlisted, so the current token is always checked and a
    // "." is among the checked tokens wherever it is admissible.
    let settings = |rule: bool| OptimizeConfig {
        top_k: 64,
        shortlist: 64,
        sentence_end_rule: rule,
        initial_prompt: Some("Go on".into()),
        ..tiny_settings(&model, 7)
    };
    let out = tmp.path().join("rule");
    run_quietly(Start::New(settings(true)), &out);
    let initial_len = 6; // " ", "G", "o", " ", "o", "n"
    let mut taken_at_once = 0;
    for r in steps_without_timings(&out) {
        let period = tok(&r).checked.iter().position(|c| c.text.contains('.'));
        let chosen = tok(&r).chosen.as_ref().unwrap();
        let truncated = period.is_some() && 2 * tok(&r).position >= initial_len;
        if !truncated {
            assert!(
                tok(&r).checked.iter().any(|c| c.prompt == r.prompt_before),
                "step {}: the current token is checked",
                r.step
            );
        }
        match period {
            Some(p) if 2 * tok(&r).position >= initial_len => {
                // The check stops at the first "." and takes it, whatever the scores.
                assert_eq!(p, tok(&r).checked.len() - 1, "step {}", r.step);
                assert!(chosen.text.contains('.'), "step {}", r.step);
                taken_at_once += 1;
            }
            _ => {
                let best =
                    tok(&r).checked.iter().map(|c| c.score.score).fold(f64::INFINITY, f64::min);
                let last_best =
                    tok(&r).checked.iter().rposition(|c| c.score.score == best).unwrap();
                assert_eq!(
                    chosen.id,
                    tok(&r).checked[last_best].id,
                    "step {}: lowest score, ties to the later",
                    r.step
                );
            }
        }
    }
    assert!(taken_at_once > 0);

    // Without the rule, past the last position: wrap after a ".", otherwise grow by "_".
    let out = tmp.path().join("no-rule");
    run_quietly(Start::New(settings(false)), &out);
    let steps = steps_without_timings(&out);
    let last = steps.iter().find(|r| tok(r).position == 5).expect("a step at the last position");
    if tok(last).chosen.as_ref().unwrap().text.contains('.') {
        assert_eq!(tok(last).next_position, 0);
    } else {
        assert_eq!(tok(last).next_position, 6);
        assert!(
            last.prompt.ends_with('_') && last.prompt.len() == last.prompt_before.len() + 1,
            "{last:?}"
        );
        // The grown prompt was never checked: the next step scores it and logs that score.
        let next = &steps[last.step];
        assert_eq!(next.prompt_before, last.prompt);
        let current = tok(next).current.as_ref().expect("the grown prompt's score");
        assert!(next.scored().contains(&(last.prompt.as_str(), current)));
    }
    // A step logs the current prompt's score exactly when it had to generate its reasoning:
    // after the prompt changed without being checked as it now is (the starting prompt was
    // scored before the search).
    for (i, r) in steps.iter().enumerate() {
        let known = i == 0 || {
            let before = &steps[i - 1];
            before.prompt_before == r.prompt_before
                || tok(before).checked.iter().any(|c| c.prompt == r.prompt_before)
        };
        assert_eq!(tok(r).current.is_none(), known, "step {}", r.step);
    }
    assert!(steps.iter().any(|r| tok(r).current.is_some()), "the prompt grew");
}

#[test]
fn the_current_token_is_kept_when_its_check_scores_best() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let cfg = OptimizeConfig {
        top_k: 64,
        shortlist: 64,
        steps: 3,
        initial_prompt: Some("Go on go on".into()),
        ..tiny_settings(&model, 3)
    };
    let out = tmp.path().join("run");
    run_quietly(Start::New(cfg), &out);
    for r in steps_without_timings(&out) {
        let chosen = tok(&r).chosen.clone().unwrap();
        let kept = tok(&r)
            .checked
            .iter()
            .find(|c| c.prompt == r.prompt_before)
            .expect("the current token is checked");
        if chosen.id == kept.id {
            assert_eq!(r.prompt, r.prompt_before, "keeping the token keeps the prompt");
        } else {
            let winner = tok(&r).checked.iter().find(|c| c.id == chosen.id).unwrap();
            assert!(winner.score.score <= kept.score.score);
        }
    }
}

#[test]
fn a_step_scoring_below_the_restart_threshold_goes_back_to_position_0() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let steps = |restart_below: f64, name: &str| {
        let out = tmp.path().join(name);
        let cfg = OptimizeConfig {
            initial_prompt: Some("Go on go on".into()),
            restart_below,
            ..tiny_settings(&model, 3)
        };
        run_quietly(Start::New(cfg), &out);
        steps_without_timings(&out)
    };
    let never = steps(0.0, "never");
    assert_eq!(never.iter().map(|r| tok(r).next_position).collect::<Vec<_>>(), [1, 2, 3]);
    // The threshold compares with the chosen prompt's score, strictly.
    let first = tok(&never[0])
        .checked
        .iter()
        .find(|c| Some(c.id) == tok(&never[0]).chosen.as_ref().map(|t| t.id))
        .unwrap()
        .score
        .score;
    assert_eq!(tok(&steps(first, "equal")[0]).next_position, 1);
    assert_eq!(tok(&steps(first + 1e-9, "above")[0]).next_position, 0);
    let always = steps(1e9, "always");
    assert_eq!(
        always.iter().map(|r| (tok(r).position, tok(r).next_position)).collect::<Vec<_>>(),
        [(0, 0); 3]
    );
}

#[test]
fn the_summed_gradient_is_the_raw_sum_of_per_example_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = open_quietly(&tiny_model(tmp.path()));
    let (task, split) = arithmetic(3);
    let train = Split::pick(&split.train, &task);
    let cfg = OptimizeConfig { model: String::new(), ..OptimizeConfig::default() };
    assert_eq!(cfg.gradient_sum, GradientSum::Raw);
    let opt = Optimizer::new(&lm, &task, &train, &cfg, no_interrupt()).unwrap();
    let prompt = opt.prompt_ids("Go on.").unwrap();
    let candidates: Vec<u32> = [prompt[2], b'a' as u32, b'x' as u32, b'.' as u32].to_vec();
    let reasoning: Vec<Vec<u32>> =
        (0..3).map(|i| lm.tokenizer.encode(&format!(" it is {i}"), false).unwrap()).collect();
    let per_example = opt.example_gradients(&prompt, 2, &candidates, &reasoning).unwrap();
    let summed = opt.gradient(&prompt, 2, &candidates, &reasoning).unwrap();
    let by_hand: Vec<f32> =
        (0..candidates.len()).map(|c| per_example.iter().map(|(_, g)| g[c]).sum()).collect();
    assert_eq!(summed, by_hand);
    // Not normalised: the per-example norms differ, so the normalised sum differs.
    let grads: Vec<Vec<f32>> = per_example.iter().map(|(_, g)| g.clone()).collect();
    assert_ne!(combine_gradients(&grads, GradientSum::PerExample), summed);
}

#[test]
fn the_loss_averages_the_prompt_nll_over_all_prompt_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = open_quietly(&tiny_model(tmp.path()));
    let (task, split) = arithmetic(2);
    let train = Split::pick(&split.train, &task);
    let cfg = OptimizeConfig::default();
    let opt = Optimizer::new(&lm, &task, &train, &cfg, no_interrupt()).unwrap();
    let layout = Layout::new(&lm, &task, &cfg.system, &cfg.connector).unwrap();
    let prompt = opt.prompt_ids("Go on.").unwrap();
    let reasoning: Vec<Vec<u32>> =
        (0..2).map(|_| lm.tokenizer.encode(" so 4", false).unwrap()).collect();
    for position in [0, 3, prompt.len() - 1] {
        let losses =
            opt.example_gradients(&prompt, position, &[prompt[position]], &reasoning).unwrap();
        for (e, example) in train.iter().enumerate() {
            let user = opt.user_ids(e, &prompt).unwrap();
            let answer = layout.answer_ids(&example.target).unwrap();
            let ids = [&user[..], &reasoning[e], layout.extractor(), &answer].concat();
            let x = lm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
            let hidden = lm
                .model
                .forward(&x, &mut [KvCache::default()], Pass::Fast)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let logits: Vec<Vec<f32>> = lm.model.logits(&hidden).unwrap().to_vec2().unwrap();
            let log_softmax = |row: &[f32], t: f32, target: u32| {
                let m = row.iter().map(|v| v / t).fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = row.iter().map(|v| (v / t - m).exp()).sum();
                (row[target as usize] / t - m - z.ln()) as f64
            };
            let start = layout.question(&example.question).unwrap().head.len();
            let nll: f64 = (0..prompt.len())
                .map(|j| -log_softmax(&logits[start + j - 1], 1.0, prompt[j]))
                .sum::<f64>()
                / prompt.len() as f64;
            let answer_at = ids.len() - answer.len();
            let ce: f64 = (0..answer.len())
                .map(|k| -log_softmax(&logits[answer_at + k - 1], 0.2, answer[k]))
                .sum::<f64>()
                / answer.len() as f64;
            let expected = ce + 0.2 * nll;
            let got = losses[e].0;
            assert!(
                (got - expected).abs() < 1e-3 * expected.abs().max(1.0),
                "position {position}, example {e}: {got} vs {expected}"
            );
        }
    }
}

/// The optimiser and the evaluator read the same ids for a question and prompt, and those
/// ids spell the reference's user turn "{question}. Use {prompt}".
fn assert_optimiser_and_evaluator_ids_agree(lm: &LanguageModel) {
    let (task, split) = arithmetic(2);
    let train = Split::pick(&split.train, &task);
    let cfg = OptimizeConfig::default();
    let opt = Optimizer::new(lm, &task, &train, &cfg, no_interrupt()).unwrap();
    let layout = Layout::new(lm, &task, &cfg.system, &cfg.connector).unwrap();
    for prompt in [PAPER_INITIAL_PROMPT, ZERO_SHOT_COT] {
        let ids = opt.prompt_ids(prompt).unwrap();
        assert_eq!(opt.prompt_text(&ids).unwrap(), prompt);
        for (e, example) in train.iter().enumerate() {
            let optimised = opt.user_ids(e, &ids).unwrap();
            assert_eq!(optimised, user_ids(&layout, &example.question, prompt).unwrap());
            let text =
                lm.chat_text(&cfg.system, &format!("{}. Use {prompt}", example.question)).unwrap();
            assert_eq!(lm.tokenizer.decode_with_special(&optimised).unwrap(), text);
        }
    }
}

#[test]
fn optimiser_and_evaluator_ids_agree_on_smollm2() {
    assert_optimiser_and_evaluator_ids_agree(common::smollm2());
}

#[test]
fn optimiser_and_evaluator_ids_agree_on_a_sentencepiece_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sp.gguf");
    common::write_tiny_sentencepiece_gguf(&path);
    let lm = open_quietly(&path);
    // The prompt's space is one "▁", not a second space prefix.
    let ids = lm.tokenizer.encode_continuation(" the").unwrap();
    assert_eq!(ids, vec![lm.tokenizer.token_id("\u{2581}the").unwrap()]);
    assert_optimiser_and_evaluator_ids_agree(&lm);
}

/// A reasoning cut at the budget counts as a mistake only with `cut_is_mistake`: the score
/// of all train questions at once equals the sum of each question scored alone. SmolLM2 on
/// 30 arithmetic questions with 64 tokens: some reasonings end in time, some are cut, and of
/// those some have their forced answer right.
#[test]
fn a_reasoning_cut_at_the_budget_is_a_mistake_only_when_the_setting_says_so() {
    const BUDGET: usize = 64;
    let lm = common::smollm2();
    let (task, split) = arithmetic(30);
    let train = Split::pick(&split.train, &task);
    let score_on = |examples: &[&greater::tasks::Example], cut_is_mistake: bool| {
        let cfg =
            OptimizeConfig { max_reasoning: BUDGET, cut_is_mistake, ..OptimizeConfig::default() };
        let opt = Optimizer::new(lm, &task, examples, &cfg, no_interrupt()).unwrap();
        let (reasoning, score) =
            opt.reason_and_score(&opt.prompt_ids(PAPER_INITIAL_PROMPT).unwrap()).unwrap();
        assert_eq!(score.cut, Some(reasoning.iter().filter(|r| r.len() == BUDGET).count()));
        let tokens = reasoning.iter().map(|r| r.len()).sum::<usize>() as f64;
        assert_eq!(score.reasoning_tokens, Some(tokens / examples.len() as f64));
        score
    };
    let alone: Vec<Score> = train.iter().map(|ex| score_on(&[*ex], false)).collect();
    let (off, on) = (score_on(&train, false), score_on(&train, true));
    let wrong = alone.iter().map(|s| s.mistakes).sum::<usize>();
    let cut = alone.iter().map(|s| s.cut.unwrap()).sum::<usize>();
    let wrong_or_cut = alone.iter().map(|s| s.mistakes.max(s.cut.unwrap())).sum::<usize>();
    assert!(wrong_or_cut > wrong && cut < train.len(), "right and cut, and not cut, both occur");
    assert_eq!((off.mistakes, off.cut), (wrong, Some(cut)));
    assert_eq!((on.mistakes, on.cut), (wrong_or_cut, Some(cut)));
    let n = train.len() as f64;
    assert!((on.score - off.score - (wrong_or_cut - wrong) as f64 / n).abs() < 1e-9);
}

/// The prompt grows by `_` unless the text would not encode back to the ids (SmolLM2 merges
/// `__` into one token): then by a token that keeps the round trip.
#[test]
fn the_prompt_grows_by_a_token_that_keeps_its_text_and_ids_in_step() {
    let lm = common::smollm2();
    let (task, split) = arithmetic(2);
    let train = Split::pick(&split.train, &task);
    let cfg = OptimizeConfig::default();
    let opt = Optimizer::new(lm, &task, &train, &cfg, no_interrupt()).unwrap();
    let underscore = *lm.tokenizer.encode_continuation("_").unwrap().last().unwrap();
    let grown = |ids: &[u32]| [ids, &[opt.filler(ids).unwrap().unwrap()]].concat();
    let round_trips = |ids: &[u32]| opt.prompt_ids(&opt.prompt_text(ids).unwrap()).unwrap() == ids;
    let plain = opt.prompt_ids("Add them").unwrap();
    assert_eq!(grown(&plain), [&plain[..], &[underscore]].concat());
    let ending_in_underscore = [&plain[..], &[underscore]].concat();
    assert!(round_trips(&ending_in_underscore));
    assert!(!round_trips(&[&ending_in_underscore[..], &[underscore]].concat()), "`__` merges");
    let next = grown(&ending_in_underscore);
    assert_ne!(next.last(), Some(&underscore));
    assert!(round_trips(&next), "{:?}", opt.prompt_text(&next));
}

/// SmolLM2 steps from the same states with the full check and with `race`: the same token
/// chosen each time, fewer tokens decoded in all.
#[test]
fn a_raced_check_chooses_the_full_checks_token_at_less_decoding() {
    let lm = common::smollm2();
    let (task, split) = arithmetic(12);
    let train = Split::pick(&split.train, &task);
    let (mut full_tokens, mut raced_tokens, mut out) = (0, 0, 0);
    for (accept, steps) in [(Accept::NotWorse, 2), (Accept::Margin(1), 1)] {
        let full = OptimizeConfig {
            max_reasoning: 48,
            shortlist: 6,
            precision: Precision::F32,
            accept,
            ..OptimizeConfig::default()
        };
        let raced = OptimizeConfig { race: true, ..full.clone() };
        let a = Optimizer::new(lm, &task, &train, &full, no_interrupt()).unwrap();
        let b = Optimizer::new(lm, &task, &train, &raced, no_interrupt()).unwrap();
        let mut state =
            a.initial_state(&["proper logical reasoning and think step by step."]).unwrap();
        for _ in 0..steps {
            let (mut sa, mut sb) = (state.clone(), state.clone());
            let (ra, rb) = (a.step(&mut sa).unwrap(), b.step(&mut sb).unwrap());
            let (ta, tb) = (ra.token().unwrap(), rb.token().unwrap());
            assert_eq!(tb.chosen, ta.chosen, "{accept}: step {}", ra.step);
            assert_eq!((&sb.prompt, sb.position), (&sa.prompt, sa.position), "{accept}");
            assert_eq!(sb.best_prompt, sa.best_prompt, "{accept}");
            for (c, full) in tb.checked.iter().zip(&ta.checked) {
                match c.raced_out_after {
                    None => assert_eq!(c.score.mistakes, full.score.mistakes),
                    Some(seen) => {
                        assert!(seen < 12 && c.score.n == seen, "{c:?}");
                        assert!(c.score.mistakes <= full.score.mistakes);
                        out += 1;
                    }
                }
            }
            full_tokens += ra.generated_tokens;
            raced_tokens += rb.generated_tokens;
            state = sa;
        }
    }
    assert!(
        out > 0 && raced_tokens < full_tokens,
        "{out} out: {raced_tokens} against {full_tokens}"
    );
}

#[test]
fn mistakes_read_with_the_reasonings_cut_when_they_were_counted() {
    let counted = Score {
        score: 0.5,
        mistakes: 13,
        cut: Some(2),
        n: 30,
        nll: 1.0,
        answer_nll: 0.0,
        reasoning_tokens: Some(239.6),
    };
    assert_eq!(counted.mistakes_text(), "13/30 wrong, 2 cut, 240 tokens a reasoning");
    let old = Score { cut: None, reasoning_tokens: None, ..counted };
    assert_eq!(old.mistakes_text(), "13/30 wrong");
}

// ---- Choosing the returned prompt on dev ----

fn score(score: f64) -> Score {
    Score { score, mistakes: 0, cut: None, n: 1, nll: 0.0, answer_nll: 0.0, reasoning_tokens: None }
}

#[test]
fn the_returned_prompt_is_the_dev_argmax_and_only_dev_questions_are_measured() {
    let (task, split) = arithmetic(3);
    let dev = Split::pick(&split.dev, &task);
    let test = Split::pick(&split.test, &task);
    let contender = |label: Label, train: f64| Contender {
        label,
        prompt: format!("{label} prompt"),
        train: score(train),
        dev: None,
    };
    let mut contenders = vec![
        contender(Label::ZeroShotCot, 0.5),
        contender(Label::Initial, 0.6),
        contender(Label::Train(1), 0.1),
        contender(Label::Train(2), 0.2),
        contender(Label::Train(3), 0.3),
    ];
    let dev_accuracy = |label: Label| match label {
        Label::Train(2) | Label::Train(3) => 0.75,
        Label::Train(1) => 0.25,
        _ => 0.5,
    };
    let mut seen = Vec::new();
    let chosen = choose_on_dev(&mut contenders, &dev, &mut |c, examples| {
        seen.extend(examples.iter().map(|e| e.question.clone()));
        Ok(EvalSummary {
            label: c.label,
            prompt: c.prompt.clone(),
            accuracy: dev_accuracy(c.label),
            correct: 0,
            n: examples.len(),
            interval: (0.0, 1.0),
            seconds: 0.0,
            cut_by_budget: Some(0),
            unparsed: Some(0),
        })
    })
    .unwrap();
    // train #2 and #3 tie on dev; #2 has the better train score. The best train score (#1) loses.
    assert_eq!(contenders[chosen].label, Label::Train(2));
    assert!(contenders.iter().all(|c| c.dev.is_some()));
    assert_eq!(seen.len(), 5 * dev.len());
    assert!(seen.iter().all(|q| dev.iter().any(|d| &d.question == q)));
    assert!(seen.iter().all(|q| test.iter().all(|t| &t.question != q)));
    // Without dev questions the lowest train score is returned.
    let mut no_dev = contenders.clone();
    for c in no_dev.iter_mut() {
        c.dev = None;
    }
    let chosen = choose_on_dev(&mut no_dev, &[], &mut |_, _| unreachable!()).unwrap();
    assert_eq!(no_dev[chosen].label, Label::Train(1));
}

/// Question records q0, q1, ... with `bits`' outcomes ('1' right).
fn outcomes(bits: &str) -> Vec<Record> {
    let record = |i: usize, correct: bool| Record {
        question: format!("q{i}"),
        prompt: String::new(),
        reasoning: String::new(),
        reasoning_tokens: 0,
        cut_by_budget: false,
        raw_answer: String::new(),
        parsed_answer: None,
        gold: String::new(),
        correct,
    };
    bits.chars().enumerate().map(|(i, b)| record(i, b == '1')).collect()
}

#[test]
fn paired_counts_the_questions_only_one_prompt_got_right_with_the_exact_mcnemar_p() {
    // Twice the Binomial(b + c, 1/2) tail, summed in exact fractions (Python) and rounded.
    for (b, c, p) in [
        (19, 24, 0.542384011856484),
        (10, 0, 0.001953125),
        (1, 9, 0.021484375),
        (30, 10, 0.0022214337732293643),
        (1000, 1200, 2.1817026407914712e-05),
        (0, 0, 1.0),
        (3, 2, 1.0),
        (1500, 1500, 1.0),
    ] {
        for (x, y) in [(b, c), (c, b)] {
            let got = mcnemar_exact(x, y);
            assert!((got - p).abs() <= 1e-9 * p, "{x} / {y}: {got} against {p}");
        }
    }
    let got = paired(&outcomes("1101100111"), &outcomes("1000101100")).unwrap();
    assert_eq!(got, Paired { n: 10, only_first: 4, only_second: 1, p_value: mcnemar_exact(4, 1) });
    assert_eq!(got.text(), "4 / 1 (p 0.38)");
    let mut reordered = outcomes("1000101100");
    reordered.swap(0, 1);
    assert!(paired(&outcomes("1101100111"), &reordered).is_err());
    assert!(paired(&outcomes("11"), &outcomes("1")).is_err());
}

/// A run's paired counts come from the records each evaluation was measured with: a returned
/// baseline's from the baseline's file, another run's returned prompt from that run's folder.
#[test]
fn paired_test_reads_the_records_each_evaluation_was_measured_with() {
    use greater::eval::EvalReport;
    use greater::store::RunDir;
    let tmp = tempfile::tempdir().unwrap();
    let folder = |name: &str| RunDir::folder(&tmp.path().join(name)).unwrap();
    let keep = |dir: &RunDir, label: Label, prompt: &str, bits: &str| {
        let records = outcomes(bits);
        let correct = records.iter().filter(|r| r.correct).count();
        let report = EvalReport {
            n: records.len(),
            correct,
            accuracy: correct as f64 / records.len() as f64,
            interval: (0.0, 1.0),
            majority_floor: 0.0,
            chance: 0.0,
            cut_by_budget: 0,
            unparsed: 0,
            resumed: 0,
            tokens_generated: 0,
            seconds: 0.0,
            records,
        };
        dir.evaluation("test", label, prompt, |_| Ok(report)).unwrap()
    };
    let counts = |p: Option<Paired>| p.map(|p| (p.only_first, p.only_second, p.n));
    // Run a returned a searched prompt.
    let a = folder("a");
    let searched = vec![
        keep(&a, Label::ZeroShotCot, "zero-shot", "1100"),
        keep(&a, Label::Initial, "initial", "0110"),
        keep(&a, Label::Optimised, "searched", "0111"),
    ];
    assert_eq!(counts(a.paired_test(&searched, None).unwrap()), Some((2, 1, 4)));
    // Run b returned its initial prompt, whose evaluation its returned prompt reused.
    let b = folder("b");
    let initial = keep(&b, Label::Initial, "initial", "0110");
    let returned_initial = vec![
        keep(&b, Label::ZeroShotCot, "zero-shot", "1100"),
        initial.clone(),
        EvalSummary { label: Label::Optimised, ..initial },
    ];
    assert!(!b.path.join("test-optimised.jsonl").exists());
    assert_eq!(counts(b.paired_test(&returned_initial, None).unwrap()), Some((1, 1, 4)));
    // a's returned prompt against b's.
    let against_b = a.paired_test(&searched, Some((&b, &returned_initial))).unwrap();
    assert_eq!(counts(against_b), Some((1, 0, 4)));
    // No records, no counts.
    assert_eq!(folder("c").paired_test(&searched, None).unwrap(), None);
}

/// Each test question's correctness under `label`'s prompt in a run folder; the returned
/// prompt, when it is a baseline, was measured once, under the baseline's label.
fn test_correct(run: &Path, label: Label, selected: Label) -> Vec<bool> {
    let returned = label == Label::Optimised && selected.is_baseline();
    let stem = if returned { selected.file_stem() } else { label.file_stem() };
    std::fs::read_to_string(run.join(format!("test-{stem}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["correct"] == true)
        .collect()
}

/// (questions only `a` got right, questions only `b` got right).
fn only_right(a: &[bool], b: &[bool]) -> (usize, usize) {
    let only = |a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| **x && !**y).count();
    (only(a, b), only(b, a))
}

/// The returned prompt against zero-shot CoT, counted from the run's test records.
fn paired_from_records(run: &Path, selected: Label) -> (usize, usize) {
    only_right(
        &test_correct(run, Label::Optimised, selected),
        &test_correct(run, Label::ZeroShotCot, selected),
    )
}

#[test]
fn a_run_with_a_dev_split_returns_its_dev_choice_and_measures_test_three_times() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    run_quietly(Start::New(OptimizeConfig { dev: 3, ..tiny_settings(&model, 3) }), &out);
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let chosen = summary.contenders.iter().find(|c| c.label == summary.selected).unwrap();
    let best_dev =
        summary.contenders.iter().map(|c| c.dev.as_ref().unwrap().accuracy).fold(0.0, f64::max);
    assert_eq!(chosen.dev.as_ref().unwrap().accuracy, best_dev);
    assert_eq!(summary.best_prompt, chosen.prompt);
    assert_eq!(std::fs::read_to_string(out.join("best_prompt.txt")).unwrap(), chosen.prompt);
    assert_eq!(summary.contenders[0].prompt, ZERO_SHOT_COT);
    let labels: Vec<Label> = summary.evaluations.iter().map(|e| e.label).collect();
    assert_eq!(labels, [Label::ZeroShotCot, Label::Initial, Label::Optimised]);
    assert_eq!(summary.evaluations[2].prompt, chosen.prompt);
    let p = summary.paired.unwrap();
    assert_eq!((p.only_first, p.only_second), paired_from_records(&out, summary.selected));
    assert_eq!(p.n, summary.evaluations[2].n);

    // `greater eval --prompt-from` evaluates exactly the bytes of best_prompt.txt.
    let records = tmp.path().join("records.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["eval", "--model", model.to_str().unwrap(), "--max-reasoning", "4"])
        .args(["--prompt-from", out.to_str().unwrap(), "--out", records.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let best = std::fs::read_to_string(tmp.path().join("run").join("best_prompt.txt")).unwrap();
    for line in std::fs::read_to_string(&records).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["prompt"].as_str().unwrap(), best);
    }
}

// ---- greater protocol ----

fn protocol_settings(model: &Path) -> OptimizeConfig {
    OptimizeConfig { dev: 2, ..tiny_settings(model, 2) }
}

#[test]
fn a_protocol_writes_a_run_folder_per_task_and_a_table_of_their_summaries() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("protocol");
    // The transfer target: a second model file.
    let target = tmp.path().join("target.gguf");
    common::write_tiny_gguf(&target, "llama", true, common::byte_vocab(), 256);
    let target = target.display().to_string();
    let config = ProtocolConfig {
        settings: protocol_settings(&model),
        tasks: vec!["arithmetic".into(), "boolean".into()],
        transfer_to: Some(target.clone()),
        methods: Vec::new(),
        baseline_tasks: None,
    };
    let (table, _) =
        app::protocol(Start::New(config), &out, Shard::ALL, &no_interrupt(), &mut |_| {}).unwrap();
    assert_eq!(table.rows.len(), 2);
    // Transfer: the returned prompt (and zero-shot CoT) on the same test questions of the
    // second model, kept in the task's folder.
    for row in &table.rows {
        let t = row.transfer.as_ref().unwrap();
        assert_eq!(t.model, target);
        assert_eq!(t.optimised.prompt, row.optimised.prompt);
        assert_eq!(t.zero_shot_cot.prompt, ZERO_SHOT_COT);
        assert_eq!((t.optimised.n, t.zero_shot_cot.n), (row.optimised.n, row.optimised.n));
        // Question by question on the target: the counts only one prompt got right differ
        // by the difference of the two prompts' right answers.
        let p = t.paired.unwrap();
        assert_eq!(p.n, row.optimised.n);
        assert_eq!(
            p.only_first as i64 - p.only_second as i64,
            t.optimised.correct as i64 - t.zero_shot_cot.correct as i64
        );
        assert!(out.join(&row.task).join("transfer-target.json").exists());
    }
    for row in &table.rows {
        let summary: Summary = serde_json::from_str(
            &std::fs::read_to_string(out.join(&row.task).join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            [&row.zero_shot_cot, &row.initial, &row.optimised].map(|e| e.clone()).to_vec(),
            summary.evaluations
        );
        assert_eq!(row.steps, summary.steps);
        assert_eq!(row.paired, summary.paired);
        assert!(md_has_paired(&out, row), "{}", row.task);
        // The search trace starts from the initial prompt's train mistakes.
        let search = row.search.as_ref().unwrap();
        let initial = summary.contenders.iter().find(|c| c.label == Label::Initial).unwrap();
        assert_eq!(
            (search.start_mistakes, search.train_n),
            (initial.train.mistakes, initial.train.n)
        );
        assert!(
            search.fewest_mistakes <= search.start_mistakes && search.improving_steps <= row.steps
        );
    }
    let written: ProtocolTable =
        serde_json::from_str(&std::fs::read_to_string(out.join("protocol.json")).unwrap()).unwrap();
    assert_eq!(written, table);
    let gains: Vec<f64> =
        table.rows.iter().map(|r| r.optimised.accuracy - r.zero_shot_cot.accuracy).collect();
    assert!((table.mean_gain - (gains[0] + gains[1]) / 2.0).abs() < 1e-12);
    let md = std::fs::read_to_string(out.join("protocol.md")).unwrap();
    for row in &table.rows {
        assert!(
            md.contains(&format!("| {} | {:.3} [", row.task, row.zero_shot_cot.accuracy)),
            "{md}"
        );
        let t = row.transfer.as_ref().unwrap();
        let cells = |e: &EvalSummary| {
            format!("{:.3} [{:.3}, {:.3}]", e.accuracy, e.interval.0, e.interval.1)
        };
        assert!(
            md.contains(&format!("| {} | {} |", cells(&t.zero_shot_cot), cells(&t.optimised))),
            "{md}"
        );
        let cut: usize = [&row.zero_shot_cot, &row.initial, &row.optimised]
            .iter()
            .map(|e| e.cut_by_budget.unwrap())
            .sum();
        assert!(md.contains(&format!(" {} {cut}/{}", row.task, 3 * row.optimised.n)), "{md}");
        let on_target = format!(
            "On `{target}`, test questions right only with the optimised prompt / only with \
             zero-shot CoT (exact McNemar p): "
        );
        let line = md.lines().find(|l| l.starts_with(&on_target)).expect(&md);
        assert!(line.contains(&format!("{} {}", row.task, t.paired.unwrap().text())), "{md}");
        let s = row.search.as_ref().unwrap();
        let trace = format!(
            "| {} | {} -> {} of {} | {} of {} |",
            row.task, s.start_mistakes, s.fewest_mistakes, s.train_n, s.improving_steps, row.steps
        );
        assert!(md.contains(&trace), "{md}");
    }
    // The protocol's report: every task's three accuracies with intervals, a link to its
    // run's report, the pooled accuracies.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_no_url(&html);
    for row in &table.rows {
        for e in [&row.zero_shot_cot, &row.initial, &row.optimised] {
            assert!(html.contains(&accuracy_text(e)), "{}: {}", row.task, accuracy_text(e));
        }
        // (minijinja escapes "/" as "&#x2f;" in HTML; the browser reads both alike)
        let link =
            ["/", "&#x2f;"].map(|slash| format!("href=\".{slash}{}{slash}report.html\"", row.task));
        assert!(link.iter().any(|l| html.contains(l)), "no link to {}'s report", row.task);
        assert!(out.join(&row.task).join("report.html").exists());
        let t = row.transfer.as_ref().unwrap();
        assert!(
            html.contains(&accuracy_text(&t.optimised))
                && html.contains(&accuracy_text(&t.zero_shot_cot))
        );
    }
    let pooled = &table.optimised;
    assert!(html.contains(&format!(
        "{:.3} [{:.3}, {:.3}]",
        pooled.accuracy, pooled.interval.0, pooled.interval.1
    )));
}

/// Whether protocol.md shows the row's paired counts (and the run folder's records agree).
fn md_has_paired(out: &Path, row: &TaskRow) -> bool {
    let md = std::fs::read_to_string(out.join("protocol.md")).unwrap();
    let p = row.paired.unwrap();
    (p.only_first, p.only_second) == paired_from_records(&out.join(&row.task), row.selected)
        && md.contains(&format!("| {} |", p.text()))
}

fn accuracy_text(e: &EvalSummary) -> String {
    format!(
        "{:.3} [{:.3}, {:.3}] ({} of {})",
        e.accuracy, e.interval.0, e.interval.1, e.correct, e.n
    )
}

/// A report opens from disk: no address of any kind, inline SVG without a namespace URL.
#[test]
fn every_subcommands_json_is_one_json_document_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    run_quietly(Start::New(tiny_settings(&model, 1)), &out);
    let m = model.to_str().unwrap();
    let report = tmp.path().join("page.html");
    let commands: [&[&str]; 5] = [
        &["tasks"],
        &["models"],
        &["report", out.to_str().unwrap(), "--out", report.to_str().unwrap()],
        &["generate", "-m", m, "-p", "hi", "--max-reasoning", "2"],
        &["export", out.to_str().unwrap(), "--to", "jinja"],
    ];
    let mut documents = Vec::new();
    for args in commands {
        let (code, stdout, stderr) = greater_cli(&[&["--json"], args].concat());
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        let doc: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON document ({e}): {stdout}"));
        documents.push(doc);
    }
    assert!(documents[0].as_array().unwrap().iter().any(|t| t["task"] == "arithmetic"));
    assert!(documents[1].as_array().unwrap().iter().any(|e| e["alias"] == "smollm2-135m"));
    assert_eq!(documents[2]["report"], report.canonicalize().unwrap().to_str().unwrap());
    assert!(documents[3]["reply"].is_string());
    let best = std::fs::read_to_string(out.join("best_prompt.txt")).unwrap();
    let file = documents[4]["file"].as_str().unwrap();
    assert!(file.contains(&format!("after_question = \". Use {best}\"")), "{file}");
}

#[test]
fn report_links_cannot_be_read_as_a_scheme_and_hidden_characters_show() {
    use greater::report::{page_link, visible};
    let out = Path::new("/runs/p");
    let cases = [
        (out, "javascript:alert(1);x", "./javascript%3Aalert%281%29%3Bx/report.html"),
        (out, "https:evil.com", "./https%3Aevil.com/report.html"),
        (out, "plain_task", "./plain_task/report.html"),
        (Path::new("/runs/p/pages"), "https:evil.com", "../https%3Aevil.com/report.html"),
    ];
    for (from, folder, expected) in cases {
        let link = page_link(from, &out.join(folder).join("report.html"));
        assert_eq!(link, expected);
        // A URL's scheme is letters, digits, "+", "-" and "." before the first ":"; a path
        // whose first segment is "." or ".." has none.
        let first = link.split('/').next().unwrap();
        assert!(first == "." || first == "..", "{link}");
        assert!(!link.contains(':'), "{link}");
    }
    assert_eq!(visible("a\u{202E}b\0c\n\td"), "a[U+202E]b[U+0000]c\n\td");
    assert_eq!(visible("\u{2066}x\u{2069}"), "[U+2066]x[U+2069]");
    assert_eq!(visible("plain text"), "plain text");
}

fn assert_no_url(html: &str) {
    assert!(
        !html.contains("http:") && !html.contains("https:") && !html.contains("//"),
        "the report holds a URL"
    );
}

#[test]
fn the_report_shows_the_summary_accuracies_and_one_point_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    run_quietly(Start::New(OptimizeConfig { dev: 3, ..tiny_settings(&model, 4) }), &out);
    let written = tmp.path().join("elsewhere.html");
    let status = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["report", out.to_str().unwrap(), "--out", written.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let html = std::fs::read_to_string(&written).unwrap();
    // A page that runs no script, loads nothing and posts nowhere, whatever it holds.
    assert!(
        html.contains(r#"<meta http-equiv="Content-Security-Policy" content="default-src 'none';"#)
            && !html.contains("<script"),
        "{html}"
    );
    // The run wrote the same report itself.
    assert_eq!(html, std::fs::read_to_string(out.join("report.html")).unwrap());
    assert_no_url(&html);
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for e in
        summary.evaluations.iter().chain(summary.contenders.iter().filter_map(|c| c.dev.as_ref()))
    {
        assert!(html.contains(&accuracy_text(e)), "missing {}: {}", e.label, accuracy_text(e));
    }
    // The optimisation curve: one dot per step.
    let curve = &html[html.find("id=\"figure-1\"").unwrap()..html.find("id=\"figure-2\"").unwrap()];
    assert_eq!(curve.matches("<circle").count(), 4);
    assert_eq!(html.matches("<mark>").count(), 4);
}

#[test]
fn a_protocol_killed_at_several_points_resumes_to_the_uninterrupted_table() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let config = tmp.path().join("run.toml");
    // Long enough that a kill lands before the end.
    let settings = OptimizeConfig { steps: 40, ..protocol_settings(&model) };
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let protocol = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_greater"));
        c.args(["protocol", "--config", config.to_str().unwrap(), "--tasks", "arithmetic,boolean"])
            .args(["--out", out.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let whole = tmp.path().join("whole");
    assert!(protocol(&whole).status().unwrap().success());
    // Kill points, each a file that has just appeared: the first task's split written, its
    // first step logged, its summary written, the second task's first step logged.
    let points = [
        "arithmetic/config.json",
        "arithmetic/steps.jsonl",
        "arithmetic/summary.json",
        "boolean/steps.jsonl",
    ];
    for (i, point) in points.iter().enumerate() {
        let out = tmp.path().join(format!("killed{i}"));
        let mut child = protocol(&out).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !out.join(point).exists() {
            assert!(std::time::Instant::now() < deadline, "{point} never appeared");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!out.join("boolean/summary.json").exists(), "killed at {point} after the end");
        let (code, _, err) = greater_cli(&["protocol", "--resume", out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "killed at {point}: {err}");
        assert_eq!(table_without_timings(&out), table_without_timings(&whole), "killed at {point}");
    }
}

/// Each step of a fixed-seed SmolLM2 run as one line: position, the shortlist in gradient
/// order with each checked prompt's mistakes, the chosen token, the prompt after the step.
fn decisions(dir: &Path) -> Vec<String> {
    steps_without_timings(dir)
        .iter()
        .map(|r| {
            let checked: Vec<String> =
                tok(r).checked.iter().map(|c| format!("{}:{}", c.id, c.score.mistakes)).collect();
            let chosen = tok(r).chosen.as_ref().map(|c| c.id);
            format!("{} [{}] {chosen:?} {:?}", tok(r).position, checked.join(" "), r.prompt)
        })
        .collect()
}

/// Recorded with commit fec5889, before the speed work: faster kernels, batching and
/// reused reasoning must take the same decisions.
const RECORDED_DECISIONS: [&str; 4] = [
    "0 [750:3 540:3 354:2] Some(354) \"an logical reasoning and think step by step. Finally give the actual correct answer.\"",
    "1 [3212:2 26850:2 7964:2] Some(26850) \"an algebraic reasoning and think step by step. Finally give the actual correct answer.\"",
    "2 [3564:3 1341:3 2424:2] Some(2424) \"an algebraic approach and think step by step. Finally give the actual correct answer.\"",
    "3 [2489:2 638:2 702:2] Some(702) \"an algebraic approach like think step by step. Finally give the actual correct answer.\"",
];

#[test]
fn a_fixed_seed_smollm2_run_takes_the_recorded_decisions() {
    let tmp = tempfile::tempdir().unwrap();
    let settings = OptimizeConfig {
        model: "smollm2-135m".into(),
        task: "arithmetic".into(),
        difficulty: 1,
        train: 3,
        dev: 0,
        test: Count::N(2),
        steps: 4,
        max_reasoning: 24,
        precision: Precision::F32,
        start: StartFrom::Initial,
        system: SystemTurn::Template,
        ..OptimizeConfig::default()
    };
    let out = tmp.path().join("run");
    run_quietly(Start::New(settings), &out);
    assert_eq!(decisions(&out), RECORDED_DECISIONS);
}

// ---- Baselines: ape and gcg ----

#[test]
fn ape_reads_the_instruction_from_the_first_line_of_the_reply() {
    assert_eq!(
        instruction_from_reply(" careful counting of every item.\nThen more"),
        "careful counting of every item."
    );
    assert_eq!(instruction_from_reply("\n\n\"Think it through.\" "), "Think it through.");
    assert_eq!(instruction_from_reply("  \n"), "");
    assert_eq!(
        proposal_request(&[("1 + 2 = ?", "3"), ("Is 4 even?", "Yes")], reply_start(". Use")),
        "Here are some questions, each with its correct answer.\n\n\
         Question: 1 + 2 = ?\nAnswer: 3\n\nQuestion: Is 4 even?\nAnswer: Yes\n\n\
         Write one sentence of advice for solving questions like these. Start it with \"Use\"."
    );
    assert!(proposal_request(&[], reply_start("")).ends_with("like these."));
}

fn ape_settings(model: &Path, seed: u64, budget: usize) -> OptimizeConfig {
    OptimizeConfig {
        method: Method::Ape,
        seed,
        budget_tokens: Some(budget),
        ..tiny_settings(model, 2)
    }
}

/// The instructions proposed in each round, in order.
fn proposals(dir: &Path) -> Vec<Vec<String>> {
    steps_without_timings(dir)
        .iter()
        .map(|r| r.scored().iter().map(|(p, _)| p.to_string()).collect())
        .collect()
}

#[test]
fn an_ape_round_logged_as_a_token_step_reads_as_a_round() {
    // An `ape` round as logs kept it before rounds had a record of their own: a token step
    // with no candidates, its instructions checked without a token or a gradient.
    let line = r#"{"step":1,"position":0,"prompt_before":"Go on.","candidates":[],"checked":[{"id":0,"text":"","gradient":null,"prompt":"Add them.","score":{"score":0.5,"mistakes":1,"n":2,"nll":1.0,"answer_nll":0.0}}],"chosen":null,"prompt":"Add them.","next_position":0,"best_prompt":"Add them.","best_score":0.5,"seconds":{"reasoning":0.0,"proposal":1.0,"gradient":0.0,"checking":2.0},"generated_tokens":40}"#;
    let r: StepRecord = serde_json::from_str(line).unwrap();
    let Search::Round { proposals } = &r.search else { panic!("{r:?} is not a round") };
    assert_eq!(proposals.len(), 1);
    assert_eq!((proposals[0].prompt.as_str(), proposals[0].score.mistakes), ("Add them.", 1));
    assert_eq!((r.step, r.best_score, r.generated_tokens), (1, 0.5, 40));
    // Written in today's layout, it reads back the same.
    let today = serde_json::to_string(&r).unwrap();
    assert!(today.contains(r#""proposals":"#) && !today.contains("candidates"), "{today}");
    assert_eq!(serde_json::from_str::<StepRecord>(&today).unwrap(), r);
}

#[test]
fn ape_with_a_fixed_seed_proposes_the_same_instructions_and_stops_at_its_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let budget = 300;
    let [a, b, c] = ["a", "b", "c"].map(|n| tmp.path().join(n));
    run_quietly(Start::New(ape_settings(&model, 7, budget)), &a);
    run_quietly(Start::New(ape_settings(&model, 7, budget)), &b);
    run_quietly(Start::New(ape_settings(&model, 8, budget)), &c);
    assert_eq!(steps_without_timings(&a), steps_without_timings(&b));
    assert_ne!(proposals(&a), proposals(&c), "the seed draws the demonstrations and the samples");
    let rounds = steps_without_timings(&a);
    assert!(rounds.len() >= 2, "a 300-token budget takes more than one round");
    // Every line is a round of scored instructions.
    for r in &rounds {
        let Search::Round { proposals } = &r.search else { panic!("{r:?} is not a round") };
        assert!(proposals.len() <= PROPOSALS_PER_ROUND);
        assert!(proposals.iter().all(|p| !p.prompt.is_empty() && p.score.n == 3));
    }
    // It stops at the first round that reaches the budget: the tokens before it were below.
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    let last = rounds.last().unwrap().generated_tokens;
    assert!(
        summary.generated_tokens >= budget && summary.generated_tokens - last < budget,
        "{} {last}",
        summary.generated_tokens
    );
    assert_eq!(summary.budget_tokens, Some(budget));
    let initial: usize =
        summary.generated_tokens - rounds.iter().map(|r| r.generated_tokens).sum::<usize>();
    assert!(
        initial > 0 && initial <= 3 * 5,
        "the initial prompt's reasoning on 3 questions counts too"
    );
}

#[test]
fn ape_then_greater_refines_apes_best_and_spends_no_more_than_the_budget_in_total() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let budget = 400;
    let out = tmp.path().join("run");
    let settings = OptimizeConfig { method: Method::ApeGreater, ..ape_settings(&model, 7, budget) };
    run_quietly(Start::New(settings), &out);
    let steps = steps_without_timings(&out);
    let first_token = steps.iter().position(|r| r.token().is_some()).expect("a token step");
    assert!(first_token > 0, "APE's rounds come first");
    assert!(steps[..first_token].iter().all(|r| matches!(r.search, Search::Round { .. })));
    assert!(steps[first_token..].iter().all(|r| r.token().is_some()), "then only token steps");
    // The token search starts from the best instruction APE found, at its first position.
    assert_eq!(steps[first_token].prompt_before, steps[first_token - 1].best_prompt);
    assert_eq!(tok(&steps[first_token]).position, 0);
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.budget_tokens, Some(budget));
    assert!(summary.generated_tokens <= budget, "spent {}", summary.generated_tokens);
    // APE had half of it: its rounds stop once they reach 200 tokens.
    let before_tokens: usize = summary.generated_tokens
        - steps[first_token..].iter().map(|r| r.generated_tokens).sum::<usize>();
    assert!(before_tokens >= budget / 2, "APE's stage spent {before_tokens}");
    let (code, help, _) = greater_cli(&["optimize", "--help"]);
    assert_eq!(code, Some(0));
    assert!(help.contains("ape+greater"), "{help}");
}

#[test]
fn gcg_scores_the_answer_right_after_the_prompt_with_no_reasoning_span() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = open_quietly(&tiny_model(tmp.path()));
    let (task, split) = arithmetic(3);
    let train = Split::pick(&split.train, &task);
    let layout = Layout::new(&lm, &task, &Default::default(), ". Use").unwrap();
    for method in [Method::Greater, Method::Gcg] {
        let cfg = OptimizeConfig {
            model: String::new(),
            method,
            max_reasoning: 5,
            ..OptimizeConfig::default()
        };
        let opt = Optimizer::new(&lm, &task, &train, &cfg, no_interrupt()).unwrap();
        let prompt = opt.prompt_ids("Go on.").unwrap();
        let (reasoning, _) = opt.reason_and_score(&prompt).unwrap();
        for (e, ex) in train.iter().enumerate() {
            let answer = [layout.extractor(), &layout.answer_ids(&ex.target).unwrap()].concat();
            let ids = opt.scored_ids(e, &prompt, &reasoning[e]);
            let user = opt.user_ids(e, &prompt).unwrap();
            assert_eq!(&ids[..user.len()], user.as_slice());
            let between = &ids[user.len()..ids.len() - answer.len()];
            assert_eq!(&ids[ids.len() - answer.len()..], answer.as_slice());
            if method == Method::Gcg {
                assert!(between.is_empty(), "gcg: the answer follows the user turn");
            } else {
                assert!(!between.is_empty(), "greater reasons before the answer");
                assert_eq!(between, reasoning[e].as_slice());
            }
        }
    }
}

#[test]
fn a_protocol_of_three_methods_adds_a_column_each_and_gives_ape_greaters_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("protocol");
    let config = ProtocolConfig {
        settings: protocol_settings(&model),
        tasks: vec!["arithmetic".into()],
        transfer_to: None,
        methods: vec![Method::Greater, Method::Ape, Method::Gcg],
        baseline_tasks: None,
    };
    let (table, _) =
        app::protocol(Start::New(config), &out, Shard::ALL, &no_interrupt(), &mut |_| {}).unwrap();
    let row = &table.rows[0];
    assert_eq!(
        row.baselines.iter().map(|b| b.method).collect::<Vec<_>>(),
        [Method::Ape, Method::Gcg]
    );
    let read = |folder: &str| -> Summary {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(folder).join("summary.json")).unwrap(),
        )
        .unwrap()
    };
    let (greater, ape, gcg) = (read("arithmetic"), read("arithmetic-ape"), read("arithmetic-gcg"));
    assert_eq!(ape.budget_tokens, Some(greater.generated_tokens));
    assert!(ape.generated_tokens >= greater.generated_tokens);
    assert_eq!(gcg.generated_tokens, 0, "gcg decodes no reasoning in its search");
    for (b, s) in row.baselines.iter().zip([&ape, &gcg]) {
        assert_eq!(&b.optimised, &s.evaluations[2]);
        // Zero-shot CoT and the initial prompt: the same measurement in every method's run.
        assert_eq!(s.evaluations[..2], greater.evaluations[..2]);
    }
    let md = std::fs::read_to_string(out.join("protocol.md")).unwrap();
    let cells =
        |e: &EvalSummary| format!("{:.3} [{:.3}, {:.3}]", e.accuracy, e.interval.0, e.interval.1);
    let columns = format!(
        "| {} | {} | {} |",
        cells(&row.optimised),
        cells(&row.baselines[0].optimised),
        cells(&row.baselines[1].optimised)
    );
    assert!(md.contains("| optimised (greater) | ape | gcg |") && md.contains(&columns), "{md}");
    assert!(md.contains("Mean gain of ape over zero-shot CoT"), "{md}");
    // greater's returned prompt against each baseline's, counted from the two folders' records.
    let returned =
        |folder: &str, s: &Summary| test_correct(&out.join(folder), Label::Optimised, s.selected);
    for ((b, folder), s) in
        row.baselines.iter().zip(["arithmetic-ape", "arithmetic-gcg"]).zip([&ape, &gcg])
    {
        let p = b.first_against.unwrap();
        let counted = only_right(&returned("arithmetic", &greater), &returned(folder, s));
        assert_eq!((p.only_first, p.only_second), counted);
        let line = format!(
            "test questions right only with greater / only with {} (exact McNemar p): arithmetic {}",
            b.method.name(),
            p.text()
        );
        assert!(md.contains(&line), "{md}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for b in &row.baselines {
        assert!(html.contains(&accuracy_text(&b.optimised)));
    }
    for b in &table.baselines {
        assert!(html.contains(&format!(
            "Mean gain of {} over zero-shot CoT: {:+.3}",
            b.method.name(),
            b.mean_gain
        )));
    }
}

/// Every setting's value in the reference implementation (`../shared/docs/greater-method.md`),
/// or None for the settings that describe the run rather than the method (model, data,
/// split, batch), which a preset leaves at their defaults.
const REFERENCE_SETTINGS: &[(&str, Option<&str>)] = &[
    ("model", None),
    ("task", None),
    ("data_dir", None),
    ("seed", None),
    ("difficulty", None),
    ("train", Some("50")),
    ("dev", Some("0")),
    ("test", None),
    ("steps", Some("100")),
    ("patience", Some("0")),
    ("top_k", Some("40")),
    ("top_q", Some("6")),
    ("subset_size", Some("5")),
    ("shortlist", Some("3")),
    ("temperature", Some("0.2")),
    ("control_weight", Some("0.2")),
    ("initial_prompt", None),
    ("max_reasoning", Some("1024")),
    ("eval_batch", None),
    ("chat_template", None),
    ("connector", Some("\". Use\"")),
    ("system", Some("\"none\"")),
    ("extractor_options", Some("\"reference\"")),
    ("keep_current", Some("true")),
    ("sentence_end_rule", Some("true")),
    ("filler", Some("\"underscore\"")),
    ("gradient_sum", Some("\"raw\"")),
    ("vocabulary", Some("\"reference\"")),
    ("accept", Some("\"always\"")),
    ("dev_candidates", Some("4")),
    ("answer_weight", Some("0.0")),
    ("cut_is_mistake", Some("false")),
    ("restart_below", Some("0.12")),
    ("train_batch", None),
    ("race", Some("false")),
    ("dev_patience", Some("0")),
    ("dev_every", None),
    ("stop_dev", None),
    ("start", Some("\"initial\"")),
    ("method", Some("\"greater\"")),
    ("budget_tokens", None),
    ("precision", Some("\"f32\"")),
];

#[test]
fn the_reference_preset_sets_every_method_setting_to_the_reference_value() {
    let preset = serde_json::to_value(OptimizeConfig::reference()).unwrap();
    let defaults = serde_json::to_value(OptimizeConfig::default()).unwrap();
    let keys: Vec<&String> = preset.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), REFERENCE_SETTINGS.len(), "every setting is in the table: {keys:?}");
    for (key, reference) in REFERENCE_SETTINGS {
        let got = &preset[key];
        match reference {
            Some(value) => {
                assert_eq!(got, &serde_json::from_str::<serde_json::Value>(value).unwrap(), "{key}")
            }
            None => assert_eq!(got, &defaults[key], "{key} is not a method setting"),
        }
    }
    // A config file over the preset changes only the keys it names.
    let over = OptimizeConfig::reference().with_toml("max_reasoning = 256\n").unwrap();
    assert_eq!(over, OptimizeConfig { max_reasoning: 256, ..OptimizeConfig::reference() });
    let err =
        OptimizeConfig::reference().with_toml("\nmax_reasonin = 256\n").unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("max_reasonin"), "{err}");
}

#[test]
fn settings_no_run_can_use_are_refused_with_their_name() {
    let bad: [(&str, OptimizeConfig); 8] = [
        ("top_k", OptimizeConfig { top_k: 0, ..OptimizeConfig::default() }),
        ("top_q", OptimizeConfig { top_q: 0, ..OptimizeConfig::default() }),
        ("subset_size", OptimizeConfig { subset_size: 0, ..OptimizeConfig::default() }),
        ("shortlist", OptimizeConfig { shortlist: 0, ..OptimizeConfig::default() }),
        ("eval_batch", OptimizeConfig { eval_batch: 0, ..OptimizeConfig::default() }),
        ("temperature", OptimizeConfig { temperature: f64::NAN, ..OptimizeConfig::default() }),
        ("temperature", OptimizeConfig { temperature: 0.0, ..OptimizeConfig::default() }),
        (
            "control_weight",
            OptimizeConfig { control_weight: f64::INFINITY, ..OptimizeConfig::default() },
        ),
    ];
    for (name, settings) in bad {
        let err = settings.validate().unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
    assert!(
        OptimizeConfig::default().validate().is_ok()
            && OptimizeConfig::reference().validate().is_ok()
    );
}

#[test]
fn a_checkpoint_that_cannot_continue_is_refused() {
    let state = |prompt: Vec<u32>, position: usize| greater::records::State {
        step: 1,
        position,
        prompt: prompt.clone(),
        reasoning: Some(vec![vec![1], vec![2]]),
        best_prompt: prompt,
        best_score: 1.0,
        steps_since_best: 0,
        initial_len: 3,
        scores: Default::default(),
        generated_tokens: 0,
        dev_checks: Vec::new(),
        token_search_from: None,
    };
    assert!(state(vec![5, 6, 7], 2).check(2, 8).is_ok());
    let err = |s: greater::records::State, train| s.check(train, 8).unwrap_err().to_string();
    assert_eq!(
        err(state(vec![5, 6, 7], 1_000_000), 2),
        "position 1000000 is outside the prompt of 3 tokens"
    );
    assert_eq!(err(state(vec![], 0), 2), "the prompt is empty");
    assert_eq!(err(state(vec![5, 6, 7], 0), 3), "reasoning for 2 train questions, the run has 3");
    assert_eq!(
        err(state(vec![5, 4_000_000_000, 7], 0), 2),
        "token id 4000000000 is not in the model's vocabulary of 8"
    );
}

#[test]
fn a_checkpoint_without_the_initial_prompts_score_resumes_by_scoring_it_again() {
    // Found by tests/fuzz.rs: a checkpoint whose score keys were edited made the final
    // selection look up the initial prompt's train score and panic.
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    let stop = no_interrupt();
    let first = run(Start::New(tiny_settings(&model, 1)), &out, &stop, &mut |_| {}).unwrap();
    let path = out.join("checkpoint.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(state["scores"].as_object_mut().unwrap().remove("Go on.").is_some());
    std::fs::write(&path, state.to_string()).unwrap();
    let resumed = Start::Resume(Changes { steps: None, data_dir: None });
    let again = run(resumed, &out, &stop, &mut |_| {}).unwrap();
    assert_eq!(again.contenders[1].train, first.contenders[1].train);
}

#[test]
fn a_folder_in_use_is_refused_with_the_holders_pid_and_free_once_released() {
    use greater::store::RunDir;
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::folder(tmp.path()).unwrap();
    let held = dir.lock().unwrap();
    let holder = format!("pid {}", std::process::id());
    let err = dir.lock().err().expect("a second lock is refused").to_string();
    assert!(err.contains("in use by another greater process") && err.contains(&holder), "{err}");
    // A second process writing there stops before it writes anything.
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--task", "arithmetic", "--steps", "1", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("in use") && stderr.contains(&holder),
        "{stderr}"
    );
    assert!(!tmp.path().join("config.json").exists());
    drop(held);
    assert!(dir.lock().is_ok(), "a released lock does not block");
}

#[test]
fn protocol_typos_and_repeats_are_refused_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["protocol", "--tasks", "arithmetic,arithmetc", "--steps", "1", "--out"])
        .arg(tmp.path().join("p"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("task arithmetc"), "{stderr}");
    assert!(!tmp.path().join("p").join("arithmetic").exists(), "no task ran");
    let config = |tasks: &[&str], methods: Vec<Method>| ProtocolConfig {
        settings: OptimizeConfig::default(),
        tasks: tasks.iter().map(|t| t.to_string()).collect(),
        transfer_to: None,
        methods,
        baseline_tasks: None,
    };
    let err =
        config(&["arithmetic", "boolean", "arithmetic"], vec![]).check().unwrap_err().to_string();
    assert!(err.contains("task arithmetic is listed twice"), "{err}");
    let err = config(&["arithmetic"], vec![Method::Greater, Method::Greater])
        .check()
        .unwrap_err()
        .to_string();
    assert!(err.contains("method greater is listed twice"), "{err}");
    assert!(config(&["arithmetic", "boolean"], vec![Method::Greater, Method::Ape]).check().is_ok());
    let baselines_on = |n: usize, methods: Vec<Method>| ProtocolConfig {
        baseline_tasks: Some(n),
        ..config(&["arithmetic", "boolean"], methods)
    };
    let err = baselines_on(3, vec![Method::Greater, Method::Ape]).check().unwrap_err().to_string();
    assert!(err.contains("baseline_tasks is 3: it must be between 1 and the 2 tasks"), "{err}");
    let err = baselines_on(1, vec![Method::Greater]).check().unwrap_err().to_string();
    assert!(err.contains("baseline_tasks needs a second method"), "{err}");
}

#[test]
fn baselines_on_the_first_tasks_run_after_the_first_method_and_are_compared_where_they_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("protocol");
    let config = ProtocolConfig {
        settings: protocol_settings(&model),
        tasks: vec!["arithmetic".into(), "boolean".into()],
        transfer_to: None,
        methods: vec![Method::Greater, Method::Ape],
        baseline_tasks: Some(1),
    };
    let mut order = Vec::new();
    let (table, _) =
        app::protocol(Start::New(config), &out, Shard::ALL, &no_interrupt(), &mut |e| {
            if let ProtocolEvent::Task { index, total, name, .. } = &e {
                order.push((*index, *total, name.to_string()));
            }
        })
        .unwrap();
    // GReaTer on every task first, then APE on the first task only.
    assert_eq!(
        order,
        [
            (0, 3, "arithmetic (greater)".to_string()),
            (1, 3, "boolean (greater)".to_string()),
            (2, 3, "arithmetic (ape)".to_string())
        ]
    );
    assert!(!out.join("boolean-ape").exists());
    let (first, second) = (&table.rows[0], &table.rows[1]);
    assert_eq!(first.baselines.iter().map(|b| b.method).collect::<Vec<_>>(), [Method::Ape]);
    assert!(second.baselines.is_empty());
    let ape = &table.baselines[0];
    let ape_row = &first.baselines[0].optimised;
    assert_eq!((ape.method, ape.tasks, ape.optimised.n), (Method::Ape, 1, ape_row.n));
    assert_eq!(ape.mean_gain, ape_row.accuracy - first.zero_shot_cot.accuracy);
    let lead = ape.first_lead.unwrap();
    assert_eq!((lead.mean, lead.interval), (first.optimised.accuracy - ape_row.accuracy, None));
    // The greater column covers both tasks.
    assert_eq!(table.optimised.n, first.optimised.n + second.optimised.n);
    let md = std::fs::read_to_string(out.join("protocol.md")).unwrap();
    let boolean = md.lines().find(|l| l.starts_with("| boolean |")).unwrap();
    let cells: Vec<&str> = boolean.split(" | ").collect();
    assert_eq!(cells[4], "-", "{boolean}");
    // APE's pool covers one task, and says so beside greater's pool over both.
    let p = &ape.optimised;
    let ape_pooled =
        format!("{:.3} [{:.3}, {:.3}] (on 1 of 2 tasks)", p.accuracy, p.interval.0, p.interval.1);
    let pooled_row = md.lines().find(|l| l.starts_with("| all tasks (pooled) |")).unwrap();
    assert_eq!(pooled_row.split(" | ").nth(4), Some(ape_pooled.as_str()), "{pooled_row}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains(&format!("<td>{ape_pooled}</td>")), "{html}");
    assert!(md.contains(&format!(
        "Mean gain of ape over zero-shot CoT: {:+.3}, on the 1 of 2 tasks it ran on; greater minus ape on the same tasks: {:+.3}",
        ape.mean_gain, lead.mean
    )), "{md}");
}

// ---- Screening ----

#[test]
fn a_screening_judges_configurations_on_dev_and_never_evaluates_a_test_question() {
    use greater::records::ScreenConfig;
    use greater::screen::run_screen;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("screen");
    let configurations = ScreenConfig::configurations_from_toml(
        "[short]\nmax_reasoning = 3\n\n[not-worse]\naccept = \"not_worse\"\nsteps = 1\n",
        "screen.toml",
    )
    .unwrap();
    assert_eq!(
        configurations.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["not-worse", "short"]
    );
    let config = ScreenConfig {
        base: protocol_settings(&model),
        tasks: vec!["arithmetic".into(), "boolean".into()],
        configurations,
    };
    let (table, _) =
        run_screen(Start::New(config.clone()), &out, &no_interrupt(), &mut |_| {}).unwrap();
    assert_eq!(table.rows.len(), 4);
    for row in &table.rows {
        let dir = out.join(&row.configuration).join(&row.task);
        let run: greater::records::RunConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        // No test split at all, so nothing could evaluate one; and no test file was written.
        assert!(run.split.test.is_empty() && run.settings.test == Count::N(0));
        assert_eq!(run.split.dev.len(), 2);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with("test-")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("dev-")), "{names:?}");
        assert_eq!(
            row.gain,
            row.best_searched.map(|b| b - row.zero_shot.max(row.initial)),
            "{row:?}"
        );
        assert_eq!(row.steps, if row.configuration == "not-worse" { 1 } else { 2 });
    }
    // Each configuration's changes reach its runs.
    let short: greater::records::RunConfig = serde_json::from_str(
        &std::fs::read_to_string(out.join("short/boolean/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!((short.settings.max_reasoning, short.settings.accept), (3, Accept::Always));
    // A resumed (here: finished) screening gives the same table, and the markdown names both.
    let (again, config) =
        run_screen(Start::Resume(Changes::default()), &out, &no_interrupt(), &mut |_| {}).unwrap();
    assert_eq!(again, table);
    write_screen_outputs(&out, &again, &config).unwrap();
    let md = std::fs::read_to_string(out.join("screen.md")).unwrap();
    assert!(
        md.contains("| short | max_reasoning = 3 |") && md.contains("no test question"),
        "{md}"
    );
    // A screening without dev questions has nothing to judge on.
    let no_dev =
        ScreenConfig { base: OptimizeConfig { dev: 0, ..protocol_settings(&model) }, ..config };
    assert!(run_screen(Start::New(no_dev), &tmp.path().join("s2"), &no_interrupt(), &mut |_| {})
        .is_err());
}

#[test]
fn a_better_start_that_is_the_initial_prompt_reuses_the_earlier_search() {
    use greater::records::ScreenConfig;
    use greater::screen::run_screen;
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("screen");
    // The initial prompt is zero-shot CoT's text: equal train scores, and a tie keeps the
    // initial prompt, so `start = better` searches as the base does.
    let base =
        OptimizeConfig { initial_prompt: Some(ZERO_SHOT_COT.into()), ..protocol_settings(&model) };
    let configurations = ScreenConfig::configurations_from_toml(
        "[a-base]\n\n[b-better]\nstart = \"better\"\n\n[c-short-better]\nstart = \"better\"\nmax_reasoning = 3\n",
        "screen.toml",
    )
    .unwrap();
    let config = ScreenConfig { base, tasks: vec!["arithmetic".into()], configurations };
    let mut infos = Vec::new();
    let (table, _) = run_screen(Start::New(config.clone()), &out, &no_interrupt(), &mut |e| {
        if let greater::screen::ScreenEvent::Event(Event::Info(m)) = e {
            infos.push(m)
        }
    })
    .unwrap();
    let [a, b, c] = &table.rows[..] else { panic!("{:?}", table.rows) };
    assert_eq!(b.same_search_as.as_deref(), Some("a-base"));
    assert_eq!(
        greater::records::ScreenRow {
            configuration: "a-base".into(),
            same_search_as: None,
            ..b.clone()
        },
        *a
    );
    assert!(!out.join("b-better").exists(), "no second run");
    assert!(infos.iter().any(|m| m.contains("b-better/arithmetic") && m.contains("a-base's")));
    // Another change besides the start: nothing earlier to reuse, so it ran.
    assert_eq!(c.same_search_as, None);
    assert!(out.join("c-short-better/arithmetic/summary.json").exists());
    // Resumed, the table is the same, and the markdown says whose search the row is.
    let (again, config) =
        run_screen(Start::Resume(Changes::default()), &out, &no_interrupt(), &mut |_| {}).unwrap();
    assert_eq!(again, table);
    write_screen_outputs(&out, &again, &config).unwrap();
    let md = std::fs::read_to_string(out.join("screen.md")).unwrap();
    assert!(md.contains("| b-better (= a-base's search) | arithmetic |"), "{md}");
}

#[test]
fn a_step_log_torn_at_its_end_is_trimmed_and_torn_in_its_middle_is_refused_with_the_line() {
    use greater::store::RunDir;
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::folder(tmp.path()).unwrap();
    let log = tmp.path().join("steps.jsonl");
    std::fs::write(&log, "{\"step\":1}\n{\"step\":2}\n{\"st").unwrap();
    dir.truncate_steps(2).unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
    std::fs::write(&log, "{\"step\":1}\n{\"st\n{\"step\":3}\n").unwrap();
    let err = dir.truncate_steps(3).unwrap_err().to_string();
    assert!(err.contains("steps.jsonl:2: a damaged step line"), "{err}");
    let err = dir.truncate_steps(5).unwrap_err().to_string();
    assert!(err.contains("has 3 step lines, but the checkpoint is at step 5"), "{err}");
}

/// Runs the binary; (exit code, stdout, stderr).
fn greater_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_greater")).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A finished one-step run of the tiny model with train, dev and test questions.
fn finished_cli_run(tmp: &Path) -> (PathBuf, greater::records::RunConfig) {
    let model = tiny_model(tmp);
    let config = tmp.join("run.toml");
    let settings =
        OptimizeConfig { dev: 3, test: Count::N(4), steps: 1, ..tiny_settings(&model, 1) };
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let out = tmp.join("run");
    let (code, _, err) = greater_cli(&[
        "optimize",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let recorded =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    (out, recorded)
}

#[test]
fn eval_prompt_from_scores_only_the_runs_test_questions_with_its_layout_and_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, config) = finished_cli_run(tmp.path());
    let (task, split) = config.settings.load_task().unwrap();
    let questions = |ids: &[usize]| -> Vec<String> {
        Split::pick(ids, &task).iter().map(|e| e.question.clone()).collect()
    };
    let records = tmp.path().join("eval.jsonl");
    // Without a task or split flag: the run's task, split and test questions, whatever the
    // defaults would be (here the default task and sizes differ from the run's).
    let (code, _, err) = greater_cli(&[
        "eval",
        "--prompt-from",
        run.to_str().unwrap(),
        "--out",
        records.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let scored: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scored_questions: Vec<String> =
        scored.iter().map(|r| r["question"].as_str().unwrap().to_string()).collect();
    assert_eq!(scored_questions, questions(&split.test));
    for q in questions(&split.train).iter().chain(&questions(&split.dev)) {
        assert!(
            !scored_questions.contains(q),
            "a train or dev question of the run was scored: {q}"
        );
    }
    // The run's budget and connector.
    let best = std::fs::read_to_string(run.join("best_prompt.txt")).unwrap();
    for r in &scored {
        assert_eq!(r["prompt"].as_str().unwrap(), best);
        assert!(r["reasoning_tokens"].as_u64().unwrap() <= config.settings.max_reasoning as u64);
    }
    assert!(
        err.contains(&format!(
            "{}-token reasoning budget, connector {:?}",
            config.settings.max_reasoning, config.settings.connector
        )),
        "{err}"
    );
    // A flag that would choose other questions is refused, naming it.
    let (code, _, err) = greater_cli(&[
        "eval",
        "--prompt-from",
        run.to_str().unwrap(),
        "--train",
        "1",
        "--test",
        "4",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--train, --test would choose others"), "{err}");
}

#[test]
fn resume_refuses_flags_that_change_a_recorded_setting_and_honours_steps_and_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, config) = finished_cli_run(tmp.path());
    let (code, _, err) =
        greater_cli(&["optimize", "--resume", run.to_str().unwrap(), "--top-k", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not take --top-k"), "{err}");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (code, _, err) = greater_cli(&[
        "optimize",
        "--resume",
        run.to_str().unwrap(),
        "--steps",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let resumed: greater::records::RunConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(resumed.settings.steps, 2);
    assert_eq!(resumed.settings.data_dir, Some(data.canonicalize().unwrap().display().to_string()));
    assert_eq!(OptimizeConfig { steps: 1, data_dir: None, ..resumed.settings }, config.settings);
    assert_eq!(steps_without_timings(&run).len(), 2);
}

#[test]
fn flags_typed_on_the_command_line_override_the_config_file_even_at_their_default_value() {
    let base = OptimizeConfig::default();
    let file = "top_k = 7\ntop_q = 2\n";
    let flags = OptimizeConfig { top_k: base.top_k, shortlist: 5, ..OptimizeConfig::default() };
    let given = |k: &str| k == "top_k" || k == "shortlist";
    let layered = base.layered(Some((file, "run.toml")), &flags, &given).unwrap();
    // top_k typed at its default value beats the file; top_q from the file; shortlist typed.
    assert_eq!((layered.top_k, layered.top_q, layered.shortlist), (base.top_k, 2, 5));
    assert_eq!(
        OptimizeConfig {
            top_k: base.top_k,
            top_q: base.top_q,
            shortlist: base.shortlist,
            ..layered
        },
        base
    );
    // A file's error names the file and the key.
    let err = base
        .layered(Some(("top_kk = 1\n", "run.toml")), &flags, &|_| false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("run.toml") && err.contains("top_kk"), "{err}");
}

#[test]
fn every_setting_is_a_flag_and_a_key_with_its_default_shown() {
    let keys = OptimizeConfig::keys();
    let table = toml::Table::try_from(OptimizeConfig {
        data_dir: Some("d".into()),
        chat_template: Some("t".into()),
        initial_prompt: Some("p".into()),
        budget_tokens: Some(1),
        train_batch: Some(1),
        stop_dev: Some(1),
        ..OptimizeConfig::default()
    })
    .unwrap();
    let mut serialised: Vec<&String> = table.keys().collect();
    let mut flags: Vec<&String> = keys.iter().collect();
    serialised.sort();
    flags.sort();
    assert_eq!(flags, serialised);
    let (code, help, _) = greater_cli(&["optimize", "--help"]);
    assert_eq!(code, Some(0));
    for (flag, default) in [
        ("--top-k", "[default: 40]"),
        ("--temperature", "[default: 0.2]"),
        ("--keep-current", "[default: true]"),
        ("--accept", "[default: always]"),
    ] {
        let at =
            help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("{flag} missing from --help"));
        let next = ["\n  -", "\n      --"]
            .iter()
            .filter_map(|m| help[at + 1..].find(m))
            .min()
            .map_or(help.len(), |n| at + 1 + n);
        assert!(help[at..next].contains(default), "{flag}: {}", &help[at..next]);
    }
}

#[test]
fn eval_json_prints_one_object_with_the_unparsed_count_and_quiet_prints_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let records = tmp.path().join("eval.jsonl");
    let args = [
        "eval",
        "-m",
        model.to_str().unwrap(),
        "--difficulty",
        "1",
        "--train",
        "0",
        "--test",
        "5",
        "--max-reasoning",
        "3",
    ];
    let (code, stdout, stderr) = greater_cli(
        &[&args[..], &["--json", "--quiet", "--out", records.to_str().unwrap()]].concat(),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr, "", "--quiet prints no notes");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unparsed = lines.iter().filter(|r| r["parsed_answer"].is_null()).count();
    assert_eq!(value["result"]["n"], 5);
    assert_eq!(value["result"]["unparsed"], unparsed);
    assert_eq!(
        value["result"]["correct"],
        lines.iter().filter(|r| r["correct"].as_bool().unwrap()).count()
    );
    // The text output says the same count.
    let (code, stdout, stderr) = greater_cli(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&format!("answers that did not parse: {unparsed}/5")), "{stdout}");
}

#[test]
fn the_example_task_and_settings_files_load_and_run_a_one_step_search() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let opts = greater::tasks::TaskOptions { data_dir: None, seed: 0, difficulty: 1, count: 0 };
    let task = Task::load(examples.join("word_problems.toml").to_str().unwrap(), &opts).unwrap();
    assert_eq!((task.name.as_str(), task.examples.len()), ("word_problems", 80));
    assert_eq!(task.examples[0].answer, "26");
    let out = tmp.path().join("run");
    let (code, _, err) = greater_cli(&[
        "optimize",
        "--config",
        examples.join("settings.toml").to_str().unwrap(),
        "--task",
        examples.join("word_problems.toml").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--max-reasoning",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let config: greater::records::RunConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // The file's settings, under the typed flags.
    let s = &config.settings;
    assert_eq!((s.train, s.dev, s.test, s.steps, s.max_reasoning), (20, 30, Count::N(30), 1, 4));
    assert_eq!(s.precision, greater::model::Precision::Mixed);
    assert_eq!(steps_without_timings(&out).len(), 1);
}

/// A protocol table without its timings (wall seconds, the seconds of evaluations and of
/// a step).
fn table_without_timings(out: &Path) -> serde_json::Value {
    let mut table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("protocol.json")).unwrap()).unwrap();
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("wall_seconds");
                map.remove("seconds");
                map.remove("step_seconds");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut table);
    table
}

#[test]
fn two_shards_at_once_give_the_single_process_table_and_a_killed_shard_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, toml::to_string(&protocol_settings(&model)).unwrap()).unwrap();
    let protocol = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_greater"));
        c.args(["protocol", "--config", config.to_str().unwrap(), "--tasks", "arithmetic,boolean"])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let single = tmp.path().join("single");
    let status = protocol(&single, &[]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    // Two shards started together on one folder.
    let sharded = tmp.path().join("sharded");
    let children: Vec<_> = ["0/2", "1/2"]
        .iter()
        .map(|s| protocol(&sharded, &["--shard", s]).spawn().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(table_without_timings(&sharded), table_without_timings(&single));
    assert!(sharded.join("protocol.md").exists());
    // A shard killed mid-run; --resume (any process) finishes its task.
    let killed = tmp.path().join("killed");
    let long = tmp.path().join("long.toml");
    std::fs::write(
        &long,
        toml::to_string(&OptimizeConfig { steps: 200, ..protocol_settings(&model) }).unwrap(),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["protocol", "--config", long.to_str().unwrap(), "--tasks", "arithmetic,boolean"])
        .args(["--shard", "1/2", "--out", killed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = killed.join("boolean").join("steps.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !log.exists() || std::fs::read_to_string(&log).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the shard never finished a step");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, _, err) =
        greater_cli(&["protocol", "--resume", killed.to_str().unwrap(), "--steps", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let table: ProtocolTable =
        serde_json::from_str(&std::fs::read_to_string(killed.join("protocol.json")).unwrap())
            .unwrap();
    assert_eq!(
        table.rows.iter().map(|r| r.task.as_str()).collect::<Vec<_>>(),
        ["arithmetic", "boolean"]
    );
    assert_eq!(table.rows[1].steps, 3);
}

#[test]
fn a_shard_is_i_of_n_from_zero() {
    assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
    assert!(
        "4/4".parse::<Shard>().is_err()
            && "x".parse::<Shard>().is_err()
            && "0/0".parse::<Shard>().is_err()
    );
    let takes: Vec<usize> = (0..7).filter(|&t| Shard { index: 1, count: 3 }.takes(t)).collect();
    assert_eq!(takes, [1, 4]);
}

/// Text as minijinja writes it into HTML.
fn html_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#x27;")
        .replace('/', "&#x2f;")
}

#[test]
fn the_report_shows_each_test_question_with_its_gold_and_every_prompts_parsed_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let out = tmp.path().join("run");
    run_quietly(
        Start::New(OptimizeConfig { dev: 2, test: Count::N(4), ..tiny_settings(&model, 2) }),
        &out,
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let viewer = &html[html.find("<table id=\"questions\">").expect("a question viewer")..];
    let viewer = &viewer[..viewer.find("</table>").unwrap()];
    let rows: Vec<&str> = viewer.split("<tr class=").skip(1).collect();
    assert_eq!(rows.len(), 4);
    for (label_index, e) in summary.evaluations.iter().enumerate() {
        let first = summary.evaluations.iter().find(|f| f.prompt == e.prompt).unwrap();
        let records =
            std::fs::read_to_string(out.join(format!("test-{}.jsonl", first.label.file_stem())))
                .unwrap();
        for (q, line) in records.lines().enumerate() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let row = rows[q];
            let question = format!(
                "<td>{}</td><td>{}</td>",
                html_escaped(r["question"].as_str().unwrap()),
                html_escaped(r["gold"].as_str().unwrap())
            );
            assert!(row.contains(&question), "question {q}: {row}");
            let cells: Vec<&str> = row.split("<td class=\"").skip(1).collect();
            let parsed =
                r["parsed_answer"].as_str().map_or("(no answer)".to_string(), html_escaped);
            let verdict = if r["correct"].as_bool().unwrap() { "right" } else { "wrong" };
            assert!(
                cells[label_index].starts_with(&format!("{verdict}\">{parsed}<details>")),
                "{}: {}",
                e.label,
                cells[label_index]
            );
        }
    }
    // Rows where the prompts' answers differ are marked for the filter, and counted.
    let differ = rows.iter().filter(|r| r.starts_with("\"differ\"")).count();
    assert_eq!(differ + rows.iter().filter(|r| r.starts_with("\"agree\"")).count(), 4);
    assert!(html.contains(&format!("only the {differ} questions (of 4)")), "{html}");
}

#[test]
fn a_failed_start_leaves_a_folder_that_a_corrected_start_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, toml::to_string(&protocol_settings(&model)).unwrap()).unwrap();
    // A protocol over a task whose data file is missing: refused before anything is written.
    let task = tmp.path().join("mine.toml");
    std::fs::write(
        &task,
        "data = \"mine.jsonl\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"integer\"\n",
    )
    .unwrap();
    let out = tmp.path().join("p");
    let args =
        ["protocol", "--config", config.to_str().unwrap(), "--tasks", task.to_str().unwrap()];
    let (code, _, err) = greater_cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("mine.jsonl"), "{err}");
    assert!(!out.join("protocol-config.json").exists());
    // Corrected (the data written), the same start is accepted.
    let rows: String =
        (1..=10).map(|i| format!("{{\"q\": \"{i} + {i} =\", \"a\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(tmp.path().join("mine.jsonl"), rows).unwrap();
    let (code, _, err) = greater_cli(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(code, Some(0), "{err}");
    let table: ProtocolTable =
        serde_json::from_str(&std::fs::read_to_string(out.join("protocol.json")).unwrap()).unwrap();
    assert_eq!(table.rows.len(), 1);
    // A run whose model cannot be opened: a corrected --model on the same --out is accepted.
    let run = tmp.path().join("run");
    let base = ["optimize", "--config", config.to_str().unwrap(), "--out", run.to_str().unwrap()];
    let (code, _, err) = greater_cli(&[&base[..], &["--model", "no-such-model.gguf"]].concat());
    assert_eq!(code, Some(2));
    assert!(err.contains("no-such-model"), "{err}");
    assert!(!run.join("config.json").exists());
    let (code, _, err) = greater_cli(&base);
    assert_eq!(code, Some(0), "{err}");
}

/// Every field of `old` (a record written before a change of the record layout) is in
/// `new` with the same value, apart from timings ("seconds"); `new` may have more.
/// Relative tolerance on the scores, log-likelihoods and gradients of a fixture: the f32 sums
/// of the few-row products run in another order on CPUs without AVX-512 (or with
/// `GREATER_ISA=avx2`), which moves their last bits.
const FIXTURE_SCORE_TOLERANCE: f64 = 1e-4;

/// Keys whose numbers follow from counts and are compared exactly, as are all integers and
/// texts (prompts, tokens, ids): the decisions of a run.
const FIXTURE_EXACT_KEYS: [&str; 4] = ["accuracy", "interval", "majority_floor", "chance"];

/// `old`'s fields equal `new`'s where `old` has them, fractional numbers outside
/// [`FIXTURE_EXACT_KEYS`] within [`FIXTURE_SCORE_TOLERANCE`].
fn same_where_both_have(old: &serde_json::Value, new: &serde_json::Value, path: &str) {
    use serde_json::Value;
    let key = path.rsplit('/').next().unwrap_or(path);
    let from_counts = FIXTURE_EXACT_KEYS.iter().any(|k| key.starts_with(k));
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, v) in o.iter().filter(|(k, _)| k.as_str() != "seconds") {
                let there = n.get(k).unwrap_or_else(|| panic!("{path}/{k} is gone"));
                same_where_both_have(v, there, &format!("{path}/{k}"));
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            assert_eq!(o.len(), n.len(), "{path}: length");
            for (i, (a, b)) in o.iter().zip(n).enumerate() {
                same_where_both_have(a, b, &format!("{path}[{i}]"));
            }
        }
        (Value::Number(o), Value::Number(n)) if o.is_f64() && !from_counts => {
            let (o, n) = (o.as_f64().unwrap(), n.as_f64().unwrap());
            assert!(
                (o - n).abs() <= FIXTURE_SCORE_TOLERANCE * o.abs().max(1.0),
                "{path}: {n} against the fixture's {o}"
            );
        }
        _ => assert_eq!(old, new, "{path}"),
    }
}

#[test]
fn a_fixed_seed_run_writes_the_records_of_the_code_before_the_redesign() {
    // tests/fixtures/before-redesign: the same command run by the binary of 4bb5631, before
    // the records, settings and report moved (the CLI then had the same flags).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (code, _, err) = greater_cli(&[
        "optimize",
        "--model",
        "smollm2-135m",
        "--task",
        "arithmetic",
        "--difficulty",
        "1",
        "--train",
        "3",
        "--dev",
        "2",
        "--test",
        "2",
        "--steps",
        "3",
        "--max-reasoning",
        "16",
        "--precision",
        "f32",
        "--start",
        "initial",
        "--system",
        "template",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/before-redesign");
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    same_where_both_have(
        &json(fixture.join("summary.json")),
        &json(out.join("summary.json")),
        "summary",
    );
    let lines = |path: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (old, new) = (lines(fixture.join("steps.jsonl")), lines(out.join("steps.jsonl")));
    same_where_both_have(&serde_json::Value::Array(old), &serde_json::Value::Array(new), "steps");
}

#[test]
fn a_full_disk_is_reported_with_the_file_that_could_not_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (code, _, stderr) = greater_cli(&[
        "eval",
        "-m",
        model.to_str().unwrap(),
        "--difficulty",
        "1",
        "--train",
        "0",
        "--test",
        "2",
        "--max-reasoning",
        "2",
        "--out",
        "/dev/full",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/dev/full is not a regular file"), "{stderr}");

    // A run folder's file whose write fails the same way names itself; the old content stays.
    use greater::store::RunDir;
    let dir = RunDir::create(&tmp.path().join("run")).unwrap();
    dir.write_json("summary.json", &1).unwrap();
    let temporary = format!(".summary.json.{}.tmp", std::process::id());
    std::os::unix::fs::symlink("/dev/full", tmp.path().join("run").join(&temporary)).unwrap();
    let err = format!("{:#}", dir.write_json("summary.json", &2).unwrap_err());
    assert!(err.contains("cannot write") && err.contains(&temporary), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(dir.read_json::<i32>("summary.json").unwrap(), 1);
}

/// `eval` of eight generated questions, two at a time, on the tiny model, its records to `out`.
fn eval_into(model: &Path, out: &Path, max_reasoning: &str) -> (Option<i32>, String, String) {
    greater_cli(&[
        "eval",
        "-m",
        model.to_str().unwrap(),
        "--difficulty",
        "1",
        "--train",
        "0",
        "--test",
        "8",
        "--eval-batch",
        "2",
        "--max-reasoning",
        max_reasoning,
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn an_eval_that_fails_part_way_keeps_the_earlier_file_and_resumes_at_its_next_question() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let reference = tmp.path().join("reference.jsonl");
    let (code, _, err) = eval_into(&model, &reference, "5");
    assert_eq!(code, Some(0), "{err}");
    let reference = std::fs::read_to_string(&reference).unwrap();
    assert_eq!(reference.lines().count(), 8);

    // The whole file cannot be written (its temporary is a full disk): the earlier file stays
    // as it was, and every finished question is kept in the partial log.
    let records = tmp.path().join("eval.jsonl");
    std::fs::write(&records, "earlier\n").unwrap();
    let temporary = tmp.path().join("eval.jsonl.tmp");
    std::os::unix::fs::symlink("/dev/full", &temporary).unwrap();
    let (code, _, err) = eval_into(&model, &records, "5");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("the questions finished are kept in"), "{err}");
    assert_eq!(std::fs::read_to_string(&records).unwrap(), "earlier\n");
    let partial = tmp.path().join("eval.jsonl.partial");
    let logged = std::fs::read_to_string(&partial).unwrap();
    let lines: Vec<&str> = logged.lines().collect();
    assert_eq!(lines.len(), 9, "{logged}");
    assert_eq!(lines[1..].join("\n") + "\n", reference);
    assert!(std::fs::symlink_metadata(&temporary).is_err(), "the failed write's temporary stays");

    // As a kill after four questions, mid-way through writing the fifth, would leave it.
    let torn = format!("{}\n{}", lines[..5].join("\n"), &lines[5][..lines[5].len() / 2]);
    std::fs::write(&partial, &torn).unwrap();
    // Other settings do not resume it; they are named.
    let (code, _, err) = eval_into(&model, &records, "4");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "holds an interrupted evaluation of other settings (max_reasoning 5 there, 4 here)"
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&partial).unwrap(), torn);

    let (code, _, err) = eval_into(&model, &records, "5");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("resuming: 4 of the 8 questions are done"), "{err}");
    assert_eq!(std::fs::read_to_string(&records).unwrap(), reference);
    assert!(!partial.exists());

    // Through a link, the file linked to is written and the link stays a link.
    let link = tmp.path().join("link.jsonl");
    std::os::unix::fs::symlink(&records, &link).unwrap();
    std::fs::write(&records, "earlier\n").unwrap();
    let (code, _, err) = eval_into(&model, &link, "5");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("is a link: writing"), "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&records).unwrap(), reference);
}

#[test]
fn settings_beyond_their_range_are_refused_by_name_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--train", "1000000000"], "setting train must be from 0 to 100000, not 1000000000"),
        (&["--top-q", "1000000000"], "setting top_q must be from 1 to 1000, not 1000000000"),
        (&["--subset-size", "1000000000"], "setting subset_size must be from 1 to 1000"),
        (&["--difficulty", "1000000000"], "setting difficulty must be from 1 to 32"),
        (&["--difficulty", "0"], "setting difficulty must be from 1 to 32, not 0"),
        (&["--max-reasoning", "1000000000000"], "setting max_reasoning must be from 1 to 32768"),
        (&["--seed", "18446744073709551615"], "setting seed must be from 0 to 9223372036854775807"),
        (&["--stop-dev", "0"], "setting stop_dev must be from 1 to 100000, not 0"),
    ];
    for (flags, message) in cases {
        let out = tmp.path().join("never");
        let args = [&["optimize", "-m", m, "--out", out.to_str().unwrap()][..], flags].concat();
        let (code, _, err) = greater_cli(&args);
        assert_eq!(code, Some(2), "{flags:?}: {err}");
        assert!(err.contains(message), "{flags:?}: {err}");
        assert!(!out.exists(), "{flags:?} created its folder");
    }
    // In range, but past the model's context: the question and the budget that would fit.
    let (code, _, err) = greater_cli(&["eval", "-m", m, "--test", "1", "--max-reasoning", "600"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the question that starts"), "{err}");
    assert!(err.contains("but the model's context holds 512: lower --max-reasoning to"), "{err}");
}

#[test]
fn a_run_goes_only_into_a_new_or_empty_folder_or_one_of_greaters_and_never_through_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let optimize = |out: &Path| {
        greater_cli(&[
            "optimize",
            "-m",
            model.to_str().unwrap(),
            "--difficulty",
            "1",
            "--train",
            "2",
            "--dev",
            "0",
            "--test",
            "1",
            "--steps",
            "1",
            "--max-reasoning",
            "3",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
    let (code, _, err) = optimize(&theirs);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds other files and nothing of greater's"), "{err}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 1);

    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&theirs, &link).unwrap();
    let (code, _, err) = optimize(&link);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is a link (to"), "{err}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 1);

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = optimize(&empty);
    assert_eq!(code, Some(0), "{err}");
    assert!(empty.join("summary.json").exists());
}

#[test]
fn a_question_longer_than_the_context_is_named_and_an_empty_csv_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let task = tmp.path().join("t.toml");
    std::fs::write(
        &task,
        "data = \"q.jsonl\"\nquestion = \"q\"\nanswer = \"a\"\nanswer_kind = \"integer\"\n",
    )
    .unwrap();
    let long = format!("Count the dots: {}", ". ".repeat(600));
    std::fs::write(
        tmp.path().join("q.jsonl"),
        format!("{}\n", serde_json::json!({"q": long, "a": "600"})),
    )
    .unwrap();
    let args = ["eval", "-m", model.to_str().unwrap(), "-t", task.to_str().unwrap()];
    let split = ["--train", "0", "--dev", "0", "--test", "1"];
    let (code, _, stderr) = greater_cli(&[&args[..], &split].concat());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the question that starts \"Count the dots: . . ."), "{stderr}");
    assert!(stderr.contains("but the model's context holds 512"), "{stderr}");

    // A CSV with its header and no rows.
    std::fs::write(&task, std::fs::read_to_string(&task).unwrap().replace("q.jsonl", "q.csv"))
        .unwrap();
    std::fs::write(tmp.path().join("q.csv"), "q,a\n").unwrap();
    let (code, _, stderr) = greater_cli(&[&args[..], &split].concat());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("q.csv: no examples"), "{stderr}");
}
