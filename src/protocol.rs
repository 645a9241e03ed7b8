//! `greater protocol`: one configuration over a list of tasks, a run folder per task under
//! one parent, resumable as a whole, and a table of the held-out results.
//!
//! The parent holds its configuration, progress and table (the names are
//! [`crate::store::file`](mod@crate::store::file)'s), `<task>/`, an ordinary run folder of the first method, and
//! `<task>-<method>/`, the other methods' runs on the same questions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::optimize::run::{read_transfer, run, transfer, Changes, Event, Start};
use crate::records::{
    Contender, Difference, EvalSummary, Label, MethodPooled, MethodRow, Pooled, ProtocolConfig,
    ProtocolTable, SearchTrace, StepRecord, Summary, TaskRow, Transfer,
};
use crate::settings::{Method, OptimizeConfig};
use crate::stats::{mean_with_interval, median, wilson_interval};
use crate::store::{file, method_folder, task_folder, RunDir};

/// The paper's five transfer tasks.
pub const PAPER_TASKS: &[&str] = &[
    "movie_recommendation",
    "object_counting",
    "tracking_shuffled_objects_five_objects",
    "hyperbaton",
    "causal_judgement",
];

/// The trace of a search from its steps and the run's contenders (whose train scores cover
/// the starting prompts; `selected` is the one returned); None before the first step.
pub fn search_trace(
    steps: &[StepRecord],
    contenders: &[Contender],
    selected: Label,
) -> Option<SearchTrace> {
    let mut train: BTreeMap<&str, f64> =
        contenders.iter().map(|c| (c.prompt.as_str(), c.train.score)).collect();
    for r in steps {
        train.extend(r.scored().into_iter().map(|(p, s)| (p, s.score)));
    }
    let first = &steps.first()?.prompt_before;
    let start = contenders.iter().find(|c| &c.prompt == first)?;
    let mut best = start.train.score;
    let better_start = contenders
        .iter()
        .filter(|c| c.label.is_baseline())
        .filter_map(|c| c.dev.as_ref())
        .reduce(|a, b| if b.accuracy > a.accuracy { b } else { a });
    let returned = contenders.iter().find(|c| c.label == selected).and_then(|c| c.dev.as_ref());
    let searched = contenders.iter().filter(|c| !c.label.is_baseline());
    let mut trace = SearchTrace {
        train_n: start.train.n,
        start_mistakes: start.train.mistakes,
        // The searched contenders too: logs written before steps kept the current prompt's
        // score lack a grown prompt's.
        fewest_mistakes: (steps.iter().flat_map(|r| r.scored()).map(|(_, s)| s.mistakes))
            .chain(searched.map(|c| c.train.mistakes))
            .fold(start.train.mistakes, usize::min),
        improving_steps: 0,
        worse_moves: 0,
        current_shortlisted: 0,
        current_kept: 0,
        dev_baseline: better_start.map(|d| d.accuracy),
        dev_baseline_cut: better_start.and_then(|d| d.cut_by_budget),
        dev_returned_cut: returned.and_then(|d| d.cut_by_budget),
        step_seconds: median(steps.iter().map(|r| r.seconds.total()).collect()),
    };
    for r in steps {
        if r.best_score < best {
            trace.improving_steps += 1;
            best = r.best_score;
        }
        let Some(t) = r.token() else { continue };
        trace.current_shortlisted +=
            usize::from(t.checked.iter().any(|c| c.prompt == r.prompt_before));
        if let Some(c) = t.chosen_checked() {
            trace.current_kept += usize::from(c.prompt == r.prompt_before);
            let before = train.get(r.prompt_before.as_str());
            trace.worse_moves += usize::from(before.is_some_and(|&b| c.score.score > b));
        }
    }
    Some(trace)
}

/// What the protocol reports as it goes: which task (and the steps each task runs), then
/// that run's own events.
pub enum ProtocolEvent<'a> {
    /// A task's run starts.
    Task {
        /// Its index among the protocol's runs, from 0.
        index: usize,
        /// Runs in the protocol.
        total: usize,
        /// The task's name.
        name: &'a str,
        /// Steps its run takes.
        steps: usize,
    },
    /// An event of the run under way.
    Run(Event<'a>),
    /// A task has finished: the table of the tasks finished so far.
    Table(&'a ProtocolTable, &'a ProtocolConfig),
}

/// Which tasks of a protocol one process runs: those whose index modulo `count` is `index`
/// (`--shard I/N`, I from 0). Several shards may run at once on one protocol folder, on one
/// machine or on a shared file system: each run folder has its own lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard's index, from 0.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

impl Shard {
    /// Every task: one process.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether this shard runs the task at `task_index`.
    pub fn takes(self, task_index: usize) -> bool {
        task_index % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// "I/N" with 0 <= I < N.
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("{s:?}: a shard is I/N with 0 <= I < N, e.g. 0/4")),
        }
    }
}

/// Starts a protocol in `out` (or continues the one there) and runs `shard`'s share of its
/// tasks; returns the table of every task finished so far (by any shard) and the protocol's
/// configuration. The folder's lock is held only while its shared files are written.
pub fn run_protocol(
    start: Start<ProtocolConfig>,
    out: &Path,
    shard: Shard,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(ProtocolEvent),
) -> Result<(ProtocolTable, ProtocolConfig)> {
    let dir = RunDir::folder(out)?;
    let (config, changes) = {
        let _lock = dir.lock_briefly()?;
        begin(&dir, start, shard)?
    };
    let methods = config.methods();
    let order = run_order(&config);
    let total = order.len();
    let mut table = finished_table(&dir, &config)?;
    for (index, &(m_index, t_index)) in order.iter().enumerate() {
        if !shard.takes(t_index) {
            continue;
        }
        let (task, method) = (&config.tasks[t_index], methods[m_index]);
        let folder = method_folder(task, &methods, m_index);
        let name =
            if methods.len() > 1 { format!("{task} ({})", method.name()) } else { task.clone() };
        report(ProtocolEvent::Task { index, total, name: &name, steps: config.settings.steps });
        let run_dir = out.join(&folder);
        if !run_dir.join(file::SUMMARY).exists() {
            let start = if run_dir.join(file::CONFIG).exists() {
                Start::Resume(changes.clone())
            } else {
                // `ape` and `ape+greater` spend what GReaTer spent on the same task.
                let budget_tokens = match method.spends_a_budget() {
                    true => config.settings.budget_tokens.or(greater_tokens(out, task, &methods)?),
                    false => config.settings.budget_tokens,
                };
                if m_index > 0 {
                    // Zero-shot CoT and the initial prompt are the same prompts on the same
                    // questions for every method: measured once, in the first's.
                    let first = RunDir::open(&out.join(task_folder(task)))?;
                    let baselines = [Label::ZeroShotCot, Label::Initial];
                    RunDir::folder(&run_dir)?.copy_evaluations(&first, &baselines)?;
                }
                let settings = OptimizeConfig {
                    task: task.clone(),
                    method,
                    budget_tokens,
                    ..config.settings.clone()
                };
                Start::New(settings)
            };
            // Time is added at every step and evaluation, so that a session cut short loses
            // only the one under way.
            let mut since = Instant::now();
            let mut saved = Ok(());
            let result = run(start, &run_dir, interrupt, &mut |e| {
                if matches!(e, Event::Step(..) | Event::EvalStart { .. }) && saved.is_ok() {
                    saved = add_wall_seconds(&dir, &folder, since.elapsed().as_secs_f64());
                    since = Instant::now();
                }
                report(ProtocolEvent::Run(e))
            });
            add_wall_seconds(&dir, &folder, since.elapsed().as_secs_f64())?;
            result?;
            saved?;
        }
        if let (0, Some(model)) = (m_index, &config.transfer_to) {
            transfer(&run_dir, model, interrupt, &mut |e| report(ProtocolEvent::Run(e)))?;
        }
        table = finished_table(&dir, &config)?;
        report(ProtocolEvent::Table(&table, &config));
    }
    Ok((table, config))
}

/// The protocol's runs as (method index, task index): the first method on every task, then
/// each other method on its tasks, so that the main table is filled first.
pub fn run_order(config: &ProtocolConfig) -> Vec<(usize, usize)> {
    let tasks = config.tasks.len();
    (0..config.methods().len())
        .flat_map(|m| (0..tasks).map(move |t| (m, t)))
        .filter(|&(m, t)| config.runs(m, t))
        .collect()
}

/// Tokens GReaTer decoded on `task` in this protocol, once its run there has finished.
fn greater_tokens(out: &Path, task: &str, methods: &[Method]) -> Result<Option<usize>> {
    let Some(m) = methods.iter().position(|&m| m == Method::Greater) else {
        return Ok(None);
    };
    let summary = RunDir::finished_summary(&out.join(method_folder(task, methods, m)))?;
    Ok(summary.map(|s| s.generated_tokens))
}

/// The configuration of a new protocol written (a shard may find it written by another
/// shard, and then it must be the same), or an existing one read with `changes` applied.
fn begin(
    dir: &RunDir,
    start: Start<ProtocolConfig>,
    shard: Shard,
) -> Result<(ProtocolConfig, Changes)> {
    match start {
        Start::New(c) => {
            if dir.exists(file::PROTOCOL_CONFIG) {
                let existing: ProtocolConfig = dir.read_json(file::PROTOCOL_CONFIG)?;
                let same = serde_json::to_value(&existing)? == serde_json::to_value(&c)?;
                if shard == Shard::ALL || !same {
                    bail!(
                        "{} already holds a protocol: continue it with --resume {0}",
                        dir.path.display()
                    );
                }
                return Ok((existing, Changes::default()));
            }
            c.check()?;
            dir.write_json(file::PROTOCOL_CONFIG, &c)?;
            Ok((c, Changes::default()))
        }
        Start::Resume(changes) => {
            let mut c: ProtocolConfig = dir.read_json(file::PROTOCOL_CONFIG)?;
            if changes.apply(&mut c.settings) {
                dir.write_json(file::PROTOCOL_CONFIG, &c)?;
            }
            Ok((c, changes))
        }
    }
}

/// Adds a run's wall seconds to `progress.json` (several shards may write it).
fn add_wall_seconds(dir: &RunDir, folder: &str, seconds: f64) -> Result<()> {
    let _lock = dir.lock_briefly()?;
    let mut progress: BTreeMap<String, f64> =
        if dir.exists(file::PROGRESS) { dir.read_json(file::PROGRESS)? } else { BTreeMap::new() };
    *progress.entry(folder.to_string()).or_default() += seconds;
    dir.write_json(file::PROGRESS, &progress)
}

/// The table of the tasks whose first method's run (and transfer) has finished, in the
/// protocol's order, each beside the other methods' runs on it that have finished; written
/// to `protocol.json`.
fn finished_table(dir: &RunDir, config: &ProtocolConfig) -> Result<ProtocolTable> {
    let _lock = dir.lock_briefly()?;
    let progress: BTreeMap<String, f64> =
        if dir.exists(file::PROGRESS) { dir.read_json(file::PROGRESS)? } else { BTreeMap::new() };
    let methods = config.methods();
    let finished = |task: &str, m: usize| -> Result<Option<(Summary, f64, RunDir)>> {
        let folder = method_folder(task, &methods, m);
        let wall = progress.get(&folder).copied().unwrap_or(0.0);
        let path = dir.path.join(&folder);
        match RunDir::finished_summary(&path)? {
            Some(s) => Ok(Some((s, wall, RunDir::open(&path)?))),
            None => Ok(None),
        }
    };
    let mut rows = Vec::new();
    for task in &config.tasks {
        let Some((first, wall, first_dir)) = finished(task, 0)? else { continue };
        let transfer: Option<Transfer> = match &config.transfer_to {
            Some(model) => match read_transfer(&first_dir, model)? {
                Some(t) => Some(t),
                None => continue,
            },
            None => None,
        };
        let mut baselines = Vec::new();
        for (m, &method) in methods.iter().enumerate().skip(1) {
            if let Some((s, w, d)) = finished(task, m)? {
                baselines.push(MethodRow {
                    first_against: first_dir
                        .paired_test(&first.evaluations, Some((&d, &s.evaluations)))?,
                    ..method_row(task, method, &s, w)?
                });
            }
        }
        let search = search_trace(&first_dir.read_steps()?, &first.contenders, first.selected);
        rows.push(TaskRow {
            transfer,
            baselines,
            search,
            paired: first_dir.paired_test(&first.evaluations, None)?,
            ..task_row(task, methods[0], &first, wall)?
        });
    }
    let result = table(rows, &methods[1..]);
    dir.write_json(file::PROTOCOL, &result)?;
    Ok(result)
}

fn test_evaluation(task: &str, s: &Summary, label: Label) -> Result<EvalSummary> {
    match s.evaluations.iter().find(|e| e.label == label) {
        Some(e) => Ok(e.clone()),
        None => bail!("the run of {task} has no test evaluation '{label}' (is --test 0?)"),
    }
}

fn method_row(task: &str, method: Method, s: &Summary, wall_seconds: f64) -> Result<MethodRow> {
    Ok(MethodRow {
        method,
        optimised: test_evaluation(task, s, Label::Optimised)?,
        dev_accuracy: s
            .contenders
            .iter()
            .find(|c| c.label == s.selected)
            .and_then(|c| c.dev.as_ref())
            .map(|d| d.accuracy),
        selected: s.selected,
        steps: s.steps,
        generated_tokens: s.generated_tokens,
        wall_seconds,
        first_against: None,
    })
}

fn task_row(task: &str, method: Method, s: &Summary, wall_seconds: f64) -> Result<TaskRow> {
    let main = method_row(task, method, s, wall_seconds)?;
    Ok(TaskRow {
        task: task.to_string(),
        majority_floor: Some(s.majority_floor),
        zero_shot_cot: test_evaluation(task, s, Label::ZeroShotCot)?,
        initial: test_evaluation(task, s, Label::Initial)?,
        optimised: main.optimised,
        dev_accuracy: main.dev_accuracy,
        selected: main.selected,
        steps: main.steps,
        wall_seconds,
        generated_tokens: main.generated_tokens,
        baselines: Vec::new(),
        transfer: None,
        search: None,
        paired: None,
    })
}

fn pooled(evals: &[&EvalSummary]) -> Pooled {
    let (correct, n) = evals.iter().fold((0, 0), |(c, n), e| (c + e.correct, n + e.n));
    Pooled {
        accuracy: correct as f64 / n.max(1) as f64,
        correct,
        n,
        interval: wilson_interval(correct, n),
    }
}

/// Mean over tasks of (a - b) accuracies, with a 95% normal interval from the per-task
/// differences (None with fewer than two tasks).
fn mean_difference<'r>(
    pairs: impl Iterator<Item = (&'r EvalSummary, &'r EvalSummary)>,
) -> Difference {
    let diffs: Vec<f64> = pairs.map(|(a, b)| a.accuracy - b.accuracy).collect();
    let (mean, interval) = mean_with_interval(&diffs);
    Difference { mean, interval }
}

/// The table of `rows`: pooled accuracies and the mean gain over zero-shot CoT, for the
/// first method and for each of `others` over the rows it has run on.
pub fn table(rows: Vec<TaskRow>, others: &[Method]) -> ProtocolTable {
    let gain = mean_difference(rows.iter().map(|r| (&r.optimised, &r.zero_shot_cot)));
    let baselines = others
        .iter()
        .filter_map(|&method| {
            let ran: Vec<(&TaskRow, &EvalSummary)> =
                rows.iter().filter_map(|r| Some((r, &r.baseline(method)?.optimised))).collect();
            if ran.is_empty() {
                return None;
            }
            let gain = mean_difference(ran.iter().map(|&(r, b)| (b, &r.zero_shot_cot)));
            Some(MethodPooled {
                method,
                tasks: ran.len(),
                optimised: pooled(&ran.iter().map(|&(_, b)| b).collect::<Vec<_>>()),
                mean_gain: gain.mean,
                gain_interval: gain.interval,
                first_lead: Some(mean_difference(ran.iter().map(|&(r, b)| (&r.optimised, b)))),
            })
        })
        .collect();
    let column = |f: fn(&TaskRow) -> &EvalSummary| pooled(&rows.iter().map(f).collect::<Vec<_>>());
    let transferred: Vec<&Transfer> = rows.iter().filter_map(|r| r.transfer.as_ref()).collect();
    let transfer = (!transferred.is_empty()).then(|| {
        let zs: Vec<&EvalSummary> = transferred.iter().map(|t| &t.zero_shot_cot).collect();
        let optimised: Vec<&EvalSummary> = transferred.iter().map(|t| &t.optimised).collect();
        (pooled(&zs), pooled(&optimised))
    });
    ProtocolTable {
        transfer,
        baselines,
        zero_shot_cot: column(|r| &r.zero_shot_cot),
        initial: column(|r| &r.initial),
        optimised: column(|r| &r.optimised),
        mean_gain: gain.mean,
        gain_interval: gain.interval,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::records::Search;

    use super::*;

    fn score(score: f64, mistakes: usize) -> Value {
        json!({ "score": score, "mistakes": mistakes, "n": 20, "nll": 1.0, "answer_nll": 0.0 })
    }

    fn contender(label: &str, prompt: &str, train: Value, dev: f64, cut: usize) -> Contender {
        let dev = json!({ "label": label, "prompt": prompt, "accuracy": dev, "correct": 0, "n": 50, "interval": [0.0, 1.0], "seconds": 0.0, "cut_by_budget": cut });
        serde_json::from_value(
            json!({ "label": label, "prompt": prompt, "train": train, "dev": dev }),
        )
        .unwrap()
    }

    /// A step from `before` that checked (id, prompt, score) and moved to the chosen one.
    fn step(
        n: usize,
        before: &str,
        checked: &[(u32, &str, Value)],
        chosen: u32,
        best: f64,
    ) -> StepRecord {
        let after = checked.iter().find(|c| c.0 == chosen).unwrap().1;
        crate::records::test_step(n, before, checked, chosen, after, best)
    }

    #[test]
    fn the_search_trace_counts_what_each_step_did() {
        let contenders = [
            contender("zero-shot CoT", "Z", score(0.7, 14), 0.30, 3),
            contender("initial", "A", score(0.6, 12), 0.32, 5),
            contender("train #1", "C", score(0.65, 13), 0.34, 40),
        ];
        // A grown prompt, scored only as the current prompt of the step after.
        let mut grown = step(4, "D_", &[(10, "F", score(0.74, 12))], 10, 0.55);
        if let Search::Token(t) = &mut grown.search {
            t.current = Some(serde_json::from_value(score(0.72, 8)).unwrap());
        }
        let steps = [
            // Better than the start: the best train score falls; the current prompt was checked.
            step(1, "A", &[(5, "B", score(0.55, 11)), (1, "A", score(0.6, 12))], 5, 0.55),
            // Always-accept moves to a prompt worse than the one it began with.
            step(2, "B", &[(7, "C", score(0.65, 13))], 7, 0.55),
            // The current prompt is checked and kept; another made fewer mistakes at a higher score.
            step(3, "C", &[(8, "C", score(0.65, 13)), (9, "D", score(0.7, 9))], 8, 0.55),
            // Moves from the grown prompt to a worse one; the grown prompt made the fewest.
            grown,
        ];
        let trace = search_trace(&steps, &contenders, Label::Train(1)).unwrap();
        assert_eq!(
            trace,
            SearchTrace {
                train_n: 20,
                start_mistakes: 12,
                fewest_mistakes: 8,
                improving_steps: 1,
                worse_moves: 2,
                current_shortlisted: 2,
                current_kept: 1,
                dev_baseline: Some(0.32),
                dev_baseline_cut: Some(5),
                dev_returned_cut: Some(40),
                step_seconds: Some(0.0),
            }
        );
        // A log from before steps kept the current prompt's score: a searched contender's
        // train mistakes still count.
        let mut old_log = steps.clone();
        if let Search::Token(t) = &mut old_log[3].search {
            t.current = None;
        }
        let mut with_grown = contenders.to_vec();
        with_grown.push(contender("train #2", "D_", score(0.72, 8), 0.30, 0));
        let old = search_trace(&old_log, &with_grown, Label::Train(1)).unwrap();
        assert_eq!((old.fewest_mistakes, old.worse_moves), (8, 2));
        assert_eq!(
            search_trace(&old_log, &contenders, Label::Train(1)).unwrap().fewest_mistakes,
            9
        );
        assert_eq!(search_trace(&[], &contenders, Label::Train(1)), None);
    }
}
