//! A whole optimisation run: set up (model, task, split, run folder), the steps with a
//! checkpoint after each, and the held-out evaluation of zero-shot CoT, the initial prompt
//! and the best prompt.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::ape::PROPOSALS_PER_ROUND;
use super::select::{best_by_train, choose_on_dev, Contender};
use super::{Method, Optimizer, OptimizeConfig, StartFrom, State, StepRecord};
use crate::eval::{evaluate, write_records, EvalConfig, EvalReport};
use crate::model::catalog;
use crate::runtime::{LanguageModel, OpenOptions};
use crate::store::RunDir;
use crate::tasks::{Example, Split, Task, ZERO_SHOT_COT};

/// What `config.json` records: enough to resume and to reproduce.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub settings: OptimizeConfig,
    pub initial_prompt: String,
    pub model_path: String,
    pub model_sha256: String,
    pub task: TaskRecord,
    pub split: Split,
    pub greater_version: String,
}

impl RunConfig {
    /// "method greater, model M (sha256 ...), task T (kind), split seed S: a train / b dev /
    /// c test questions"
    pub fn setup(&self) -> String {
        format!(
            "method {}, model {} (sha256 {}), task {} ({}), split seed {}: {} train / {} dev / {} test questions",
            self.settings.method.name(),
            self.model_path,
            &self.model_sha256[..12.min(self.model_sha256.len())],
            self.task.name,
            self.task.answer_kind,
            self.split.seed,
            self.split.train.len(),
            self.split.dev.len(),
            self.split.test.len()
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub name: String,
    pub answer_kind: String,
    pub extractor: String,
    pub source: String,
    pub examples: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    pub label: String,
    pub prompt: String,
    pub accuracy: f64,
    pub correct: usize,
    pub n: usize,
    pub interval: (f64, f64),
    pub seconds: f64,
    /// Reasonings that ran into the reasoning budget (not counted before 2026-12-03).
    #[serde(default)]
    pub cut_by_budget: Option<usize>,
}

impl EvalSummary {
    pub fn new(label: &str, prompt: &str, r: &EvalReport) -> Self {
        EvalSummary {
            label: label.into(),
            prompt: prompt.into(),
            accuracy: r.accuracy,
            correct: r.correct,
            n: r.n,
            interval: r.interval,
            seconds: r.seconds,
            cut_by_budget: Some(r.cut_by_budget),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    /// The returned prompt (also in best_prompt.txt).
    pub best_prompt: String,
    /// The contender it came from, and what chose it.
    pub selected: String,
    pub selected_by: String,
    pub best_train_score: f64,
    /// Tokens the search decoded (reasoning on train, `ape`'s proposals).
    #[serde(default)]
    pub generated_tokens: usize,
    /// `ape`'s budget in generated tokens.
    #[serde(default)]
    pub budget_tokens: Option<usize>,
    pub majority_floor: f64,
    /// Every prompt that could be returned: train score and dev accuracy.
    pub contenders: Vec<Contender>,
    /// Test accuracy of zero-shot CoT, the initial and the returned ("optimised") prompt.
    pub evaluations: Vec<EvalSummary>,
}

/// Zero-shot CoT, the initial prompt, then the `dev_candidates` best prompts of the search by
/// train score (each prompt once). Scores zero-shot CoT on train when the search has not.
fn contenders(optimizer: &Optimizer, state: &mut State, s: &OptimizeConfig, initial: &str) -> Result<Vec<Contender>> {
    let initial = optimizer.prompt_text(&optimizer.prompt_ids(initial)?)?;
    if !state.scores.contains_key(ZERO_SHOT_COT) {
        let score = optimizer.score_text(ZERO_SHOT_COT)?;
        state.scores.insert(ZERO_SHOT_COT.to_string(), score);
    }
    let train = |p: &str| state.scores[p].clone();
    let mut out = vec![
        Contender { label: "zero-shot CoT".into(), prompt: ZERO_SHOT_COT.into(), train: train(ZERO_SHOT_COT), dev: None },
        Contender { label: "initial".into(), prompt: initial.clone(), train: train(&initial), dev: None },
    ];
    let searched = state.scores.iter().filter(|(p, _)| **p != initial && p.as_str() != ZERO_SHOT_COT);
    let searched = best_by_train(searched, s.dev_candidates);
    for (i, (prompt, train)) in searched.into_iter().enumerate() {
        out.push(Contender { label: format!("train #{}", i + 1), prompt, train, dev: None });
    }
    Ok(out)
}

/// Decoding speed and reasoning length measured on the initial prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Calibration {
    tokens_per_second: f64,
    mean_reasoning: f64,
}

/// What the run reports as it goes; the CLI draws it.
pub enum Event<'a> {
    Info(String),
    /// Steps to run (from `done`) and the budget line.
    Start { done: usize, total: usize, budget: String },
    Step(&'a StepRecord, &'a State),
    EvalStart { label: &'a str, questions: usize },
    EvalProgress(usize),
}

/// sha256 of the model's file, or of its folder's files (names and contents).
fn model_sha256(path: &Path) -> Result<String> {
    if let Some(e) = catalog::CATALOG.iter().find(|e| e.path() == path && e.is_cached()) {
        return Ok(e.sha256.to_string());
    }
    if path.is_file() {
        return catalog::sha256_file(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut listing = String::new();
    for f in files {
        listing.push_str(&format!("{} {}\n", f.file_name().unwrap_or_default().to_string_lossy(), catalog::sha256_file(&f)?));
    }
    use sha2::Digest;
    Ok(catalog::hex(&sha2::Sha256::digest(listing.as_bytes())))
}

fn load_task(s: &OptimizeConfig) -> Result<(Task, Split)> {
    let sizes = (s.train, s.dev, s.test);
    let (task, split) = Task::load_split(&s.task, s.data_dir.as_ref().map(PathBuf::from), s.seed, s.difficulty, sizes)?;
    Ok((task.with_extractor_options(s.extractor_options), split))
}

fn open_model(s: &OptimizeConfig, report: &mut dyn FnMut(Event)) -> Result<LanguageModel> {
    let opts = OpenOptions { chat_template: s.chat_template.as_ref().map(PathBuf::from), precision: s.precision };
    LanguageModel::open(&s.model, &opts, &mut |m| report(Event::Info(m.to_string())))
}

/// How held-out questions are evaluated: the run's layout and reasoning budget.
fn eval_config(s: &OptimizeConfig, interrupt: &Arc<AtomicBool>) -> EvalConfig {
    EvalConfig {
        batch: s.eval_batch,
        max_reasoning: s.max_reasoning,
        connector: s.connector.clone(),
        system: s.system.clone(),
        cancel: Some(Arc::clone(interrupt)),
    }
}

/// [`evaluate`], its progress reported under `label`.
fn evaluate_reported(
    lm: &LanguageModel,
    task: &Task,
    examples: &[&Example],
    prompt: &str,
    cfg: &EvalConfig,
    label: &str,
    report: &mut dyn FnMut(Event),
) -> Result<EvalReport> {
    report(Event::EvalStart { label, questions: examples.len() });
    evaluate(lm, task, examples, prompt, cfg, &mut |done| report(Event::EvalProgress(done)))
}

/// A finished run's returned prompt and zero-shot CoT on another model (the paper's
/// transfer setting): the run's test questions, layout and reasoning budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub model: String,
    pub zero_shot_cot: EvalSummary,
    pub optimised: EvalSummary,
}

/// Evaluates the transfer of the finished run in `out` to `model`; kept in
/// `transfer-<model>.json` and read from there when it measured the same prompt.
pub fn transfer(out: &Path, model: &str, interrupt: &Arc<AtomicBool>, report: &mut dyn FnMut(Event)) -> Result<Transfer> {
    let dir = RunDir::open(out)?;
    if !dir.exists("summary.json") {
        bail!("{} holds no finished run (no summary.json) to transfer", out.display());
    }
    let summary: Summary = dir.read_json("summary.json")?;
    let name = Path::new(model).file_stem().and_then(|n| n.to_str()).unwrap_or(model);
    let file = format!("transfer-{}.json", name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-', "_"));
    if dir.exists(&file) {
        let done: Transfer = dir.read_json(&file)?;
        if done.model == model && done.optimised.prompt == summary.best_prompt {
            return Ok(done);
        }
    }
    let config: RunConfig = dir.read_json("config.json")?;
    let (task, split) = load_task(&config.settings)?;
    if split != config.split {
        bail!("the task's data changed since the run: the split differs from {}/config.json", out.display());
    }
    // The target model's own chat template, not a file given for the source model.
    let target = OptimizeConfig { model: model.to_string(), chat_template: None, ..config.settings.clone() };
    let lm = open_model(&target, report)?;
    let test = Split::pick(&config.split.test, &task);
    let eval_cfg = eval_config(&config.settings, interrupt);
    let mut measure = |label: &str, prompt: &str| -> Result<EvalSummary> {
        let r = evaluate_reported(&lm, &task, &test, prompt, &eval_cfg, &format!("transfer to {model}: {label}"), report)?;
        Ok(EvalSummary::new(label, prompt, &r))
    };
    let result = Transfer {
        model: model.to_string(),
        zero_shot_cot: measure("zero-shot CoT", ZERO_SHOT_COT)?,
        optimised: measure("optimised", &summary.best_prompt)?,
    };
    dir.write_json(&file, &result)?;
    Ok(result)
}

/// How a run begins.
pub enum Start {
    New(OptimizeConfig),
    /// Continue the run in the folder, optionally with a different step count.
    Resume { steps: Option<usize> },
}

/// Starts a run in `out`, or continues the one there.
pub fn run(start: Start, out: &Path, interrupt: &Arc<AtomicBool>, report: &mut dyn FnMut(Event)) -> Result<Summary> {
    // The lock is held until the run returns.
    let (dir, _lock, config, lm, task) = match start {
        Start::New(s) => {
            s.validate()?;
            let (task, split) = load_task(&s)?;
            let dir = RunDir::create(out)?;
            let lock = dir.lock()?;
            let lm = open_model(&s, report)?;
            let config = RunConfig {
                initial_prompt: s.initial_prompt.clone().unwrap_or_else(|| task.initial_prompt.clone()),
                model_path: lm.path.display().to_string(),
                model_sha256: model_sha256(&lm.path)?,
                task: TaskRecord {
                    name: task.name.clone(),
                    answer_kind: task.kind.describe(),
                    extractor: task.extractor.clone(),
                    source: task.source.clone(),
                    examples: task.examples.len(),
                },
                split,
                settings: s,
                greater_version: env!("CARGO_PKG_VERSION").into(),
            };
            dir.write_json("config.json", &config)?;
            (dir, lock, config, lm, task)
        }
        Start::Resume { steps } => {
            let dir = RunDir::open(out)?;
            let lock = dir.lock()?;
            let mut config: RunConfig = dir.read_json("config.json")?;
            config.settings.validate().map_err(|e| anyhow::anyhow!("{}: {e}", out.join("config.json").display()))?;
            if let Some(steps) = steps {
                config.settings.steps = steps;
                dir.write_json("config.json", &config)?;
            }
            let (task, split) = load_task(&config.settings)?;
            if split != config.split {
                bail!("the task's data changed since the run started: the split differs from {}/config.json", out.display());
            }
            let lm = open_model(&config.settings, report)?;
            let sha = model_sha256(&lm.path)?;
            if sha != config.model_sha256 {
                bail!("the model file changed since the run started (sha256 {sha}, recorded {})", config.model_sha256);
            }
            report(Event::Info(format!("resuming {}", out.display())));
            (dir, lock, config, lm, task)
        }
    };
    let s = &config.settings;
    let train = Split::pick(&config.split.train, &task);
    let optimizer = Optimizer::new(&lm, &task, &train, s, Arc::clone(interrupt))?;

    let mut state: State = if dir.exists("checkpoint.json") {
        let state: State = dir.read_json("checkpoint.json")?;
        state.check(train.len()).map_err(|e| anyhow::anyhow!("{}: {e}", out.join("checkpoint.json").display()))?;
        state
    } else {
        report(Event::Info(format!("scoring the initial prompt on {} train questions", train.len())));
        let t = Instant::now();
        let starts = match s.start {
            StartFrom::Initial => vec![config.initial_prompt.as_str()],
            StartFrom::Better => vec![config.initial_prompt.as_str(), ZERO_SHOT_COT],
        };
        let state = optimizer.initial_state(&starts)?;
        let lengths: Vec<usize> = state.reasoning.iter().flatten().map(Vec::len).collect();
        let tokens: usize = lengths.iter().sum();
        let calibration = Calibration {
            tokens_per_second: tokens as f64 / t.elapsed().as_secs_f64(),
            mean_reasoning: tokens as f64 / lengths.len().max(1) as f64,
        };
        dir.write_json("calibration.json", &calibration)?;
        dir.write_json("checkpoint.json", &state)?;
        state
    };
    dir.truncate_steps(state.step)?;

    let budget_tokens = search(&optimizer, &dir, s, &mut state, train.len(), report)?;
    // The returned prompt: the best on dev among the best few by train score, the initial
    // prompt and zero-shot CoT. Test questions are measured only after it is chosen.
    let mut contenders = contenders(&optimizer, &mut state, s, &config.initial_prompt)?;
    dir.write_json("checkpoint.json", &state)?;
    let eval_cfg = eval_config(s, interrupt);
    let dev = Split::pick(&config.split.dev, &task);
    let mut measure = |c: &Contender, examples: &[&Example], split: &str| -> Result<EvalSummary> {
        let file = format!("{split}-{}.json", c.label.replace([' ', '-', '#'], "_").to_lowercase());
        let done: Option<EvalSummary> = if dir.exists(&file) { Some(dir.read_json(&file)?) } else { None };
        // An earlier evaluation stands only if it measured the same prompt.
        if let Some(done) = done.filter(|d| d.prompt == c.prompt) {
            return Ok(done);
        }
        let r = evaluate_reported(&lm, &task, examples, &c.prompt, &eval_cfg, &format!("{split}: {}", c.label), report)?;
        write_records(&dir.path.join(file.replace(".json", ".jsonl")), &r.records)?;
        let summary = EvalSummary::new(&c.label, &c.prompt, &r);
        dir.write_json(&file, &summary)?;
        Ok(summary)
    };
    let chosen = choose_on_dev(&mut contenders, &dev, &mut |c, examples| measure(c, examples, "dev"))?;
    let best_prompt = contenders[chosen].prompt.clone();
    dir.write_atomic("best_prompt.txt", best_prompt.as_bytes())?;

    let test = Split::pick(&config.split.test, &task);
    let mut evaluations = Vec::new();
    if !test.is_empty() {
        let optimised = Contender { label: "optimised".into(), ..contenders[chosen].clone() };
        for c in [&contenders[0], &contenders[1], &optimised] {
            let same = evaluations.iter().find(|e: &&EvalSummary| e.prompt == c.prompt).cloned();
            let e = match same {
                Some(e) => EvalSummary { label: c.label.clone(), ..e },
                None => measure(c, &test, "test")?,
            };
            evaluations.push(e);
        }
    }
    let summary = Summary {
        steps: state.step,
        best_prompt,
        selected: contenders[chosen].label.clone(),
        selected_by: if dev.is_empty() { "train score".into() } else { "dev accuracy".into() },
        best_train_score: state.best_score,
        generated_tokens: state.generated_tokens,
        budget_tokens,
        majority_floor: Task::majority_floor(&test),
        contenders,
        evaluations,
    };
    dir.write_json("summary.json", &summary)?;
    dir.write_atomic("summary.md", summary_table(&summary, &config).as_bytes())?;
    crate::report::write_report(&dir.path, None)?;
    Ok(summary)
}

/// The search until its end: `steps` GReaTer (or gcg) steps, or `ape` rounds until the
/// token budget is spent; each logged and checkpointed. Returns `ape`'s budget.
fn search(
    optimizer: &Optimizer,
    dir: &RunDir,
    s: &OptimizeConfig,
    state: &mut State,
    n_train: usize,
    report: &mut dyn FnMut(Event),
) -> Result<Option<usize>> {
    let calibration: Calibration = dir.read_json("calibration.json")?;
    let log_step = |record: StepRecord, state: &State, report: &mut dyn FnMut(Event)| -> Result<()> {
        dir.append_step(&record)?;
        dir.write_json("checkpoint.json", state)?;
        report(Event::Step(&record, state));
        Ok(())
    };
    if s.method == Method::Ape {
        let budget = ape_budget(s, &calibration, n_train);
        if state.generated_tokens < budget {
            let (total, line) = ape_budget_line(&calibration, state, budget, n_train);
            report(Event::Start { done: state.step, total, budget: line });
            let cost = proposal_cost(&calibration, n_train);
            while state.generated_tokens < budget {
                // The last round proposes only what the rest of the budget should pay for.
                let left = (budget - state.generated_tokens) as f64;
                let proposals = ((left / cost).ceil() as usize).clamp(1, PROPOSALS_PER_ROUND);
                let record = optimizer.ape_round(state, proposals)?;
                log_step(record, state, report)?;
            }
        }
        return Ok(Some(budget));
    }
    let remaining = s.steps.saturating_sub(state.step);
    let stopped_early = s.patience > 0 && state.steps_since_best >= s.patience;
    if remaining > 0 && !stopped_early {
        let budget = budget_line(optimizer, &calibration, s, state, remaining, n_train)?;
        report(Event::Start { done: state.step, total: s.steps, budget });
        while state.step < s.steps {
            let record = optimizer.step(state)?;
            log_step(record, state, report)?;
            if s.patience > 0 && state.steps_since_best >= s.patience {
                report(Event::Info(format!("no better prompt for {} steps: stopping", s.patience)));
                break;
            }
        }
    }
    Ok(None)
}

/// Generated tokens and gradient passes still to come, and the time they should take at
/// the decoding rate measured on the initial prompt and one timed gradient pass.
fn budget_line(
    optimizer: &Optimizer,
    c: &Calibration,
    s: &OptimizeConfig,
    state: &State,
    steps: usize,
    n_train: usize,
) -> Result<String> {
    let t = Instant::now();
    optimizer.time_one_gradient(state)?;
    let per_pass = t.elapsed().as_secs_f64();
    // Reasoning under the shortlisted prompts each step, the contenders on dev, then the
    // three test evaluations.
    let sequences = steps * s.shortlist * n_train + (2 + s.dev_candidates) * s.dev + 3 * s.test;
    let tokens = (sequences as f64 * c.mean_reasoning) as usize;
    let passes = steps * n_train;
    let secs = tokens as f64 / c.tokens_per_second.max(1e-6) + passes as f64 * per_pass;
    if s.method == Method::Gcg {
        // Its search writes no reasoning, so nothing measured the evaluations' rate.
        return Ok(format!(
            "budget: {steps} steps: {passes} forward+backward passes ({per_pass:.1} s each), about {} before the evaluations (not estimated: gcg's search writes no reasoning)",
            human_duration(passes as f64 * per_pass)
        ));
    }
    Ok(format!(
        "budget: {steps} steps: about {tokens} generated tokens ({} sequences x {:.0} tokens, at {:.0} tokens/s measured) and {passes} forward+backward passes ({per_pass:.1} s each): about {}",
        sequences,
        c.mean_reasoning,
        c.tokens_per_second,
        human_duration(secs)
    ))
}

/// `ape`'s token budget: the setting, or what a GReaTer run of `steps` steps decodes: the
/// starting prompt's reasoning, then the shortlist's on every train question each step, at
/// the starting prompt's mean reasoning length.
fn ape_budget(s: &OptimizeConfig, c: &Calibration, n_train: usize) -> usize {
    s.budget_tokens.unwrap_or((((1 + s.steps * s.shortlist) * n_train) as f64 * c.mean_reasoning) as usize)
}

/// Tokens one `ape` proposal should cost: a short instruction, then its reasoning on every
/// train question at the starting prompt's mean length.
fn proposal_cost(c: &Calibration, n_train: usize) -> f64 {
    16.0 + n_train as f64 * c.mean_reasoning
}

/// The rounds `ape` should need for the rest of its budget, and the budget line.
fn ape_budget_line(c: &Calibration, state: &State, budget: usize, n_train: usize) -> (usize, String) {
    let per_round = PROPOSALS_PER_ROUND as f64 * proposal_cost(c, n_train);
    let left = budget - state.generated_tokens;
    let rounds = (left as f64 / per_round).ceil().max(1.0) as usize;
    let secs = rounds as f64 * per_round / c.tokens_per_second.max(1e-6);
    let line = format!(
        "budget: {budget} generated tokens ({} spent): about {rounds} rounds of {PROPOSALS_PER_ROUND} proposed instructions scored on {n_train} train questions, at {:.0} tokens/s measured: about {}",
        state.generated_tokens,
        c.tokens_per_second,
        human_duration(secs)
    );
    (state.step + rounds, line)
}

pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// One plain sentence: did the returned prompt beat both baselines on the test questions?
pub fn verdict(summary: &Summary) -> String {
    let [zs, initial, optimised] = match summary.evaluations.as_slice() {
        [a, b, c] => [a, b, c],
        _ => return "No test questions: nothing is claimed.".into(),
    };
    let points = |e: &EvalSummary| 100.0 * (optimised.accuracy - e.accuracy);
    let (over_zs, over_initial) = (points(zs), points(initial));
    if summary.selected == "zero-shot CoT" || summary.selected == "initial" {
        return format!(
            "No gain: no searched prompt did better on dev than the {} prompt, which is returned ({:+.1} points over zero-shot CoT, {:+.1} over the initial prompt on {} test questions).",
            summary.selected, over_zs, over_initial, optimised.n
        );
    }
    let word = if over_zs > 0.0 && over_initial > 0.0 { "Gain" } else { "No gain" };
    format!(
        "{word}: the optimised prompt scores {over_zs:+.1} points over zero-shot CoT and {over_initial:+.1} over the initial prompt on {} test questions.",
        optimised.n
    )
}

/// Share of cut reasonings above which the summary says that the budget shaped the result.
const CUT_WARNING_SHARE: f64 = 0.1;

/// A sentence when many test reasonings ran into the budget: their answers were forced
/// mid-reasoning, so the accuracies measure the budget as much as the prompts.
pub fn budget_warning(evaluations: &[EvalSummary], budget: usize) -> Option<String> {
    let counted = evaluations.iter().filter_map(|e| Some((e.cut_by_budget?, e.n)));
    let (cut, n) = counted.fold((0, 0), |(c, n), (ec, en)| (c + ec, n + en));
    (n > 0 && cut as f64 > CUT_WARNING_SHARE * n as f64).then(|| {
        format!(
            "{cut} of {n} test reasonings ran into the {budget}-token reasoning budget and had their answer forced mid-reasoning; with a larger `--max-reasoning` these accuracies may differ."
        )
    })
}

pub fn summary_table(summary: &Summary, config: &RunConfig) -> String {
    let mut out = format!("# greater run\n\n{}, {} steps\n\n", config.setup(), summary.steps);
    let budget = config.settings.max_reasoning;
    out.push_str(&format!(
        "| prompt | test accuracy | 95% interval | reasoning cut at {budget} tokens | text |\n|---|---|---|---|---|\n"
    ));
    for e in &summary.evaluations {
        out.push_str(&format!(
            "| {} | {:.3} ({}/{}) | [{:.3}, {:.3}] | {} | {} |\n",
            e.label,
            e.accuracy,
            e.correct,
            e.n,
            e.interval.0,
            e.interval.1,
            e.cut_by_budget.map_or("-".into(), |c| format!("{c}/{}", e.n)),
            e.prompt.replace('|', "\\|")
        ));
    }
    out.push_str(&format!("\n{}\n", verdict(summary)));
    if let Some(line) = budget_warning(&summary.evaluations, budget) {
        out.push_str(&format!("\n{line}\n"));
    }
    out.push_str(&format!(
        "\nmajority-class floor {:.3}. The optimised prompt is `{}`, chosen by {} among:\n\n",
        summary.majority_floor, summary.selected, summary.selected_by
    ));
    out.push_str("| prompt | train score | train mistakes | dev accuracy | 95% interval | text |\n|---|---|---|---|---|---|\n");
    for c in &summary.contenders {
        let dev = c.dev.as_ref().map_or(("-".to_string(), "-".to_string()), |d| {
            (format!("{:.3} ({}/{})", d.accuracy, d.correct, d.n), format!("[{:.3}, {:.3}]", d.interval.0, d.interval.1))
        });
        out.push_str(&format!(
            "| {} | {:.3} | {}/{} | {} | {} | {} |\n",
            c.label, c.train.score, c.train.mistakes, c.train.n, dev.0, dev.1, c.prompt.replace('|', "\\|")
        ));
    }
    out
}
