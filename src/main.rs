use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use greater::app;
use greater::catalog;
use greater::eval::{evaluate_logged, EvalConfig, RecordLog};
use greater::model::generate::{Cancelled, Sampling, StopReason};
use greater::optimize::run::{Changes, Event, Start};
use greater::protocol::{ProtocolEvent, Shard, PAPER_TASKS};
use greater::records::{ProtocolConfig, RunConfig, ScreenConfig, Search};
use greater::report::text::{protocol_markdown, screen_markdown, summary_table};

use greater::runtime::LanguageModel;
use greater::screen::ScreenEvent;
use greater::settings::{Method, OptimizeConfig, Preset, Size, SEARCH};
use greater::store::{file, RunDir};
use greater::tasks::{builtin_tasks, Split, ZERO_SHOT_COT};

/// Bounds what a chat template may allocate while it renders (see `tokenizer::budget`).
#[global_allocator]
static ALLOC: greater::tokenizer::BudgetedAlloc = greater::tokenizer::BudgetedAlloc;

#[derive(Parser)]
#[command(
    name = "greater",
    version,
    about = "Optimise a local model's task prompt with gradients over reasoning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print nothing but the result: no progress, no step lines, no notes.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// Print the result as one JSON object on stdout (eval: the accuracy and counts;
    /// optimize: the summary; protocol and screen: the table); the rest goes to stderr.
    #[arg(long, global = true)]
    json: bool,
    /// Also say which instruction path each kernel takes (the CPU's features, capped by
    /// GREATER_ISA=scalar|avx2|avx512).
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
}

/// How much the CLI prints, and where: set once from the global flags.
#[derive(Clone, Copy, Default)]
struct Output {
    quiet: bool,
    json: bool,
}

static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

fn output() -> Output {
    OUTPUT.get().copied().unwrap_or_default()
}

/// A note on what is happening (stderr; nothing with --quiet).
fn note(line: &str) {
    if !output().quiet {
        eprintln!("{line}");
    }
}

/// A line of progress that a log keeps (stdout, stderr with --json, nothing with --quiet).
fn progress_line(line: &str) {
    match output() {
        Output { quiet: true, .. } => {}
        Output { json: true, .. } => eprintln!("{line}"),
        _ => println!("{line}"),
    }
}

/// The result: `text` for people, or `value` as one JSON line with --json.
fn print_result<T: serde::Serialize>(text: &str, value: &T) -> Result<()> {
    if output().json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

/// The settings of a subcommand as given: the parsed values, and which flags the user typed
/// (the others hold their defaults and must not override a file or a preset).
struct Given<'a> {
    settings: &'a OptimizeConfig,
    matches: &'a ArgMatches,
}

impl Given<'_> {
    fn has(&self, key: &str) -> bool {
        matches!(
            self.matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    /// The flags given among `keys`, as the user typed them.
    fn flags_among(&self, keys: &[String]) -> Vec<String> {
        keys.iter().filter(|k| self.has(k)).map(|k| format!("--{}", k.replace('_', "-"))).collect()
    }

    /// Settings: `base`, then the config file, then the flags.
    fn layered(&self, base: &OptimizeConfig, file: Option<&Path>) -> Result<OptimizeConfig> {
        let text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let origin = file.map(|p| p.display().to_string()).unwrap_or_default();
        base.layered(text.as_deref().map(|t| (t, origin.as_str())), self.settings, &|k| self.has(k))
    }

    /// An error when a flag outside `allowed` (setting keys) was given: `what` does not use it.
    fn refuse_others(&self, allowed: &[&str], what: &str) -> Result<()> {
        let others: Vec<String> =
            OptimizeConfig::keys().into_iter().filter(|k| !allowed.contains(&k.as_str())).collect();
        let given = self.flags_among(&others);
        if !given.is_empty() {
            anyhow::bail!("{what} does not take {}", given.join(", "));
        }
        Ok(())
    }
}

/// Setting keys `eval` takes: the model, the task and its split, the prompt layout.
fn eval_keys() -> Vec<String> {
    let command = <OptimizeConfig as clap::Args>::augment_args(clap::Command::new("settings"));
    command
        .get_arguments()
        .filter(|a| a.get_help_heading() != Some(SEARCH))
        .map(|a| a.get_id().to_string())
        .collect()
}

/// What decides an evaluation's records: the settings `eval` takes and the prompt.
fn eval_header(settings: &OptimizeConfig, prompt: &str) -> Result<serde_json::Value> {
    let keys = eval_keys();
    let mut all = serde_json::to_value(settings)?;
    let all = all.as_object_mut().expect("settings serialize to an object");
    all.retain(|k, _| keys.contains(k));
    all.insert("prompt".into(), prompt.into());
    Ok(serde_json::Value::Object(std::mem::take(all)))
}

/// Setting keys `generate` takes.
const GENERATE_KEYS: &[&str] =
    &["model", "chat_template", "precision", "system", "max_reasoning", "seed"];

/// The command line: every subcommand that flattens the settings gets their defaults, and
/// shows only the groups it uses.
fn command() -> clap::Command {
    let eval = eval_keys();
    let shown = |keys: Vec<String>| {
        move |c: clap::Command| {
            let all = OptimizeConfig::keys();
            OptimizeConfig::with_defaults(c).mut_args(|a| {
                if all.contains(&a.get_id().to_string()) && !keys.contains(&a.get_id().to_string())
                {
                    a.hide(true)
                } else {
                    a
                }
            })
        }
    };
    Cli::command()
        .mut_subcommand("optimize", OptimizeConfig::with_defaults)
        .mut_subcommand("protocol", OptimizeConfig::with_defaults)
        .mut_subcommand("screen", OptimizeConfig::with_defaults)
        .mut_subcommand("eval", shown(eval))
        .mut_subcommand("generate", shown(GENERATE_KEYS.iter().map(|k| k.to_string()).collect()))
}

#[derive(Subcommand)]
enum Command {
    /// Reply to one prompt with the model's chat template.
    Generate {
        #[command(flatten)]
        settings: OptimizeConfig,
        #[arg(long, short = 'p')]
        prompt: String,
        /// Sample at this temperature instead of decoding greedily (the seed is --seed).
        #[arg(long)]
        temp: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
    },
    /// Accuracy of a prompt on a task's held-out test split.
    Eval {
        #[command(flatten)]
        settings: OptimizeConfig,
        /// The prompt appended to every question [default: zero-shot CoT, "Let's think step
        /// by step."].
        #[arg(long, short = 'p', conflicts_with = "prompt_from")]
        prompt: Option<String>,
        /// A run folder: its returned prompt (best_prompt.txt, byte for byte), evaluated on
        /// that run's test questions with its task, split and layout (flags may change the
        /// model, the layout and the budget, not the questions).
        #[arg(long)]
        prompt_from: Option<PathBuf>,
        /// One JSON line per question.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Find a better prompt with gradients over reasoning (GReaTer). Without arguments:
    /// a short demo on SmolLM2 and generated arithmetic.
    Optimize(OptimizeArgs),
    /// Run `optimize` with one configuration over a list of tasks (a run folder each, one
    /// table); resumable as a whole with --resume DIR.
    Protocol(ProtocolArgs),
    /// Compare configurations of the search on train and dev only (no test question is
    /// evaluated): each named configuration of --configurations on every task, one table;
    /// resumable with --resume DIR.
    Screen(ScreenArgs),
    /// Write a run's or a protocol's report.html: charts and tables in one self-contained
    /// page (also written at the end of every run and protocol).
    Report {
        /// A run folder or a protocol folder.
        dir: PathBuf,
        /// Where to write [default: DIR/report.html].
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Write a finished run's prompt, laid out as the run laid it out, for where the model
    /// is served: a chat template (jinja, llamacpp), a Hugging Face tokenizer_config.json
    /// (hf; an existing --out file keeps its other keys), an Ollama Modelfile, or a Python
    /// script for llama-cpp-python that also reads the answer as greater does.
    Export {
        /// A finished run folder.
        run: PathBuf,
        /// The target.
        #[arg(long, value_enum)]
        to: greater::export::Target,
        /// Where to write [default: stdout].
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// List the built-in tasks.
    Tasks,
    /// List the model aliases and whether they are cached.
    Models,
    /// Print a shell completion script, e.g. `greater completions bash > ~/.local/share/bash-completion/completions/greater`.
    Completions { shell: clap_complete::Shell },
}

/// Flags of `greater optimize`: the settings (each overrides the same key of `--config
/// FILE`), where they start from, and the run folder.
#[derive(Args)]
struct OptimizeArgs {
    #[command(flatten)]
    settings: OptimizeConfig,
    /// Start from every method setting at the reference implementation's value, before
    /// --config and the other flags.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Question counts, steps and reasoning budget by name, before --config and the other
    /// flags [default: light's, or demo's without --model, --task, --config or --preset].
    #[arg(long, value_enum)]
    size: Option<Size>,
    /// A TOML file with any of the settings (keys as the flags, with underscores).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Continue the run in this folder with its recorded settings; only --steps (to run
    /// more or fewer) and --data-dir (where the data moved) may be given.
    #[arg(long, short = 'r', conflicts_with_all = ["preset", "size", "config", "out"])]
    resume: Option<PathBuf>,
    /// Run folder [default: greater-runs/<task>-<time>].
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
}

/// Settings a resumed run, protocol or screening may take from the command line.
const RESUME_KEYS: &[&str] = &["steps", "data_dir"];

impl OptimizeArgs {
    /// Settings: defaults (or a preset, or the demo when nothing is given and `demo` allows
    /// it), then the config file, then flags.
    fn settings(&self, given: &Given, demo: bool) -> Result<OptimizeConfig> {
        let demo = demo
            && self.config.is_none()
            && !given.has("model")
            && !given.has("task")
            && self.preset.is_none()
            && self.size.is_none();
        let base = match self.preset {
            Some(Preset::Reference) => OptimizeConfig::reference(),
            None if demo => OptimizeConfig::demo(),
            None => OptimizeConfig::default(),
        };
        let base = self.size.map_or(base.clone(), |size| size.apply(base));
        let c = given.layered(&base, self.config.as_deref())?;
        if demo {
            note(&format!(
                "no --task or --model given: running the built-in demo ({}, generated arithmetic, {} train / {} dev / {} test questions, {} steps)",
                c.model, c.train, c.dev, c.test, c.steps
            ));
        }
        Ok(c)
    }

    /// How a resumed run, protocol or screening changes its record: an error for a flag
    /// that would change a recorded setting.
    fn resume_changes(&self, given: &Given, what: &str) -> Result<Changes> {
        given.refuse_others(
            RESUME_KEYS,
            &format!("{what} --resume (the recorded settings stand)"),
        )?;
        Ok(Changes {
            steps: given.has("steps").then_some(self.settings.steps),
            data_dir: given.has("data_dir").then(|| given.settings.data_dir.clone()).flatten(),
        })
    }
}

fn run_optimize_command(args: &OptimizeArgs, given: &Given) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    let (start, out) = match &args.resume {
        Some(dir) => (Start::Resume(args.resume_changes(given, "optimize")?), dir.clone()),
        None => {
            let s = args.settings(given, true)?;
            let out =
                args.out.clone().unwrap_or_else(|| default_out(&s.task.replace(['/', '.'], "_")));
            (Start::New(s), out)
        }
    };
    let mut progress = Progress::default();
    let result = app::optimize(start, &out, &interrupt, &mut |e| progress.event(e));
    finish(result, &mut progress, "optimize", &out, |summary| {
        let config: RunConfig = RunDir::open(&out)?.read_json(file::CONFIG)?;
        let text = format!(
            "{}\nbest prompt written to {}",
            summary_table(&summary, &config),
            out.join(file::BEST_PROMPT).display()
        );
        print_result(&text, &summary)
    })
}

/// `greater-runs/<name>-<unix seconds>`.
fn default_out(name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from(format!("greater-runs/{name}-{secs}"))
}

/// The first Ctrl-C asks a run to stop at once (the last checkpoint stands); a second one,
/// while it winds down, kills the process.
fn ctrl_c_flag() -> Result<Arc<AtomicBool>> {
    let interrupt = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        1,
        Arc::clone(&interrupt),
    )?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupt))?;
    Ok(interrupt)
}

/// Shows a finished run's result, or how to resume an interrupted one (then the error
/// stays, for exit status 130).
fn finish<T>(
    result: Result<T>,
    progress: &mut Progress,
    command: &str,
    out: &Path,
    show: impl FnOnce(T) -> Result<()>,
) -> Result<()> {
    match result {
        Ok(value) => {
            progress.finish();
            show(value)
        }
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
            progress.abandon();
            note(&format!("interrupted: finished steps are saved; continue with greater {command} --resume {}", out.display()));
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Draws a run's events: the budget line, a step bar with ETA, one line per step, a bar per
/// evaluation; writes a finished run's report. In a protocol the step bar counts the steps
/// of every task.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    /// "task 2/5 navigate | " in a protocol.
    label: String,
    /// Steps of the tasks before this one, and of all tasks (in a protocol).
    offset: usize,
    protocol_steps: Option<usize>,
}

impl Progress {
    /// Run `index` of `total` (each of `steps` steps) of a protocol or screening begins.
    fn next_run(&mut self, label: String, index: usize, total: usize, steps: usize) {
        self.finish();
        self.label = label;
        self.offset = index * steps;
        self.protocol_steps = Some(total * steps);
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Info(m) => note(&format!("{}{m}", self.label)),
            Event::Start { done, total, budget } => {
                progress_line(&format!("{}{budget}", self.label));
                let b = visible(ProgressBar::new(self.protocol_steps.unwrap_or(total) as u64));
                b.set_style(
                    ProgressStyle::with_template(
                        "step {pos}/{len} [{bar:20}] ETA {eta_precise} | {msg}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b.set_position((self.offset + done) as u64);
                b.reset_eta();
                self.bar = Some(b);
            }
            Event::Step(record, state) => {
                if let Some(b) = &self.bar {
                    let line = match &record.search {
                        Search::Round { proposals } => format!(
                            "{}round {}: {} instructions, best {:.3}: {:?} [{} tokens so far; {}]",
                            self.label,
                            record.step,
                            proposals.len(),
                            state.best_score,
                            record.best_prompt,
                            state.generated_tokens,
                            record.seconds
                        ),
                        Search::Token(t) => format!(
                            "{}step {} pos {}: chose {} -> {:?} (best {:.3}) [{}]",
                            self.label,
                            record.step,
                            t.position,
                            t.chosen_checked().map_or("(kept)".to_string(), |c| format!(
                                "{:?} ({})",
                                c.text,
                                c.score.mistakes_text()
                            )),
                            record.prompt,
                            state.best_score,
                            record.seconds
                        ),
                    };
                    // A bar that is not drawn (output not a terminal) prints nothing itself.
                    if b.is_hidden() {
                        progress_line(&line);
                    } else {
                        b.println(line);
                    }
                    b.set_message(format!(
                        "{}pos {} best {:.3} | {}",
                        self.label, state.position, state.best_score, record.prompt
                    ));
                    b.inc(1);
                }
            }
            Event::EvalStart { label, questions } => {
                self.finish();
                self.bar = Some(progress_bar(questions, &format!("{}{label}", self.label)));
            }
            Event::EvalProgress(done) => {
                if let Some(b) = &self.bar {
                    b.set_position(done as u64);
                    // A bar that is not drawn (output not a terminal): a line when it ends.
                    if b.is_hidden() && b.length() == Some(done as u64) {
                        progress_line(&format!(
                            "{}: {done} questions in {}",
                            b.message(),
                            indicatif::HumanDuration(b.elapsed())
                        ));
                    }
                }
            }
            Event::Finished(_) => {}
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    fn abandon(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

/// Flags of `greater protocol`: the run settings of `greater optimize` and a task list.
#[derive(Args)]
struct ProtocolArgs {
    #[command(flatten)]
    run: OptimizeArgs,
    /// Tasks, comma-separated [default: the paper's five transfer tasks].
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    tasks: Vec<String>,
    /// A second model (alias, GGUF file or folder) on which each task's returned prompt
    /// and zero-shot CoT are also evaluated, on the same test questions (transfer).
    #[arg(long, conflicts_with = "resume")]
    transfer_to: Option<String>,
    /// Methods run on every task, comma-separated, e.g. greater,ape,gcg: the first fills the
    /// "optimised" column and runs on every task first, each other adds a column; ape
    /// spends the tokens greater spent on the task [default: --method].
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "resume")]
    methods: Vec<Method>,
    /// Run the methods after the first on the first N tasks only (the first method runs on
    /// all of them first, then the others) [default: every task].
    #[arg(long, value_name = "N", conflicts_with = "resume")]
    baseline_tasks: Option<usize>,
    /// Run only this share of the tasks, I/N with I from 0 (task i when i mod N = I), beside
    /// the other shards on the same --out: one job of a Slurm array each, for instance. The
    /// table covers the tasks finished so far; the last shard to finish (or --resume)
    /// writes it whole.
    #[arg(long)]
    shard: Option<Shard>,
}

/// Flags of `greater screen`: the base settings of `greater optimize`, tasks and a file of
/// named configurations.
#[derive(Args)]
struct ScreenArgs {
    #[command(flatten)]
    run: OptimizeArgs,
    /// Tasks, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    tasks: Vec<String>,
    /// A TOML file of configurations: each table a name, its keys the settings it changes
    /// from the base (e.g. `[budget-512]` then `max_reasoning = 512`).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    configurations: Option<PathBuf>,
}

fn run_screen_command(args: &ScreenArgs, given: &Given) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    refuse_task(given, "screen")?;
    let (start, out) = match (&args.run.resume, &args.configurations) {
        (Some(dir), _) => (Start::Resume(args.run.resume_changes(given, "screen")?), dir.clone()),
        (None, Some(file)) => {
            let config = ScreenConfig {
                base: args.run.settings(given, false)?,
                tasks: args.tasks.clone(),
                configurations: ScreenConfig::configurations_from_file(file)?,
            };
            (Start::New(config), args.run.out.clone().unwrap_or_else(|| default_out("screen")))
        }
        (None, None) => anyhow::bail!("pass --configurations FILE (or --resume DIR)"),
    };
    let mut progress = Progress::default();
    let result = app::screen(start, &out, &interrupt, &mut |event| match event {
        ScreenEvent::Run { index, total, configuration, task, steps } => progress.next_run(
            format!("run {}/{total} {configuration} {task} | ", index + 1),
            index,
            total,
            steps,
        ),
        ScreenEvent::Event(e) => progress.event(e),
    });
    finish(result, &mut progress, "screen", &out, |(table, config)| {
        print_result(
            &format!(
                "{}\ntable written to {}",
                screen_markdown(&table, &config),
                out.join(file::SCREEN_MD).display()
            ),
            &table,
        )
    })
}

/// A protocol or screening names its tasks with --tasks; --task would be ignored.
fn refuse_task(given: &Given, what: &str) -> Result<()> {
    if given.has("task") {
        anyhow::bail!("{what} takes its tasks as --tasks A,B,...; --task is optimize's and eval's");
    }
    Ok(())
}

fn run_protocol_command(args: &ProtocolArgs, given: &Given) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    refuse_task(given, "protocol")?;
    let (start, out) = match &args.run.resume {
        Some(dir) => (Start::Resume(args.run.resume_changes(given, "protocol")?), dir.clone()),
        None => {
            let settings = args.run.settings(given, false)?;
            let tasks = if args.tasks.is_empty() {
                PAPER_TASKS.iter().map(|t| t.to_string()).collect()
            } else {
                args.tasks.clone()
            };
            let out = args.run.out.clone().unwrap_or_else(|| default_out("protocol"));
            let config = ProtocolConfig {
                settings,
                tasks,
                transfer_to: args.transfer_to.clone(),
                methods: args.methods.clone(),
                baseline_tasks: args.baseline_tasks,
            };
            (Start::New(config), out)
        }
    };
    let mut progress = Progress::default();
    let shard = args.shard.unwrap_or(Shard::ALL);
    let result = app::protocol(start, &out, shard, &interrupt, &mut |event| match event {
        ProtocolEvent::Task { index, total, name, steps } => {
            progress.next_run(format!("task {}/{total} {name} | ", index + 1), index, total, steps)
        }
        ProtocolEvent::Run(e) => progress.event(e),
        ProtocolEvent::Table(..) => {}
    });
    finish(result, &mut progress, "protocol", &out, |(table, config)| {
        if table.rows.len() < config.tasks.len() {
            note(&format!(
                "{} of {} tasks finished; the other shards (or greater protocol --resume {}) finish the rest",
                table.rows.len(),
                config.tasks.len(),
                out.display()
            ));
        }
        print_result(
            &format!(
                "{}\ntable written to {}",
                protocol_markdown(&table, &config),
                out.join(file::PROTOCOL_MD).display()
            ),
            &table,
        )
    })
}

/// `bar`, hidden with --quiet.
fn visible(bar: ProgressBar) -> ProgressBar {
    if output().quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn progress_bar(len: usize, what: &str) -> ProgressBar {
    let bar = visible(ProgressBar::new(len as u64));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Setting keys that decide which questions are the test questions: `eval --prompt-from`
/// takes them from the run.
const SPLIT_KEYS: &[&str] =
    &["task", "data_dir", "seed", "difficulty", "train", "dev", "test", "extractor_options"];

/// The split a run recorded and its folder, whose test questions `eval --prompt-from` scores.
type RunSplit = (Split, PathBuf);

/// The settings of `eval` and the prompt it measures: the flags over the defaults, or, with
/// `--prompt-from RUN`, over the run's settings, whose test questions it then scores.
fn eval_settings(
    given: &Given,
    prompt: Option<String>,
    prompt_from: Option<&Path>,
) -> Result<(OptimizeConfig, String, Option<RunSplit>)> {
    given.refuse_others(&eval_keys().iter().map(String::as_str).collect::<Vec<_>>(), "eval")?;
    let Some(run) = prompt_from else {
        let settings = given.layered(&OptimizeConfig::default(), None)?;
        return Ok((settings, prompt.unwrap_or_else(|| ZERO_SHOT_COT.to_string()), None));
    };
    let split_flags =
        given.flags_among(&SPLIT_KEYS.iter().map(|k| k.to_string()).collect::<Vec<_>>());
    if !split_flags.is_empty() {
        anyhow::bail!(
            "--prompt-from {} scores that run's test questions; {} would choose others (some of them the run's train or dev questions)",
            run.display(),
            split_flags.join(", ")
        );
    }
    let dir = RunDir::open(run)?;
    let config: RunConfig = dir.read_json(file::CONFIG)?;
    let path = run.join(file::BEST_PROMPT);
    let prompt = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let settings = given.layered(&config.settings, None)?;
    let changed: Vec<String> = given.flags_among(&OptimizeConfig::keys());
    note(&format!(
        "from {}: its returned prompt, task {}, split seed {}, {} test questions, {}-token reasoning budget, connector {:?}, system {}{}",
        run.display(),
        settings.task,
        settings.seed,
        config.split.test.len(),
        settings.max_reasoning,
        settings.connector,
        settings.system,
        if changed.is_empty() { String::new() } else { format!("; changed by flags: {}", changed.join(", ")) }
    ));
    Ok((settings, prompt, Some((config.split, run.to_path_buf()))))
}

fn run_eval(
    settings: &OptimizeConfig,
    prompt: &str,
    run_split: Option<RunSplit>,
    out: Option<&Path>,
) -> Result<()> {
    let (task, split) = settings.load_task()?;
    if let Some((recorded, run)) = &run_split {
        greater::records::same_split(recorded, &split, &run.join(file::CONFIG))?;
    }
    // Opened before the model, so that an unwritable place or a partial log of other
    // settings is said at once.
    let mut log = match out {
        Some(path) => Some(RecordLog::open(path, &eval_header(settings, prompt)?)?),
        None => None,
    };
    let lm = LanguageModel::open(&settings.model, &settings.open_options(), &mut |m| note(m))?;
    let test = app::test_questions(&split, &task)?;
    note(&format!(
        "task {} ({}), {} test questions from {}; split seed {} (train {}, dev {}, test {})",
        task.name,
        task.kind.describe(),
        test.len(),
        task.source,
        split.seed,
        split.train.len(),
        split.dev.len(),
        split.test.len()
    ));
    note(&format!("prompt: {prompt:?}"));
    if let (Some(log), Some(path)) = (&log, out) {
        if log.dest() != path {
            note(&format!("{} is a link: writing {}", path.display(), log.dest().display()));
        }
    }
    if let Some(log) = log.as_ref().filter(|log| log.kept() > 0) {
        note(&format!(
            "resuming: {} of the {} questions are done in {}",
            log.kept(),
            test.len(),
            log.partial().display()
        ));
    }
    let bar = progress_bar(test.len(), "eval");
    let cfg = EvalConfig::of(settings, Some(ctrl_c_flag()?));
    let partial = log.as_ref().map(|log| log.partial().to_path_buf());
    let measured = (|| -> Result<_> {
        let report = evaluate_logged(&lm, &task, &test, prompt, &cfg, log.as_mut(), &mut |done| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        if let Some(log) = log {
            let dest = log.dest().to_path_buf();
            log.finish(&report.records)?;
            note(&format!("wrote {} records to {}", report.records.len(), dest.display()));
        }
        Ok(report)
    })();
    let report = measured.inspect_err(|_| {
        bar.finish_and_clear();
        if let Some(partial) = partial {
            let kept = partial.display();
            note(&format!(
                "the questions finished are kept in {kept}: the same command resumes from them"
            ));
        }
    })?;
    let text = format!(
        "accuracy {:.3} ({}/{}), 95% CI [{:.3}, {:.3}]; majority-class floor {:.3}\n\
         reasoning cut at the {}-token budget: {}/{}\n\
         answers that did not parse: {}/{}\n\
         generated {} tokens in {:.1} s ({:.1} tokens/s)",
        report.accuracy,
        report.correct,
        report.n,
        report.interval.0,
        report.interval.1,
        report.majority_floor,
        settings.max_reasoning,
        report.cut_by_budget,
        report.n,
        report.unparsed,
        report.n,
        report.tokens_generated,
        report.seconds,
        report.tokens_generated as f64 / report.seconds
    );
    let value = serde_json::json!({ "task": task.name, "model": settings.model, "prompt": prompt, "max_reasoning": settings.max_reasoning, "result": report });
    print_result(&text, &value)
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<()> {
    let sub = matches.subcommand().map(|(_, m)| m).expect("a subcommand is required");
    greater::model::kernels::isa::check_env()?;
    if cli.verbose {
        note(&greater::model::kernels::describe());
    }
    match cli.command {
        Command::Generate { settings, prompt, temp, top_p } => {
            let given = Given { settings: &settings, matches: sub };
            given.refuse_others(GENERATE_KEYS, "generate")?;
            if temp.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
                anyhow::bail!(
                    "--temp must be a finite number above 0 (leave it out to decode greedily)"
                );
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                anyhow::bail!("--top-p must be above 0 and at most 1, not {top_p}");
            }
            let lm =
                LanguageModel::open(&settings.model, &settings.open_options(), &mut |m| note(m))?;
            let ids = lm.chat_ids(&settings.system, &prompt)?;
            let sampling =
                temp.map(|temperature| Sampling { temperature, top_p, seed: settings.seed });
            let replies =
                lm.complete(&[ids], &lm.generate_config(settings.max_reasoning, sampling))?;
            let (reply, stop) = &replies[0];
            let value = serde_json::json!({ "reply": reply.trim(), "stopped_at_context_limit": *stop == StopReason::ContextLimit });
            print_result(reply.trim(), &value)?;
            if *stop == StopReason::ContextLimit {
                note(
                    "(stopped at the end of the model's context; the reply above is what it made)",
                );
            }
        }
        Command::Eval { settings, prompt, prompt_from, out } => {
            let given = Given { settings: &settings, matches: sub };
            let (settings, prompt, run_split) =
                eval_settings(&given, prompt, prompt_from.as_deref())?;
            run_eval(&settings, &prompt, run_split, out.as_deref())?;
        }
        Command::Optimize(args) => {
            run_optimize_command(&args, &Given { settings: &args.settings, matches: sub })?
        }
        Command::Protocol(args) => {
            run_protocol_command(&args, &Given { settings: &args.run.settings, matches: sub })?
        }
        Command::Screen(args) => {
            run_screen_command(&args, &Given { settings: &args.run.settings, matches: sub })?
        }
        Command::Report { dir, out } => {
            let path = greater::report::write_report(&dir, out.as_deref())?;
            let value = serde_json::json!({ "report": path.display().to_string() });
            print_result(&format!("wrote {}", path.display()), &value)?;
        }
        Command::Export { run, to, out } => {
            let laid = greater::export::Laid::of_run(&run, &mut |m| note(m))?;
            let file = laid.write(to, out.as_deref())?;
            match &out {
                Some(path) => {
                    let value =
                        serde_json::json!({ "target": to, "out": path.display().to_string() });
                    print_result(&format!("wrote {}", path.display()), &value)?;
                }
                None if output().json => {
                    print_result("", &serde_json::json!({ "target": to, "file": file }))?
                }
                None => print!("{file}"),
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "greater", &mut std::io::stdout());
        }
        Command::Tasks => {
            let mut text = format!("{:<42} {:<22} {:<24} extractor", "task", "answer", "data");
            let mut value = Vec::new();
            for t in builtin_tasks() {
                let (answer, extractor) = (t.kind.describe(), t.kind.default_extractor());
                text.push_str(&format!(
                    "\n{:<42} {:<22} {:<24} {extractor}",
                    t.name, answer, t.source
                ));
                value.push(serde_json::json!({ "task": t.name, "answer": answer, "data": t.source, "extractor": extractor }));
            }
            print_result(&text, &value)?;
        }
        Command::Models => {
            let (mut text, mut value) = (Vec::new(), Vec::new());
            for e in catalog::CATALOG {
                let wheels: Vec<String> =
                    e.wheels.iter().map(|(p, v)| format!("{p}=={v}")).collect();
                text.push(format!("{} ({})", e.alias, e.description));
                text.push(format!("  cached:  {}", if e.is_cached() { "yes" } else { "no" }));
                text.push(format!(
                    "  file:    {} ({:.1} MB)",
                    e.path().display(),
                    e.size as f64 / 1e6
                ));
                text.push(format!("  sha256:  {}", e.sha256));
                let parts = if wheels.len() > 1 {
                    "s (the GGUF's parts, joined in this order)"
                } else {
                    ""
                };
                text.push(format!("  source:  PyPI wheel{parts}: {}", wheels.join(", ")));
                value.push(serde_json::json!({ "alias": e.alias, "description": e.description, "cached": e.is_cached(), "file": e.path().display().to_string(), "size": e.size, "sha256": e.sha256, "wheels": wheels }));
            }
            print_result(&text.join("\n"), &value)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Errors are messages for the user: candle and anyhow would append a backtrace to them
    // when RUST_BACKTRACE is set. Panics keep theirs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    greater::runtime::stop_candle_spinning();
    // Output into a closed pipe (`greater tasks | head`) ends the process quietly, as other
    // command-line tools do, instead of a panic in println!.
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    OUTPUT.set(Output { quiet: cli.quiet, json: cli.json }).ok();
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        // The shell's convention for a process ended by SIGINT.
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
