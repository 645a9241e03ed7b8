//! `greater protocol`: one configuration over a list of tasks, a run folder per task under
//! one parent, resumable as a whole, and a table of the held-out results.
//!
//! ```text
//! protocol-config.json   the settings and the task list
//! progress.json          wall seconds spent on each task so far
//! <task>/                an ordinary run folder
//! protocol.json / protocol.md   the table, rewritten after every task
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::eval::wilson_interval;
use crate::optimize::run::{run, transfer, Event, EvalSummary, Start, Summary, Transfer};
use crate::optimize::OptimizeConfig;
use crate::store::RunDir;

/// The paper's five transfer tasks.
pub const PAPER_TASKS: &[&str] = &[
    "movie_recommendation",
    "object_counting",
    "tracking_shuffled_objects_five_objects",
    "hyperbaton",
    "causal_judgement",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtocolConfig {
    pub settings: OptimizeConfig,
    pub tasks: Vec<String>,
    /// A second model on which each task's returned prompt and zero-shot CoT are evaluated.
    #[serde(default)]
    pub transfer_to: Option<String>,
}

/// One task's line of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    pub task: String,
    pub zero_shot_cot: EvalSummary,
    pub initial: EvalSummary,
    pub optimised: EvalSummary,
    /// Dev accuracy of the returned prompt (None without a dev split).
    pub dev_accuracy: Option<f64>,
    pub selected: String,
    pub steps: usize,
    pub wall_seconds: f64,
    /// The returned prompt and zero-shot CoT on the `transfer_to` model.
    #[serde(default)]
    pub transfer: Option<Transfer>,
}

/// Accuracy pooled over every task's test questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pooled {
    pub accuracy: f64,
    pub correct: usize,
    pub n: usize,
    pub interval: (f64, f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtocolTable {
    pub rows: Vec<TaskRow>,
    pub zero_shot_cot: Pooled,
    pub initial: Pooled,
    pub optimised: Pooled,
    /// Mean over tasks of (optimised - zero-shot CoT), with a 95% normal interval from the
    /// per-task differences (None with fewer than two tasks).
    pub mean_gain: f64,
    pub gain_interval: Option<(f64, f64)>,
    /// Pooled zero-shot CoT and returned-prompt accuracy on the transfer model.
    #[serde(default)]
    pub transfer: Option<(Pooled, Pooled)>,
}

/// What the protocol reports as it goes: which task (and the steps each task runs), then
/// that run's own events.
pub enum ProtocolEvent<'a> {
    Task { index: usize, total: usize, name: &'a str, steps: usize },
    Run(Event<'a>),
}

/// Starts a protocol in `out` (with `Some(config)`) or continues the one there; returns the
/// table and the protocol's configuration.
pub fn run_protocol(
    config: Option<ProtocolConfig>,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(ProtocolEvent),
) -> Result<(ProtocolTable, ProtocolConfig)> {
    let dir = RunDir::folder(out)?;
    let config: ProtocolConfig = match config {
        Some(c) => {
            if dir.exists("protocol-config.json") {
                bail!("{} already holds a protocol: continue it with --resume {0}", out.display());
            }
            if c.tasks.is_empty() {
                bail!("the protocol has no tasks");
            }
            dir.write_json("protocol-config.json", &c)?;
            c
        }
        None => dir.read_json("protocol-config.json")?,
    };
    let mut progress: BTreeMap<String, f64> =
        if dir.exists("progress.json") { dir.read_json("progress.json")? } else { BTreeMap::new() };
    let mut rows = Vec::new();
    let mut result = table(Vec::new());
    for (index, task) in config.tasks.iter().enumerate() {
        report(ProtocolEvent::Task { index, total: config.tasks.len(), name: task, steps: config.settings.steps });
        let task_dir = out.join(task_folder(task));
        let summary: Summary = if task_dir.join("summary.json").exists() {
            RunDir::open(&task_dir)?.read_json("summary.json")?
        } else {
            let start = if task_dir.join("config.json").exists() {
                Start::Resume { steps: None }
            } else {
                Start::New(OptimizeConfig { task: task.clone(), ..config.settings.clone() })
            };
            let t = Instant::now();
            let result = run(start, &task_dir, interrupt, &mut |e| report(ProtocolEvent::Run(e)));
            *progress.entry(task.clone()).or_default() += t.elapsed().as_secs_f64();
            dir.write_json("progress.json", &progress)?;
            result?
        };
        let transfer = match &config.transfer_to {
            Some(model) => Some(transfer(&task_dir, model, interrupt, &mut |e| report(ProtocolEvent::Run(e)))?),
            None => None,
        };
        rows.push(TaskRow { transfer, ..task_row(task, &summary, progress.get(task).copied().unwrap_or(0.0))? });
        result = table(rows.clone());
        dir.write_json("protocol.json", &result)?;
        dir.write_atomic("protocol.md", protocol_markdown(&result, &config).as_bytes())?;
        crate::report::write_report(out, None)?;
    }
    Ok((result, config))
}

/// A task's folder name: its name, or a task file's stem.
pub fn task_folder(task: &str) -> String {
    let p = Path::new(task);
    let stem = if p.extension().is_some() { p.file_stem().and_then(|s| s.to_str()).unwrap_or(task) } else { task };
    stem.replace(['/', '\\'], "_")
}

fn task_row(task: &str, s: &Summary, wall_seconds: f64) -> Result<TaskRow> {
    let find = |label: &str| -> Result<EvalSummary> {
        match s.evaluations.iter().find(|e| e.label == label) {
            Some(e) => Ok(e.clone()),
            None => bail!("the run of {task} has no test evaluation '{label}' (is --test 0?)"),
        }
    };
    let dev_accuracy = s.contenders.iter().find(|c| c.label == s.selected).and_then(|c| c.dev.as_ref()).map(|d| d.accuracy);
    Ok(TaskRow {
        task: task.to_string(),
        zero_shot_cot: find("zero-shot CoT")?,
        initial: find("initial")?,
        optimised: find("optimised")?,
        dev_accuracy,
        selected: s.selected.clone(),
        steps: s.steps,
        wall_seconds,
        transfer: None,
    })
}

fn pooled(evals: &[&EvalSummary]) -> Pooled {
    let (correct, n) = evals.iter().fold((0, 0), |(c, n), e| (c + e.correct, n + e.n));
    Pooled { accuracy: correct as f64 / n.max(1) as f64, correct, n, interval: wilson_interval(correct, n) }
}

pub fn table(rows: Vec<TaskRow>) -> ProtocolTable {
    let gains: Vec<f64> = rows.iter().map(|r| r.optimised.accuracy - r.zero_shot_cot.accuracy).collect();
    let k = gains.len() as f64;
    let mean_gain = gains.iter().sum::<f64>() / k.max(1.0);
    let gain_interval = (gains.len() >= 2).then(|| {
        let var = gains.iter().map(|g| (g - mean_gain).powi(2)).sum::<f64>() / (k - 1.0);
        let half = 1.959_963_984_540_054 * (var / k).sqrt();
        (mean_gain - half, mean_gain + half)
    });
    let column = |f: fn(&TaskRow) -> &EvalSummary| pooled(&rows.iter().map(f).collect::<Vec<_>>());
    let transferred: Vec<&Transfer> = rows.iter().filter_map(|r| r.transfer.as_ref()).collect();
    let transfer = (!transferred.is_empty()).then(|| {
        let zs: Vec<&EvalSummary> = transferred.iter().map(|t| &t.zero_shot_cot).collect();
        let optimised: Vec<&EvalSummary> = transferred.iter().map(|t| &t.optimised).collect();
        (pooled(&zs), pooled(&optimised))
    });
    ProtocolTable {
        transfer,
        zero_shot_cot: column(|r| &r.zero_shot_cot),
        initial: column(|r| &r.initial),
        optimised: column(|r| &r.optimised),
        mean_gain,
        gain_interval,
        rows,
    }
}

fn cell(e: &EvalSummary) -> String {
    format!("{:.3} [{:.3}, {:.3}]", e.accuracy, e.interval.0, e.interval.1)
}

pub fn protocol_markdown(t: &ProtocolTable, config: &ProtocolConfig) -> String {
    let s = &config.settings;
    let mut out = format!(
        "# greater protocol\n\nmodel `{}`, {} train / {} dev / {} test questions per task, {} steps, split seed {}\n\n",
        s.model, s.train, s.dev, s.test, s.steps, s.seed
    );
    let target = config.transfer_to.as_deref();
    let (transfer_head, transfer_rule) = match target {
        Some(m) => (format!(" zero-shot CoT on `{m}` | optimised on `{m}` |"), "---|---|"),
        None => (String::new(), ""),
    };
    out.push_str(&format!(
        "| task | zero-shot CoT | initial | optimised | dev (optimised) | returned | steps | wall time |{transfer_head} optimised prompt |\n"
    ));
    out.push_str(&format!("|---|---|---|---|---|---|---|---|{transfer_rule}---|\n"));
    for r in &t.rows {
        let transfer_cells = match (&r.transfer, target) {
            (Some(tr), _) => format!(" {} | {} |", cell(&tr.zero_shot_cot), cell(&tr.optimised)),
            (None, Some(_)) => " - | - |".to_string(),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |{transfer_cells} {} |\n",
            r.task,
            cell(&r.zero_shot_cot),
            cell(&r.initial),
            cell(&r.optimised),
            r.dev_accuracy.map_or("-".into(), |a| format!("{a:.3}")),
            r.selected,
            r.steps,
            crate::optimize::run::human_duration(r.wall_seconds),
            r.optimised.prompt.replace('|', "\\|"),
        ));
    }
    let p = |x: &Pooled| format!("{:.3} [{:.3}, {:.3}]", x.accuracy, x.interval.0, x.interval.1);
    let pooled_transfer = match (&t.transfer, target) {
        (Some((zs, opt)), _) => format!(" {} | {} |", p(zs), p(opt)),
        (None, Some(_)) => " | |".to_string(),
        (None, None) => String::new(),
    };
    out.push_str(&format!(
        "| all tasks (pooled) | {} | {} | {} | | | | |{pooled_transfer} |\n\nmean gain over zero-shot CoT: {:+.3}",
        p(&t.zero_shot_cot),
        p(&t.initial),
        p(&t.optimised),
        t.mean_gain
    ));
    match t.gain_interval {
        Some((lo, hi)) => out.push_str(&format!(" (95% interval over tasks [{lo:+.3}, {hi:+.3}])\n")),
        None => out.push('\n'),
    }
    out
}
