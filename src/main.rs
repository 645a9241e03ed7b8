use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use greater::eval::{evaluate, write_records, EvalConfig};
use greater::optimize::run::{run as run_optimize, Event, Start};
use greater::layout::REFERENCE_CONNECTOR;
use greater::protocol::{run_protocol, ProtocolEvent, PAPER_TASKS};
use greater::records::{ProtocolConfig, RunConfig, ScreenConfig};
use greater::report::text::{protocol_markdown, screen_markdown, summary_table};
use greater::report::{on_protocol_event, on_run_event, write_screen_outputs};
use greater::screen::{run_screen, ScreenEvent};
use greater::settings::{Accept, Filler, GradientSum, Method, OptimizeConfig, Preset, StartFrom, Vocabulary};
use greater::store::RunDir;
use greater::catalog;
use greater::model::Precision;
use greater::tokenizer::SystemTurn;
use greater::model::generate::{Cancelled, Sampling};
use greater::runtime::{LanguageModel, OpenOptions};
use greater::tasks::{builtin_tasks, ExtractorOptions, Split, Task, ZERO_SHOT_COT};

#[derive(Parser)]
#[command(name = "greater", version, about = "Optimise a local model's task prompt with gradients over reasoning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ModelArgs {
    /// Alias (see `greater models`), GGUF file or Hugging Face model folder.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Arithmetic of decoding and prefill: f32, or mixed (8-bit integer dot products).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
}

impl ModelArgs {
    fn open(&self) -> Result<LanguageModel> {
        let opts = OpenOptions { chat_template: self.chat_template.clone(), precision: self.precision };
        LanguageModel::open(&self.model, &opts, &mut |m| eprintln!("{m}"))
    }
}

#[derive(Args)]
struct TaskArgs {
    /// Built-in task (see `greater tasks`), a .toml task file, or a BBH-format .json file.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Folder holding bbh/, gsm8k/ and folio/ for the benchmark tasks.
    #[arg(long, env = "GREATER_DATA")]
    data_dir: Option<PathBuf>,
    /// Seed of the split (and of generated questions).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Operators per generated question.
    #[arg(long, default_value_t = 2)]
    difficulty: usize,
    #[arg(long, default_value_t = 50)]
    train: usize,
    #[arg(long, default_value_t = 0)]
    dev: usize,
    #[arg(long, default_value_t = 100)]
    test: usize,
    /// Letters a BBH multiple-choice extractor lists: data (as many as the data's options)
    /// or reference (the reference script's fixed list per task).
    #[arg(long, value_enum, default_value = "data")]
    extractor_options: ExtractorOptions,
}

impl TaskArgs {
    fn load(&self) -> Result<(Task, Split)> {
        let sizes = (self.train, self.dev, self.test);
        let (task, split) = Task::load_split(&self.task, self.data_dir.clone(), self.seed, self.difficulty, sizes)?;
        Ok((task.with_extractor_options(self.extractor_options), split))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Baseline {
    /// Zero-shot chain of thought: "Let's think step by step."
    ZsCot,
}

#[derive(Subcommand)]
enum Command {
    /// Reply to one prompt with the model's chat template.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// The system turn: none, template (the chat template's default) or a text.
        #[arg(long, default_value = "template")]
        system: SystemTurn,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sample at this temperature instead of decoding greedily.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        sample_seed: u64,
    },
    /// Accuracy of a prompt on a task's held-out test split.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        task: TaskArgs,
        /// The prompt appended to every question.
        #[arg(long, conflicts_with_all = ["baseline", "prompt_from"], required_unless_present_any = ["baseline", "prompt_from"])]
        prompt: Option<String>,
        #[arg(long, value_enum, conflicts_with = "prompt_from")]
        baseline: Option<Baseline>,
        /// The returned prompt of a run folder (its best_prompt.txt, byte for byte).
        #[arg(long)]
        prompt_from: Option<PathBuf>,
        /// Questions decoded together.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Token budget of the reasoning.
        #[arg(long, default_value_t = 1024)]
        max_reasoning: usize,
        /// Text between the question and the prompt (the reference's; as in optimisation).
        #[arg(long, default_value = REFERENCE_CONNECTOR)]
        connector: String,
        /// The system turn: none, template (the chat template's default; as in optimisation) or a text.
        #[arg(long, default_value = "template")]
        system: SystemTurn,
        /// One JSON line per question.
        #[arg(long)]
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
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the built-in tasks.
    Tasks,
    /// List the model aliases and whether they are cached.
    Models,
}

/// Flags of `greater optimize`; each overrides the same key of `--config FILE`.
#[derive(Args)]
struct OptimizeArgs {
    /// Start from every method setting at the reference implementation's value, before
    /// --config and the other flags.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// A TOML file with any of the settings below (keys as the flags, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this folder (its settings come from its config.json; only
    /// --steps may change).
    #[arg(long, conflicts_with_all = [
        "preset", "config", "out", "model", "task", "seed", "difficulty", "train", "dev", "test", "patience", "top_k",
        "top_q", "subset_size", "shortlist", "temperature", "control_weight", "initial_prompt",
        "max_reasoning", "eval_batch", "chat_template", "connector", "keep_current", "sentence_end_rule", "filler",
        "gradient_sum", "vocabulary", "accept", "dev_candidates", "answer_weight", "restart_below", "start",
        "method", "budget_tokens", "precision", "system", "extractor_options",
    ])]
    resume: Option<PathBuf>,
    /// Run folder [default: greater-runs/<task>-<time>].
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    task: Option<String>,
    #[arg(long, env = "GREATER_DATA")]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    difficulty: Option<usize>,
    #[arg(long)]
    train: Option<usize>,
    #[arg(long)]
    dev: Option<usize>,
    #[arg(long)]
    test: Option<usize>,
    #[arg(long)]
    steps: Option<usize>,
    /// Stop after this many steps without a better train score (0: never).
    #[arg(long)]
    patience: Option<usize>,
    /// Each example's top-k tokens at the position [reference: 40].
    #[arg(long)]
    top_k: Option<usize>,
    /// Random example subsets whose top-k sets are intersected [reference: 6].
    #[arg(long)]
    top_q: Option<usize>,
    /// Examples per subset [reference: 5].
    #[arg(long)]
    subset_size: Option<usize>,
    /// Candidates checked for real per step [reference: 3].
    #[arg(long)]
    shortlist: Option<usize>,
    /// Temperature of the answer loss [reference: 0.2].
    #[arg(long)]
    temperature: Option<f64>,
    /// Weight of the prompt's fluency (NLL) [reference: 0.2].
    #[arg(long)]
    control_weight: Option<f64>,
    /// [reference: "proper logical reasoning and think step by step. Finally give the actual correct answer."]
    #[arg(long)]
    initial_prompt: Option<String>,
    /// Token budget of each reasoning [reference: 1024].
    #[arg(long)]
    max_reasoning: Option<usize>,
    /// Questions decoded together when evaluating.
    #[arg(long)]
    eval_batch: Option<usize>,
    #[arg(long)]
    chat_template: Option<String>,
    /// Text between the question and the prompt [reference: ". Use"].
    #[arg(long)]
    connector: Option<String>,
    /// The system turn: none, template (the chat template's default) or a text
    /// [reference: none] [default: template].
    #[arg(long)]
    system: Option<SystemTurn>,
    /// Letters a BBH multiple-choice extractor lists: data or reference (the reference
    /// script's fixed list per task) [reference: reference] [default: data].
    #[arg(long, value_enum)]
    extractor_options: Option<ExtractorOptions>,
    /// The current token may be shortlisted and kept [reference: true].
    #[arg(long)]
    keep_current: Option<bool>,
    /// Take a shortlisted token holding "." at once in the prompt's second half [reference: true].
    #[arg(long)]
    sentence_end_rule: Option<bool>,
    /// Token appended when the prompt grows [reference: underscore].
    #[arg(long, value_enum)]
    filler: Option<Filler>,
    /// How per-example gradients combine [reference: raw].
    #[arg(long, value_enum)]
    gradient_sum: Option<GradientSum>,
    /// Tokens allowed in the prompt [reference: reference].
    #[arg(long, value_enum)]
    vocabulary: Option<Vocabulary>,
    /// Which checked token a step moves to [reference: always].
    #[arg(long, value_enum)]
    accept: Option<Accept>,
    /// Best prompts by train score rescored on the dev split (reference: none; the paper picks
    /// on dev) [default: 4].
    #[arg(long)]
    dev_candidates: Option<usize>,
    /// Weight of the gold answer's NLL in the real score, a finer tie-break than the
    /// mistake count [reference: 0].
    #[arg(long)]
    answer_weight: Option<f64>,
    /// A step whose chosen prompt scores below this restarts at position 0 (0: never)
    /// [reference: 0.12].
    #[arg(long)]
    restart_below: Option<f64>,
    /// Start from the initial prompt or the better of it and zero-shot CoT on train
    /// [reference: initial].
    #[arg(long, value_enum)]
    start: Option<StartFrom>,
    /// greater, or a baseline: ape (instructions the model writes from train examples, at
    /// equal generated tokens) or gcg (the token search with no reasoning before the
    /// answer) [default: greater].
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// Tokens ape may decode [default: what greater decodes in --steps steps].
    #[arg(long)]
    budget_tokens: Option<usize>,
    /// Arithmetic of decoding, prefill and scoring: f32, or mixed (8-bit integer dot
    /// products; the gradient pass stays f32) [reference: f32] [default: f32].
    #[arg(long, value_enum)]
    precision: Option<Precision>,
}

impl OptimizeArgs {
    /// Settings: defaults (or a preset, or the demo when nothing is given and `demo` allows
    /// it), then the config file, then flags.
    fn settings(&self, demo: bool) -> Result<OptimizeConfig> {
        let demo = demo && self.config.is_none() && self.model.is_none() && self.task.is_none() && self.preset.is_none();
        let base = match self.preset {
            Some(Preset::Reference) => OptimizeConfig::reference(),
            None if demo => OptimizeConfig::demo(),
            None => OptimizeConfig::default(),
        };
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
                base.with_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => base,
        };
        macro_rules! overlay {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { c.$field = v.clone(); } )* };
        }
        overlay!(model, task, seed, difficulty, train, dev, test, steps, patience, top_k, top_q, subset_size);
        overlay!(shortlist, temperature, control_weight, max_reasoning, eval_batch, connector, keep_current);
        overlay!(sentence_end_rule, filler, gradient_sum, vocabulary, accept, dev_candidates, answer_weight);
        overlay!(restart_below, start, method, precision, system, extractor_options);
        if let Some(b) = self.budget_tokens {
            c.budget_tokens = Some(b);
        }
        if let Some(p) = &self.initial_prompt {
            c.initial_prompt = Some(p.clone());
        }
        if let Some(d) = &self.data_dir {
            // Absolute, so that --resume works from any folder.
            c.data_dir = Some(d.canonicalize().unwrap_or_else(|_| d.clone()).display().to_string());
        }
        if let Some(t) = &self.chat_template {
            c.chat_template = Some(t.clone());
        }
        if demo {
            eprintln!(
                "no --task or --model given: running the built-in demo ({}, generated arithmetic, {} train / {} dev / {} test questions, {} steps)",
                c.model, c.train, c.dev, c.test, c.steps
            );
        }
        c.validate()?;
        Ok(c)
    }
}

fn run_optimize_command(args: &OptimizeArgs) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    let (start, out) = match &args.resume {
        Some(dir) => (Start::Resume { steps: args.steps }, dir.clone()),
        None => {
            let s = args.settings(true)?;
            let out = args.out.clone().unwrap_or_else(|| default_out(&s.task.replace(['/', '.'], "_")));
            (Start::New(s), out)
        }
    };
    let mut progress = Progress::default();
    let result = run_optimize(start, &out, &interrupt, &mut |e| progress.event(e));
    finish(result, &mut progress, "optimize", &out, |summary| {
        let config: RunConfig = RunDir::open(&out)?.read_json("config.json")?;
        println!("{}", summary_table(&summary, &config));
        println!("best prompt written to {}", out.join("best_prompt.txt").display());
        Ok(())
    })
}

/// A report that cannot be written does not stop a run whose records are saved.
fn warn_on_error(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("warning: could not write a report: {e:#}");
    }
}

/// `greater-runs/<name>-<unix seconds>`.
fn default_out(name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    PathBuf::from(format!("greater-runs/{name}-{secs}"))
}

/// The first Ctrl-C asks a run to stop at once (the last checkpoint stands); a second one,
/// while it winds down, kills the process.
fn ctrl_c_flag() -> Result<Arc<AtomicBool>> {
    let interrupt = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 1, Arc::clone(&interrupt))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupt))?;
    Ok(interrupt)
}

/// Shows a finished run's result, or how to resume an interrupted one (exit 0).
fn finish<T>(result: Result<T>, progress: &mut Progress, command: &str, out: &Path, show: impl FnOnce(T) -> Result<()>) -> Result<()> {
    match result {
        Ok(value) => {
            progress.finish();
            show(value)
        }
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => {
            progress.abandon();
            println!("interrupted: finished steps are saved; continue with greater {command} --resume {}", out.display());
            Ok(())
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
            Event::Info(m) => eprintln!("{}{m}", self.label),
            Event::Start { done, total, budget } => {
                println!("{}{budget}", self.label);
                let b = ProgressBar::new(self.protocol_steps.unwrap_or(total) as u64);
                b.set_style(
                    ProgressStyle::with_template("step {pos}/{len} [{bar:20}] ETA {eta_precise} | {msg}")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                b.set_position((self.offset + done) as u64);
                b.reset_eta();
                self.bar = Some(b);
            }
            Event::Step(record, state) => {
                if let Some(b) = &self.bar {
                    let chosen = record.chosen.as_ref().map_or("(kept)".to_string(), |c| format!("{:?}", c.text));
                    let line = if record.candidates.is_empty() {
                        format!(
                            "{}round {}: {} instructions, best {:.3}: {:?} [{} tokens so far; {}]",
                            self.label,
                            record.step,
                            record.checked.len(),
                            state.best_score,
                            record.best_prompt,
                            state.generated_tokens,
                            record.seconds
                        )
                    } else { format!(
                        "{}step {} pos {}: chose {chosen} -> {:?} (best {:.3}) [{}]",
                        self.label,
                        record.step,
                        record.position,
                        record.prompt,
                        state.best_score,
                        record.seconds
                    ) };
                    // A bar that is not drawn (output not a terminal) prints nothing itself.
                    if b.is_hidden() {
                        println!("{line}");
                    } else {
                        b.println(line);
                    }
                    b.set_message(format!("{}pos {} best {:.3} | {}", self.label, state.position, state.best_score, record.prompt));
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
                }
            }
            Event::Finished(_) => warn_on_error(on_run_event(&event)),
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
    /// "optimised" column, each other adds one; ape spends the tokens greater spent on the
    /// task [default: --method].
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "resume")]
    methods: Vec<Method>,
}

/// Flags of `greater screen`: the base settings of `greater optimize`, tasks and a file of
/// named configurations.
#[derive(Args)]
struct ScreenArgs {
    #[command(flatten)]
    run: OptimizeArgs,
    /// Tasks, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "resume", conflicts_with = "resume")]
    tasks: Vec<String>,
    /// A TOML file of configurations: each table a name, its keys the settings it changes
    /// from the base (e.g. `[budget-512]` then `max_reasoning = 512`).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    configurations: Option<PathBuf>,
}

fn run_screen_command(args: &ScreenArgs) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    let (config, out) = match (&args.run.resume, &args.configurations) {
        (Some(dir), _) => (None, dir.clone()),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let configurations = ScreenConfig::configurations_from_toml(&text, &file.display().to_string())?;
            let config = ScreenConfig { base: args.run.settings(false)?, tasks: args.tasks.clone(), configurations };
            (Some(config), args.run.out.clone().unwrap_or_else(|| default_out("screen")))
        }
        (None, None) => anyhow::bail!("pass --configurations FILE (or --resume DIR)"),
    };
    let mut progress = Progress::default();
    let result = run_screen(config, &out, &interrupt, &mut |event| match event {
        ScreenEvent::Run { index, total, configuration, task, steps } => {
            progress.next_run(format!("run {}/{total} {configuration} {task} | ", index + 1), index, total, steps)
        }
        ScreenEvent::Event(e) => progress.event(e),
    });
    finish(result, &mut progress, "screen", &out, |(table, config)| {
        write_screen_outputs(&out, &table, &config)?;
        println!("{}", screen_markdown(&table, &config));
        println!("table written to {}", out.join("screen.md").display());
        Ok(())
    })
}

fn run_protocol_command(args: &ProtocolArgs) -> Result<()> {
    let interrupt = ctrl_c_flag()?;
    let (config, out) = match &args.run.resume {
        Some(dir) => (None, dir.clone()),
        None => {
            let settings = args.run.settings(false)?;
            let tasks = if args.tasks.is_empty() { PAPER_TASKS.iter().map(|t| t.to_string()).collect() } else { args.tasks.clone() };
            let out = args.run.out.clone().unwrap_or_else(|| default_out("protocol"));
            let config = ProtocolConfig { settings, tasks, transfer_to: args.transfer_to.clone(), methods: args.methods.clone() };
            (Some(config), out)
        }
    };
    let mut progress = Progress::default();
    let result = run_protocol(config, &out, &interrupt, &mut |event| match event {
        ProtocolEvent::Task { index, total, name, steps } => {
            progress.next_run(format!("task {}/{total} {name} | ", index + 1), index, total, steps)
        }
        ProtocolEvent::Run(e) => progress.event(e),
        ProtocolEvent::Table(..) => warn_on_error(on_protocol_event(&out, &event)),
    });
    finish(result, &mut progress, "protocol", &out, |(table, config)| {
        println!("{}", protocol_markdown(&table, &config));
        println!("table written to {}", out.join("protocol.md").display());
        Ok(())
    })
}

fn progress_bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn run_eval(
    model: &ModelArgs,
    task_args: &TaskArgs,
    prompt: &str,
    cfg: EvalConfig,
    out: Option<&Path>,
) -> Result<()> {
    let (task, split) = task_args.load()?;
    if let Some(path) = out {
        // Before the evaluation, not after it: an unwritable place would lose its records.
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    let lm = model.open()?;
    let test = Split::pick(&split.test, &task);
    if test.is_empty() {
        anyhow::bail!("the test split is empty: pass --test N");
    }
    println!(
        "task {} ({}), {} test questions from {}; split seed {} (train {}, dev {}, test {})",
        task.name,
        task.kind.describe(),
        test.len(),
        task.source,
        split.seed,
        split.train.len(),
        split.dev.len(),
        split.test.len()
    );
    println!("prompt: {prompt:?}");
    let bar = progress_bar(test.len(), "eval");
    let report = evaluate(&lm, &task, &test, prompt, &cfg, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    println!(
        "accuracy {:.3} ({}/{}), 95% CI [{:.3}, {:.3}]; majority-class floor {:.3}",
        report.accuracy, report.correct, report.n, report.interval.0, report.interval.1, report.majority_floor
    );
    println!("reasoning cut at the {}-token budget: {}/{}", cfg.max_reasoning, report.cut_by_budget, report.n);
    println!(
        "generated {} tokens in {:.1} s ({:.1} tokens/s)",
        report.tokens_generated,
        report.seconds,
        report.tokens_generated as f64 / report.seconds
    );
    if let Some(path) = out {
        write_records(path, &report.records)?;
        println!("wrote {} records to {}", report.records.len(), path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { model, prompt, system, max_tokens, temperature, top_p, sample_seed } => {
            let lm = model.open()?;
            let ids = lm.chat_ids(&system, &prompt)?;
            let sampling = temperature.map(|temperature| Sampling { temperature, top_p, seed: sample_seed });
            let reply = lm.complete(&[ids], &lm.generate_config(max_tokens, sampling))?;
            println!("{}", reply[0].trim());
        }
        Command::Eval { model, task, prompt, baseline, prompt_from, batch, max_reasoning, connector, system, out } => {
            let prompt = match (prompt, prompt_from, baseline) {
                (Some(p), _, _) => p,
                (None, Some(dir), _) => {
                    let path = dir.join("best_prompt.txt");
                    std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
                }
                (None, None, _) => ZERO_SHOT_COT.to_string(),
            };
            let cfg = EvalConfig { batch, max_reasoning, connector, system, cancel: None };
            run_eval(&model, &task, &prompt, cfg, out.as_deref())?;
        }
        Command::Optimize(args) => run_optimize_command(&args)?,
        Command::Protocol(args) => run_protocol_command(&args)?,
        Command::Screen(args) => run_screen_command(&args)?,
        Command::Report { dir, out } => {
            let path = greater::report::write_report(&dir, out.as_deref())?;
            println!("wrote {}", path.display());
        }
        Command::Tasks => {
            println!("{:<42} {:<22} {:<24} extractor", "task", "answer", "data");
            for t in builtin_tasks() {
                println!("{:<42} {:<22} {:<24} {}", t.name, t.kind.describe(), t.source, t.kind.default_extractor());
            }
        }
        Command::Models => {
            println!("{:<20} {:<8} {:>10}  path / description", "alias", "cached", "size");
            for e in catalog::CATALOG {
                println!(
                    "{:<20} {:<8} {:>7.1} MB  {}\n{:<41}{}",
                    e.alias,
                    if e.is_cached() { "yes" } else { "no" },
                    e.size as f64 / 1e6,
                    e.path().display(),
                    "",
                    e.description
                );
            }
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
