//! The application both front ends call (the CLI in `main.rs`, the Python module): each long
//! command with the pages it implies written as its work finishes, and the checks every
//! front end would otherwise repeat. A front end gathers settings, shows progress and
//! renders what these return.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;

use crate::optimize::run::{run, Event, Start};
use crate::protocol::{run_protocol, ProtocolEvent, Shard};
use crate::records::{
    ProtocolConfig, ProtocolTable, RunConfig, ScreenConfig, ScreenTable, Summary,
};
use crate::report::{write_protocol_outputs, write_run_outputs, write_screen_outputs};
use crate::screen::{run_screen, ScreenEvent};
use crate::settings::OptimizeConfig;
use crate::store::{file, RunDir};
use crate::tasks::{Example, Split, Task};

/// Runs (or resumes) an optimisation in `out`, writing its `summary.md` and `report.html`
/// when it finishes; `on_event` sees every event after that.
pub fn optimize(
    start: Start,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Summary> {
    run(start, out, interrupt, &mut |event| {
        write_pages_of(&event);
        on_event(event)
    })
}

/// Runs (or resumes) a protocol's `shard` in `out`, writing each run's pages as it finishes
/// and the protocol's `protocol.md` and `report.html` after each task and at the end.
pub fn protocol(
    start: Start<ProtocolConfig>,
    out: &Path,
    shard: Shard,
    interrupt: &Arc<AtomicBool>,
    on_event: &mut dyn FnMut(ProtocolEvent),
) -> Result<(ProtocolTable, ProtocolConfig)> {
    let (table, config) = run_protocol(start, out, shard, interrupt, &mut |event| {
        match &event {
            ProtocolEvent::Run(e) => write_pages_of(e),
            ProtocolEvent::Table(table, config) => {
                warn_on_report_error(write_protocol_outputs(out, table, config))
            }
            ProtocolEvent::Task { .. } => {}
        }
        on_event(event)
    })?;
    warn_on_report_error(write_protocol_outputs(out, &table, &config));
    Ok((table, config))
}

/// Runs (or resumes) a screening in `out`, writing each run's pages as it finishes and the
/// screening's `screen.md` at the end.
pub fn screen(
    start: Start<ScreenConfig>,
    out: &Path,
    interrupt: &Arc<AtomicBool>,
    on_event: &mut dyn FnMut(ScreenEvent),
) -> Result<(ScreenTable, ScreenConfig)> {
    let (table, config) = run_screen(start, out, interrupt, &mut |event| {
        if let ScreenEvent::Event(e) = &event {
            write_pages_of(e);
        }
        on_event(event)
    })?;
    warn_on_report_error(write_screen_outputs(out, &table, &config));
    Ok((table, config))
}

/// A run folder as a front end shows it, finished or not.
#[derive(Debug, serde::Serialize)]
pub struct RunView {
    /// The recorded settings.
    pub settings: OptimizeConfig,
    /// The step log's records, as written.
    pub steps: Vec<serde_json::Value>,
    /// The summary, once the run has finished.
    pub summary: Option<Summary>,
}

/// The run in `path`, read through its folder's own reader.
pub fn read_run(path: &Path) -> Result<RunView> {
    let dir = RunDir::open(path)?;
    let config: RunConfig = dir.read_json(file::CONFIG)?;
    Ok(RunView {
        settings: config.settings,
        steps: dir.read_steps()?,
        summary: RunDir::finished_summary(path)?,
    })
}

/// The test questions of `split`, or an error when there are none.
pub fn test_questions<'a>(split: &Split, task: &'a Task) -> Result<Vec<&'a Example>> {
    let test = Split::pick(&split.test, task);
    if test.is_empty() {
        anyhow::bail!("the test split is empty: set test to 1 or more (--test N, test=N)");
    }
    Ok(test)
}

/// A finished run's pages.
fn write_pages_of(event: &Event) {
    if let Event::Finished(dir) = event {
        warn_on_report_error(write_run_outputs(dir));
    }
}

/// A page that cannot be written does not stop work whose records are saved.
fn warn_on_report_error(result: Result<()>) {
    if let Err(e) = result {
        eprintln!("warning: could not write a report: {e:#}");
    }
}
