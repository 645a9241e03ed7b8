//! Screening: several configurations of the search on a list of tasks, judged on train and
//! dev only, so that settings are chosen without looking at a test question.
//!
//! Every (configuration, task) is an ordinary run with an empty test split, in
//! `<out>/<configuration>/<task>/`; a killed screening resumes where it stopped. The table
//! gives per configuration and task the dev accuracy of zero-shot CoT, the initial prompt and
//! the best searched prompt, and the gain of that prompt over the better of the two
//! baselines. That gain is measured on the questions that chose among the searched prompts,
//! so it flatters every configuration alike (each has the same number of candidates on dev);
//! only its differences between configurations mean anything.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::optimize::run::{run, Event, Start, Summary};
use crate::optimize::{OptimizeConfig, StepRecord};
use crate::store::RunDir;

/// What a screening runs: base settings, tasks, and named changes to the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenConfig {
    pub base: OptimizeConfig,
    pub tasks: Vec<String>,
    /// (name, TOML text of the settings it changes), in the order they run.
    pub configurations: Vec<(String, String)>,
}

impl ScreenConfig {
    /// The configurations of a TOML file whose top-level tables each name one:
    /// `[budget-512]` then `max_reasoning = 512`.
    pub fn configurations_from_toml(text: &str, origin: &str) -> Result<Vec<(String, String)>> {
        let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let mut out = Vec::new();
        for (name, value) in table {
            let Some(settings) = value.as_table() else {
                bail!("{origin}: {name} is not a table of settings ([{name}] then one setting per line)");
            };
            out.push((name, toml::to_string(settings)?));
        }
        if out.is_empty() {
            bail!("{origin}: no configuration ([name] then the settings it changes)");
        }
        Ok(out)
    }

    /// The settings of configuration `name` on `task`: the base, its changes, the task, and
    /// no test questions.
    pub fn settings(&self, changes: &str, task: &str) -> Result<OptimizeConfig> {
        let mut s = self.base.with_toml(changes)?;
        s.task = task.to_string();
        s.test = 0;
        Ok(s)
    }

    /// Every configuration's settings valid, names usable as folder names, no repeats.
    pub fn check(&self) -> Result<()> {
        if self.base.dev == 0 {
            bail!("screening judges on dev: pass --dev N");
        }
        for (i, (name, changes)) in self.configurations.iter().enumerate() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || name.starts_with('.') {
                bail!("configuration name {name:?}: use letters, digits, '-', '_' and '.'");
            }
            if self.configurations[..i].iter().any(|(n, _)| n == name) {
                bail!("configuration {name} is listed twice");
            }
            for task in &self.tasks {
                self.settings(changes, task).with_context(|| format!("configuration {name}"))?.validate()?;
            }
        }
        Ok(())
    }
}

/// One (configuration, task): dev accuracies and what the search did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenRow {
    pub configuration: String,
    pub task: String,
    pub dev_n: usize,
    pub zero_shot: f64,
    pub initial: f64,
    /// The best dev accuracy of a searched prompt, and that prompt (None: the search
    /// scored no prompt but the baselines).
    pub best_searched: Option<f64>,
    pub best_prompt: Option<String>,
    /// best_searched - max(zero_shot, initial).
    pub gain: Option<f64>,
    /// Train mistakes of the initial prompt and the fewest of any checked prompt.
    pub train_mistakes_initial: usize,
    pub train_mistakes_best: usize,
    pub steps: usize,
    /// Dev reasonings cut at the reasoning budget, over every prompt measured on dev.
    pub dev_cut: usize,
    /// Seconds of the search's steps.
    pub search_seconds: f64,
}

impl ScreenRow {
    fn from_summary(configuration: &str, task: &str, summary: &Summary, steps: &[StepRecord]) -> Result<Self> {
        let dev = |label: &str| summary.contenders.iter().find(|c| c.label == label).and_then(|c| c.dev.as_ref());
        let (Some(zs), Some(initial)) = (dev("zero-shot CoT"), dev("initial")) else {
            bail!("{configuration}/{task}: the baselines were not measured on dev");
        };
        let searched = summary.contenders.iter().filter(|c| c.label.starts_with("train #")).filter_map(|c| c.dev.as_ref());
        let best = searched.max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
        let train = |label: &str| summary.contenders.iter().find(|c| c.label == label).map(|c| c.train.mistakes);
        let best_mistakes = summary.contenders.iter().map(|c| c.train.mistakes).min().unwrap_or(0);
        Ok(ScreenRow {
            configuration: configuration.into(),
            task: task.into(),
            dev_n: zs.n,
            zero_shot: zs.accuracy,
            initial: initial.accuracy,
            best_searched: best.map(|b| b.accuracy),
            best_prompt: best.map(|b| b.prompt.clone()),
            gain: best.map(|b| b.accuracy - zs.accuracy.max(initial.accuracy)),
            train_mistakes_initial: train("initial").unwrap_or(0),
            train_mistakes_best: best_mistakes,
            steps: summary.steps,
            dev_cut: summary.contenders.iter().filter_map(|c| c.dev.as_ref()?.cut_by_budget).sum(),
            search_seconds: steps.iter().map(|s| s.seconds.total()).sum(),
        })
    }
}

/// The rows and, per configuration, the mean gain over its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenTable {
    pub rows: Vec<ScreenRow>,
}

impl ScreenTable {
    /// The mean gain of `configuration` over its tasks where it searched any prompt.
    pub fn mean_gain(&self, configuration: &str) -> Option<f64> {
        let gains: Vec<f64> = self.rows.iter().filter(|r| r.configuration == configuration).filter_map(|r| r.gain).collect();
        (!gains.is_empty()).then(|| gains.iter().sum::<f64>() / gains.len() as f64)
    }

    pub fn markdown(&self, config: &ScreenConfig) -> String {
        let mut md = String::from(
            "Dev accuracy (no test question was evaluated). Gain: the best searched prompt's dev accuracy minus the \
better of zero-shot CoT and the initial prompt, on the questions that chose it (compare configurations, not the \
gain itself).\n\n| configuration | task | dev n | zero-shot CoT | initial | best searched | gain | train mistakes \
(initial -> fewest) | steps | dev reasonings cut | search minutes | best searched prompt |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        let or_none = |v: Option<f64>, signed: bool| match v {
            Some(v) if signed => format!("{v:+.3}"),
            Some(v) => format!("{v:.3}"),
            None => "none".into(),
        };
        for r in &self.rows {
            md += &format!(
                "| {} | {} | {} | {:.3} | {:.3} | {} | {} | {} -> {} | {} | {} | {:.1} | {} |\n",
                r.configuration,
                r.task,
                r.dev_n,
                r.zero_shot,
                r.initial,
                or_none(r.best_searched, false),
                or_none(r.gain, true),
                r.train_mistakes_initial,
                r.train_mistakes_best,
                r.steps,
                r.dev_cut,
                r.search_seconds / 60.0,
                r.best_prompt.as_deref().unwrap_or("").replace('|', "\\|")
            );
        }
        md += "\n| configuration | settings it changes | mean gain over its tasks |\n|---|---|---|\n";
        for (name, changes) in &config.configurations {
            let changes = changes.trim().replace('\n', "; ").replace('|', "\\|");
            md += &format!("| {name} | {changes} | {} |\n", or_none(self.mean_gain(name), true));
        }
        md
    }
}

/// What a screening tells its caller.
pub enum ScreenEvent<'a> {
    /// A run starts: its index among all, their number, configuration and task.
    Run { index: usize, total: usize, configuration: &'a str, task: &'a str, steps: usize },
    Event(Event<'a>),
}

/// Starts a screening in `out` (with `Some(config)`) or continues the one there.
pub fn run_screen(
    config: Option<ScreenConfig>,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(ScreenEvent),
) -> Result<(ScreenTable, ScreenConfig)> {
    let dir = RunDir::folder(out)?;
    let _lock = dir.lock()?;
    let config: ScreenConfig = match config {
        Some(c) => {
            if dir.exists("screen-config.json") {
                bail!("{} already holds a screening: continue it with --resume {0}", out.display());
            }
            c.check()?;
            dir.write_json("screen-config.json", &c)?;
            c
        }
        None => dir.read_json("screen-config.json")?,
    };
    let total = config.configurations.len() * config.tasks.len();
    let mut rows = Vec::with_capacity(total);
    for (c, (name, changes)) in config.configurations.iter().enumerate() {
        for (t, task) in config.tasks.iter().enumerate() {
            let run_dir = out.join(name).join(task);
            let settings = config.settings(changes, task)?;
            report(ScreenEvent::Run {
                index: c * config.tasks.len() + t,
                total,
                configuration: name,
                task,
                steps: settings.steps,
            });
            let summary: Summary = if run_dir.join("summary.json").exists() {
                RunDir::open(&run_dir)?.read_json("summary.json")?
            } else {
                let start = if run_dir.join("config.json").exists() { Start::Resume { steps: None } } else { Start::New(settings) };
                run(start, &run_dir, interrupt, &mut |e| report(ScreenEvent::Event(e)))?
            };
            let steps: Vec<StepRecord> = RunDir::open(&run_dir)?.read_steps()?;
            rows.push(ScreenRow::from_summary(name, task, &summary, &steps)?);
        }
    }
    let table = ScreenTable { rows };
    dir.write_json("screen.json", &table)?;
    dir.write_atomic("screen.md", table.markdown(&config).as_bytes())?;
    Ok((table, config))
}
