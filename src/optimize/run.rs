//! A whole optimisation run: set up (model, task, split, run folder), the steps with a
//! checkpoint after each, and the held-out evaluation of zero-shot CoT, the initial prompt
//! and the best prompt.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use super::ape::{Ape, MAX_INSTRUCTION_TOKENS, PROPOSALS_PER_ROUND};
use super::select::{best_by_train, choose_on_dev};
use super::Optimizer;
use crate::catalog;
use crate::eval::{evaluate, evaluate_logged, paired, EvalConfig};
use crate::records::same_split;
use crate::records::{
    human_duration, Calibration, Contender, DevCheck, EvalSummary, Label, RunConfig, SelectedBy,
    State, StepRecord, Summary, TaskRecord, Transfer,
};
use crate::runtime::LanguageModel;
use crate::settings::{Method, OptimizeConfig, StartFrom};
use crate::store::{file, DirLock, RunDir};
use crate::tasks::{Example, Split, Task, ZERO_SHOT_COT};

/// Zero-shot CoT, the initial prompt, then the `dev_candidates` best prompts of the search by
/// train score (each prompt once). Scores zero-shot CoT (and the initial prompt, when a
/// checkpoint lost it) on train when the search has not.
fn contenders(
    optimizer: &Optimizer,
    state: &mut State,
    s: &OptimizeConfig,
    initial: &str,
) -> Result<Vec<Contender>> {
    let initial = optimizer.prompt_text(&optimizer.prompt_ids(initial)?)?;
    for prompt in [ZERO_SHOT_COT, initial.as_str()] {
        if !state.scores.contains_key(prompt) {
            let score = optimizer.score_text(prompt)?;
            state.scores.insert(prompt.to_string(), score);
        }
    }
    let train = |p: &str| state.scores[p].clone();
    let mut out = vec![
        Contender {
            label: Label::ZeroShotCot,
            prompt: ZERO_SHOT_COT.into(),
            train: train(ZERO_SHOT_COT),
            dev: None,
        },
        Contender {
            label: Label::Initial,
            prompt: initial.clone(),
            train: train(&initial),
            dev: None,
        },
    ];
    let searched =
        state.scores.iter().filter(|(p, _)| **p != initial && p.as_str() != ZERO_SHOT_COT);
    let searched = best_by_train(searched, s.dev_candidates);
    for (i, (prompt, train)) in searched.into_iter().enumerate() {
        out.push(Contender { label: Label::Train(i + 1), prompt, train, dev: None });
    }
    Ok(out)
}

/// What the run reports as it goes; the CLI draws it.
pub enum Event<'a> {
    /// A line to show.
    Info(String),
    /// Steps to run (from `done`) and the budget line.
    Start {
        /// Steps already done.
        done: usize,
        /// Steps the run will have done.
        total: usize,
        /// The budget line: tokens and time the search is expected to take.
        budget: String,
    },
    /// A step finished: its record and the state after it.
    Step(&'a StepRecord, &'a State),
    /// An evaluation of a contender starts.
    EvalStart {
        /// The contender's label.
        label: &'a str,
        /// Questions to evaluate.
        questions: usize,
    },
    /// Questions of the evaluation under way done so far.
    EvalProgress(usize),
    /// The run in this folder has finished and written its summary.
    Finished(&'a Path),
}

fn open_model(s: &OptimizeConfig, report: &mut dyn FnMut(Event)) -> Result<LanguageModel> {
    LanguageModel::open(&s.model, &s.open_options(), &mut |m| report(Event::Info(m.to_string())))
}

/// The progress of an evaluation of `questions` questions as events under `label`, the
/// first of which (its start) is reported at once.
fn eval_progress<'r>(
    label: &str,
    questions: usize,
    report: &'r mut dyn FnMut(Event),
) -> impl FnMut(usize) + 'r {
    report(Event::EvalStart { label, questions });
    move |done| report(Event::EvalProgress(done))
}

/// The file a transfer of the run to `model` is kept in.
fn transfer_file(model: &str) -> String {
    let name = Path::new(model).file_stem().and_then(|n| n.to_str()).unwrap_or(model);
    let name = name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-', "_");
    format!("transfer-{name}.json")
}

/// The finished run's transfer to `model`, if one was measured for its returned prompt.
pub fn read_transfer(dir: &RunDir, model: &str) -> Result<Option<Transfer>> {
    if !dir.exists(file::SUMMARY) {
        bail!("{} holds no finished run (no summary.json) to transfer", dir.path.display());
    }
    let summary: Summary = dir.read_json(file::SUMMARY)?;
    let file = transfer_file(model);
    if !dir.exists(&file) {
        return Ok(None);
    }
    let done: Transfer = dir.read_json(&file)?;
    Ok((done.model == model && done.optimised.prompt == summary.best_prompt).then_some(done))
}

/// Evaluates the transfer of the finished run in `out` to `model`; kept in
/// `transfer-<model>.json` and read from there when it measured the same prompt.
pub fn transfer(
    out: &Path,
    model: &str,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(Event),
) -> Result<Transfer> {
    let dir = RunDir::open(out)?;
    if let Some(done) = read_transfer(&dir, model)? {
        return Ok(done);
    }
    let summary: Summary = dir.read_json(file::SUMMARY)?;
    let config: RunConfig = dir.read_json(file::CONFIG)?;
    let (task, split) = config.settings.load_task()?;
    same_split(&config.split, &split, &out.join(file::CONFIG))?;
    // The target model's own chat template, not a file given for the source model.
    let target =
        OptimizeConfig { model: model.to_string(), chat_template: None, ..config.settings.clone() };
    let lm = open_model(&target, report)?;
    let test = Split::pick(&config.split.test, &task);
    let eval_cfg = EvalConfig::of(&config.settings, Some(Arc::clone(interrupt)));
    let mut measure = |label: Label, prompt: &str| {
        let mut progress =
            eval_progress(&format!("transfer to {model}: {label}"), test.len(), report);
        evaluate(&lm, &task, &test, prompt, &eval_cfg, &mut progress)
    };
    let zero_shot_cot = measure(Label::ZeroShotCot, ZERO_SHOT_COT)?;
    let optimised = measure(Label::Optimised, &summary.best_prompt)?;
    let result = Transfer {
        model: model.to_string(),
        paired: Some(paired(&optimised.records, &zero_shot_cot.records)?),
        zero_shot_cot: zero_shot_cot.summary(Label::ZeroShotCot, ZERO_SHOT_COT),
        optimised: optimised.summary(Label::Optimised, &summary.best_prompt),
    };
    dir.write_json(&transfer_file(model), &result)?;
    Ok(result)
}

/// How a run (or a protocol, or a screening: `C` is what it records) begins.
pub enum Start<C = OptimizeConfig> {
    /// Start a run with these settings in a new (or empty) folder.
    New(C),
    /// Continue the run in the folder with its recorded settings, but for these changes.
    Resume(Changes),
}

/// What a resumed run may change of its recorded settings: nothing that decides what it
/// computes, only how long it goes on and where its data now lives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// Steps to run in all (more than recorded: the search goes on).
    pub steps: Option<usize>,
    /// The folder holding the benchmark data, when it moved.
    pub data_dir: Option<String>,
}

impl Changes {
    /// `settings` with these changes; whether anything changed.
    pub fn apply(&self, settings: &mut OptimizeConfig) -> bool {
        let before = settings.clone();
        if let Some(steps) = self.steps {
            settings.steps = steps;
        }
        if let Some(dir) = &self.data_dir {
            settings.data_dir = Some(dir.clone());
        }
        *settings != before
    }
}

/// Starts a run in `out`, or continues the one there: the search, then the returned prompt
/// chosen on dev and measured with the baselines on test. Writes the run's records (JSON)
/// as it goes; `report(event)` is told of each step and evaluation
/// ([`crate::app::optimize`] also writes the Markdown and HTML the CLI writes). Setting
/// `interrupt` stops it at the next check with [`crate::model::generate::Cancelled`]; the
/// finished steps stay, and `Start::Resume` continues them.
///
/// ```no_run
/// use std::sync::{atomic::AtomicBool, Arc};
/// use greater::optimize::run::{run, Changes, Event, Start};
///
/// // Two more steps of an interrupted run, printing each step's prompt.
/// let more = Changes { steps: Some(12), ..Changes::default() };
/// let stop = Arc::new(AtomicBool::new(false));
/// run(Start::Resume(more), "runs/demo".as_ref(), &stop, &mut |event| {
///     if let Event::Step(record, _) = event {
///         println!("step {}: {:?}", record.step, record.prompt);
///     }
/// })?;
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn run(
    start: Start,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(Event),
) -> Result<Summary> {
    // 1. The folder (locked until the run returns), its record, the task and the model.
    let run = match start {
        Start::New(s) => create(s, out, report)?,
        Start::Resume(changes) => reopen(changes, out, report)?,
    };
    let (s, split) = (&run.config.settings, &run.config.split);
    let train = Split::pick(&split.train, &run.task);
    let optimizer = Optimizer::new(&run.lm, &run.task, &train, s, Arc::clone(interrupt))?;
    // 2. The search's state: the checkpoint, or the starting prompts scored on train.
    let mut state = if run.dir.exists(file::CHECKPOINT) {
        let state: State = run.dir.read_json(file::CHECKPOINT)?;
        state
            .check(train.len(), run.lm.model.cfg.vocab_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", out.join(file::CHECKPOINT).display()))?;
        state
    } else {
        first_state(&optimizer, &run, report)?
    };
    run.dir.truncate_steps(state.step)?;
    // 3. The search, each step logged and checkpointed; with dev_patience, the best prompt
    // measured on the stopping dev questions as it goes.
    let eval_cfg = EvalConfig::of(s, Some(Arc::clone(interrupt)));
    let stopping = s.dev_parts(&split.dev).0;
    let mut check_dev = |state: &State, report: &mut dyn FnMut(Event)| -> Result<DevCheck> {
        let prompt = optimizer.prompt_text(&state.best_prompt)?;
        let examples = Split::pick(stopping, &run.task);
        let label = format!("stop-dev at step {}", state.step);
        let mut progress = eval_progress(&label, examples.len(), report);
        let r = evaluate(&run.lm, &run.task, &examples, &prompt, &eval_cfg, &mut progress)?;
        Ok(DevCheck { step: state.step, prompt, correct: r.correct, questions: stopping.to_vec() })
    };
    let budget_tokens = search(&optimizer, &run.dir, s, &mut state, split, &mut check_dev, report)?;
    // 4. The returned prompt, chosen on dev; then the held-out test.
    let summary = choose_and_test(&run, &optimizer, &mut state, budget_tokens, interrupt, report)?;
    run.dir.write_json(file::SUMMARY, &summary)?;
    report(Event::Finished(out));
    Ok(summary)
}

/// A run folder with its lock held, its record, and the task and model it names.
struct Opened {
    dir: RunDir,
    _lock: DirLock,
    config: RunConfig,
    lm: LanguageModel,
    task: Task,
}

/// A new run folder for settings `s`, with its `config.json`.
fn create(mut s: OptimizeConfig, out: &Path, report: &mut dyn FnMut(Event)) -> Result<Opened> {
    s.validate()?;
    let (task, split) = s.load_task()?;
    s.resolve_stop_dev(split.dev.len())?;
    let dir = RunDir::create(out)?;
    let _lock = dir.lock()?;
    let lm = open_model(&s, report)?;
    let config = RunConfig {
        initial_prompt: s.initial_prompt.clone().unwrap_or_else(|| task.initial_prompt.clone()),
        model_path: lm.path.display().to_string(),
        model_sha256: catalog::model_sha256(&lm.path)?,
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
    dir.write_json(file::CONFIG, &config)?;
    Ok(Opened { dir, _lock, config, lm, task })
}

/// The run folder `out` as recorded, with `changes` applied; an error when its task's data
/// or its model file changed since it started.
fn reopen(changes: Changes, out: &Path, report: &mut dyn FnMut(Event)) -> Result<Opened> {
    let dir = RunDir::open(out)?;
    let _lock = dir.lock()?;
    let mut config: RunConfig = dir.read_json(file::CONFIG)?;
    config
        .settings
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.join(file::CONFIG).display()))?;
    if changes.apply(&mut config.settings) {
        dir.write_json(file::CONFIG, &config)?;
    }
    let (task, split) = config.settings.load_task()?;
    same_split(&config.split, &split, &out.join(file::CONFIG))?;
    let lm = open_model(&config.settings, report)?;
    let sha = catalog::model_sha256(&lm.path)?;
    if sha != config.model_sha256 {
        bail!(
            "the model file changed since the run started (sha256 {sha}, recorded {})",
            config.model_sha256
        );
    }
    report(Event::Info(format!("resuming {}", out.display())));
    Ok(Opened { dir, _lock, config, lm, task })
}

/// The state before the first step: the starting prompts scored on train (their decoding
/// rate and reasoning length kept in `calibration.json` for the budget line), checkpointed.
fn first_state(
    optimizer: &Optimizer,
    run: &Opened,
    report: &mut dyn FnMut(Event),
) -> Result<State> {
    let initial = run.config.initial_prompt.as_str();
    let (starts, which) = match run.config.settings.start {
        StartFrom::Initial => (vec![initial], "the initial prompt"),
        StartFrom::Better => (vec![initial, ZERO_SHOT_COT], "the initial prompt and zero-shot CoT"),
    };
    let n_train = run.config.split.train.len();
    report(Event::Info(format!("scoring {which} on {n_train} train questions")));
    let t = Instant::now();
    let state = optimizer.initial_state(&starts)?;
    // The rate counts every start's reasoning; the length is the kept start's.
    let lengths: Vec<usize> = state.reasoning.iter().flatten().map(Vec::len).collect();
    let calibration = Calibration {
        tokens_per_second: state.generated_tokens as f64 / t.elapsed().as_secs_f64(),
        mean_reasoning: lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64,
    };
    run.dir.write_json(file::CALIBRATION, &calibration)?;
    run.dir.write_json(file::CHECKPOINT, &state)?;
    Ok(state)
}

/// The returned prompt: the best on dev among the best few by train score, the initial
/// prompt and zero-shot CoT. Test questions are measured only after it is chosen: zero-shot
/// CoT, the initial prompt and the returned one.
fn choose_and_test(
    run: &Opened,
    optimizer: &Optimizer,
    state: &mut State,
    budget_tokens: Option<usize>,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(Event),
) -> Result<Summary> {
    let (s, split, dir) = (&run.config.settings, &run.config.split, &run.dir);
    let mut contenders = contenders(optimizer, state, s, &run.config.initial_prompt)?;
    dir.write_json(file::CHECKPOINT, &*state)?;
    let eval_cfg = EvalConfig::of(s, Some(Arc::clone(interrupt)));
    let mut measure = |c: &Contender, examples: &[&Example], split: &str| -> Result<EvalSummary> {
        dir.evaluation(split, c.label, &c.prompt, |log| {
            let label = format!("{split}: {}", c.label);
            let (lm, task) = (&run.lm, &run.task);
            let mut progress = eval_progress(&label, examples.len(), report);
            evaluate_logged(lm, task, examples, &c.prompt, &eval_cfg, Some(log), &mut progress)
        })
    };
    let dev = Split::pick(s.dev_parts(&split.dev).1, &run.task);
    let chosen =
        choose_on_dev(&mut contenders, &dev, &mut |c, examples| measure(c, examples, "dev"))?;
    let best_prompt = contenders[chosen].prompt.clone();
    dir.write_atomic(file::BEST_PROMPT, best_prompt.as_bytes())?;

    let test = Split::pick(&split.test, &run.task);
    let mut evaluations = Vec::new();
    if !test.is_empty() {
        let optimised = Contender { label: Label::Optimised, ..contenders[chosen].clone() };
        for c in [&contenders[0], &contenders[1], &optimised] {
            let same = evaluations.iter().find(|e: &&EvalSummary| e.prompt == c.prompt).cloned();
            let e = match same {
                Some(e) => EvalSummary { label: c.label, ..e },
                None => measure(c, &test, "test")?,
            };
            evaluations.push(e);
        }
    }
    Ok(Summary {
        paired: dir.paired_test(&evaluations, None)?,
        steps: state.step,
        best_prompt,
        selected: contenders[chosen].label,
        selected_by: if dev.is_empty() { SelectedBy::TrainScore } else { SelectedBy::DevAccuracy },
        best_train_score: state.best_score,
        generated_tokens: state.generated_tokens,
        budget_tokens,
        majority_floor: Task::majority_floor(&test),
        contenders,
        evaluations,
    })
}

/// Measures the best prompt of a state on the stopping dev questions (`dev_patience`).
type CheckDev<'a> = dyn FnMut(&State, &mut dyn FnMut(Event)) -> Result<DevCheck> + 'a;

/// The search until its end: `steps` GReaTer (or gcg) steps, `ape` rounds until the token
/// budget is spent, or (`ape+greater`) rounds on half of it and token steps on the rest;
/// each logged and checkpointed. Returns the budget of the methods that spend one.
fn search(
    optimizer: &Optimizer,
    dir: &RunDir,
    s: &OptimizeConfig,
    state: &mut State,
    split: &Split,
    check_dev: &mut CheckDev,
    report: &mut dyn FnMut(Event),
) -> Result<Option<usize>> {
    let n_train = split.train.len();
    let calibration: Calibration = dir.read_json(file::CALIBRATION)?;
    let log_step =
        |record: StepRecord, state: &State, report: &mut dyn FnMut(Event)| -> Result<()> {
            dir.append_step(&record)?;
            dir.write_json(file::CHECKPOINT, state)?;
            report(Event::Step(&record, state));
            Ok(())
        };
    let train_plateau = |state: &State| s.patience > 0 && state.steps_since_best >= s.patience;
    let stopped = |state: &State| train_plateau(state) || state.dev_plateaued(s.dev_patience);
    // Token steps while `more` says so, each followed by its dev check when one is due;
    // they end early at a train or dev plateau.
    let mut token_steps = |state: &mut State,
                           more: &dyn Fn(&State) -> bool,
                           report: &mut dyn FnMut(Event)|
     -> Result<()> {
        while more(state) && !stopped(state) {
            let record = optimizer.step(state)?;
            if s.dev_patience > 0 && state.step.is_multiple_of(s.dev_every) {
                let check = check_dev(state, report)?;
                state.dev_checks.push(check);
            }
            log_step(record, state, report)?;
            if train_plateau(state) {
                report(Event::Info(format!("no better prompt for {} steps: stopping", s.patience)));
            } else if state.dev_plateaued(s.dev_patience) {
                report(Event::Info(format!(
                    "no gain on the stopping dev questions in {} checks: stopping",
                    s.dev_patience
                )));
            }
        }
        Ok(())
    };
    // APE rounds until `until` tokens are spent; with `cap`, none that could pass it even if
    // every sequence ran to its budget.
    let ape_rounds = |state: &mut State,
                      until: usize,
                      cap: Option<usize>,
                      report: &mut dyn FnMut(Event)|
     -> Result<()> {
        if state.generated_tokens >= until {
            return Ok(());
        }
        let (total, line) = ape_budget_line(&calibration, state, until, n_train);
        report(Event::Start { done: state.step, total, budget: line });
        let cost = proposal_cost(&calibration, n_train);
        let worst = MAX_INSTRUCTION_TOKENS + n_train * s.max_reasoning;
        while state.generated_tokens < until {
            // The last round proposes only what the rest of the budget should pay for.
            let left = (until - state.generated_tokens) as f64;
            let mut proposals = ((left / cost).ceil() as usize).clamp(1, PROPOSALS_PER_ROUND);
            if let Some(cap) = cap {
                proposals = proposals.min(cap.saturating_sub(state.generated_tokens) / worst);
                if proposals == 0 {
                    break;
                }
            }
            let record = Ape::new(optimizer).round(state, proposals)?;
            log_step(record, state, report)?;
        }
        Ok(())
    };
    match s.method {
        Method::Greater | Method::Gcg => {
            let remaining = s.steps.saturating_sub(state.step);
            if remaining > 0 && !stopped(state) {
                let budget = budget_line(optimizer, &calibration, s, state, remaining, split)?;
                report(Event::Start { done: state.step, total: s.steps, budget });
                token_steps(state, &|state| state.step < s.steps, report)?;
            }
            Ok(None)
        }
        Method::Ape => {
            let budget = ape_budget(s, &calibration, n_train);
            ape_rounds(state, budget, None, report)?;
            Ok(Some(budget))
        }
        Method::ApeGreater => {
            let budget = ape_budget(s, &calibration, n_train);
            if state.token_search_from.is_none() {
                ape_rounds(state, budget / 2, Some(budget), report)?;
                optimizer.start_token_search(state);
                dir.write_json(file::CHECKPOINT, state)?;
                let best = optimizer.prompt_text(&state.best_prompt)?;
                report(Event::Info(format!("token search from APE's best: {best:?}")));
            }
            // A step goes ahead only if it fits the budget even when every sequence it
            // decodes (the shortlist's, the current and the re-scored best prompt's) runs
            // to the reasoning budget: the two stages never spend more than the budget.
            let per_step = s.train_batch.unwrap_or(n_train) * s.max_reasoning;
            let worst = (s.shortlist + 2) * per_step;
            let line = format!(
                "budget: {budget} generated tokens ({} spent): token steps while one fits",
                state.generated_tokens
            );
            report(Event::Start { done: state.step, total: s.steps, budget: line });
            token_steps(state, &|state| state.generated_tokens + worst <= budget, report)?;
            Ok(Some(budget))
        }
    }
}

/// Generated tokens and gradient passes still to come, and the time they should take at
/// the decoding rate measured on the initial prompt and one timed gradient pass.
fn budget_line(
    optimizer: &Optimizer,
    c: &Calibration,
    s: &OptimizeConfig,
    state: &State,
    steps: usize,
    split: &Split,
) -> Result<String> {
    let t = Instant::now();
    optimizer.time_one_gradient(state, c.mean_reasoning.round() as usize)?;
    let per_pass = t.elapsed().as_secs_f64();
    // Reasoning under the shortlisted prompts each step, the contenders on dev, then the
    // three test evaluations.
    let (stopping, choosing) = s.dev_parts(&split.dev);
    let (n_dev, n_test) = (choosing.len(), split.test.len());
    let dev_checks = if s.dev_patience > 0 { steps / s.dev_every * stopping.len() } else { 0 };
    // With train batches a step also reasons under the current and the best prompt anew.
    let (n_step, rescored) = match s.train_batch {
        Some(b) => (b, 2),
        None => (split.train.len(), 0),
    };
    let sequences = steps * (s.shortlist + rescored) * n_step
        + dev_checks
        + (2 + s.dev_candidates) * n_dev
        + 3 * n_test;
    let tokens = (sequences as f64 * c.mean_reasoning) as usize;
    let passes = steps * n_step;
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
    s.budget_tokens
        .unwrap_or((((1 + s.steps * s.shortlist) * n_train) as f64 * c.mean_reasoning) as usize)
}

/// Tokens one `ape` proposal should cost: a short instruction, then its reasoning on every
/// train question at the starting prompt's mean length.
fn proposal_cost(c: &Calibration, n_train: usize) -> f64 {
    16.0 + n_train as f64 * c.mean_reasoning
}

/// The rounds `ape` should need for the rest of its budget, and the budget line.
fn ape_budget_line(
    c: &Calibration,
    state: &State,
    budget: usize,
    n_train: usize,
) -> (usize, String) {
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
