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
//!
//! A configuration that changes only `start = better` from an earlier one searches exactly
//! as that one did when the initial prompt scored no worse on train than zero-shot CoT (the
//! better start is then the initial prompt, and greedy decoding is deterministic): its row
//! reuses the earlier run instead of repeating it.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::optimize::run::{run, Changes, Event, Start};
use crate::records::{Label, ScreenConfig, ScreenRow, ScreenTable, StepRecord, Summary};
use crate::settings::{OptimizeConfig, StartFrom};
use crate::store::{file, RunDir};

impl ScreenRow {
    fn from_summary(
        configuration: &str,
        task: &str,
        summary: &Summary,
        steps: &[StepRecord],
    ) -> Result<Self> {
        let dev = |label: Label| {
            summary.contenders.iter().find(|c| c.label == label).and_then(|c| c.dev.as_ref())
        };
        let (Some(zs), Some(initial)) = (dev(Label::ZeroShotCot), dev(Label::Initial)) else {
            bail!("{configuration}/{task}: the baselines were not measured on dev");
        };
        let searched = summary
            .contenders
            .iter()
            .filter(|c| matches!(c.label, Label::Train(_)))
            .filter_map(|c| c.dev.as_ref());
        let best = searched.max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
        let train = |label: Label| {
            summary.contenders.iter().find(|c| c.label == label).map(|c| c.train.mistakes)
        };
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
            train_mistakes_initial: train(Label::Initial).unwrap_or(0),
            train_mistakes_best: best_mistakes,
            steps: summary.steps,
            dev_cut: summary.contenders.iter().filter_map(|c| c.dev.as_ref()?.cut_by_budget).sum(),
            search_seconds: steps.iter().map(|s| s.seconds.total()).sum(),
            same_search_as: None,
        })
    }
}

/// Does `start = better` start from the initial prompt, judging by a run's train scores?
/// The initial prompt is scored first and keeps its place on a tie.
fn better_start_is_initial(summary: &Summary) -> bool {
    let train =
        |label: Label| summary.contenders.iter().find(|c| c.label == label).map(|c| c.train.score);
    matches!((train(Label::Initial), train(Label::ZeroShotCot)), (Some(i), Some(z)) if i <= z)
}

/// The earlier configuration (among the first `c`) whose finished run on `task` this one's
/// search would repeat step for step, with that run's summary: see the module's
/// documentation.
fn repeated_search(
    config: &ScreenConfig,
    c: usize,
    settings: &OptimizeConfig,
    task: &str,
    out: &Path,
) -> Result<Option<(String, Summary)>> {
    if settings.start != StartFrom::Better {
        return Ok(None);
    }
    let from_initial = OptimizeConfig { start: StartFrom::Initial, ..settings.clone() };
    for (name, changes) in &config.configurations[..c] {
        let dir = out.join(name).join(task);
        if config.settings(changes, task)? != from_initial {
            continue;
        }
        if let Some(summary) = RunDir::finished_summary(&dir)? {
            if better_start_is_initial(&summary) {
                return Ok(Some((name.clone(), summary)));
            }
        }
    }
    Ok(None)
}

/// What a screening tells its caller.
pub enum ScreenEvent<'a> {
    /// A run starts: its index among all, their number, configuration and task.
    Run {
        /// Its index among all runs, from 0.
        index: usize,
        /// Runs in the screening.
        total: usize,
        /// The configuration's name.
        configuration: &'a str,
        /// The task.
        task: &'a str,
        /// Steps the run takes.
        steps: usize,
    },
    /// An event of the run under way.
    Event(Event<'a>),
}

/// Starts a screening in `out` (with `Some(config)`) or continues the one there.
pub fn run_screen(
    start: Start<ScreenConfig>,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    report: &mut dyn FnMut(ScreenEvent),
) -> Result<(ScreenTable, ScreenConfig)> {
    let dir = RunDir::folder(out)?;
    let _lock = dir.lock()?;
    let (config, resume_changes) = match start {
        Start::New(c) => {
            if dir.exists(file::SCREEN_CONFIG) {
                bail!("{} already holds a screening: continue it with --resume {0}", out.display());
            }
            c.check()?;
            dir.write_json(file::SCREEN_CONFIG, &c)?;
            (c, Changes::default())
        }
        Start::Resume(resume_changes) => {
            let mut c: ScreenConfig = dir.read_json(file::SCREEN_CONFIG)?;
            if resume_changes.apply(&mut c.base) {
                dir.write_json(file::SCREEN_CONFIG, &c)?;
            }
            (c, resume_changes)
        }
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
            let repeats = if run_dir.join(file::CONFIG).exists() {
                None
            } else {
                repeated_search(&config, c, &settings, task, out)?
            };
            let (row_dir, summary, same_search_as) = match repeats {
                Some((earlier, summary)) => {
                    report(ScreenEvent::Event(Event::Info(format!(
                        "{name}/{task}: the better start is the initial prompt, so the search is \
                         {earlier}'s: its run is reused"
                    ))));
                    (out.join(&earlier).join(task), summary, Some(earlier))
                }
                None => match RunDir::finished_summary(&run_dir)? {
                    Some(summary) => (run_dir, summary, None),
                    None => {
                        let start = if run_dir.join(file::CONFIG).exists() {
                            Start::Resume(resume_changes.clone())
                        } else {
                            Start::New(settings)
                        };
                        let summary = run(start, &run_dir, interrupt, &mut |e| {
                            report(ScreenEvent::Event(e))
                        })?;
                        (run_dir, summary, None)
                    }
                },
            };
            let steps: Vec<StepRecord> = RunDir::open(&row_dir)?.read_steps()?;
            let row = ScreenRow::from_summary(name, task, &summary, &steps)?;
            rows.push(ScreenRow { same_search_as, ..row });
        }
    }
    let table = ScreenTable { rows };
    dir.write_json(file::SCREEN, &table)?;
    Ok((table, config))
}
