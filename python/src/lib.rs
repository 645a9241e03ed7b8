//! The native half of the `greater` Python package: settings arrive as JSON objects with the
//! TOML keys, results leave as JSON text, events go to a Python callable. The Python half
//! (`python/greater/__init__.py`) turns them into `Run`s, progress bars and exceptions.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::ValueEnum;
use greater::app;
use greater::eval::{evaluate as evaluate_prompt, EvalConfig};
use greater::model::generate::Cancelled;
use greater::optimize::run::{Changes, Event, Start};
use greater::protocol::{ProtocolEvent, Shard, PAPER_TASKS};
use greater::records::{ProtocolConfig, ScreenConfig};
use greater::runtime::LanguageModel;
use greater::screen::ScreenEvent;
use greater::settings::{Method, OptimizeConfig, Preset, Size};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Bounds what a chat template may allocate while it renders (see `tokenizer::budget`).
#[global_allocator]
static ALLOC: greater::tokenizer::BudgetedAlloc = greater::tokenizer::BudgetedAlloc;

/// Settings: the defaults (or `preset`), then `size`, then the keys of `json` (an object
/// whose keys are the TOML keys). Errors name the key.
fn settings_from(json: &str, size: Option<&str>, preset: Option<&str>) -> PyResult<OptimizeConfig> {
    let value = |what: &str, name: &str| PyValueError::new_err(format!("unknown {what} {name:?}"));
    let base = match preset {
        Some(p) => match Preset::from_str(p, true).map_err(|_| value("preset", p))? {
            Preset::Reference => OptimizeConfig::reference(),
        },
        None => OptimizeConfig::default(),
    };
    let base = match size {
        Some(s) => Size::from_str(s, true).map_err(|_| value("size", s))?.apply(base),
        None => base,
    };
    let text = toml_text(json, "settings")?;
    let settings =
        base.with_toml(&text).map_err(|e| PyValueError::new_err(format!("setting {e}")))?;
    settings.validate().map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(settings)
}

/// The TOML text of a JSON object of settings (its keys the TOML keys); errors begin with
/// `what`.
fn toml_text(json: &str, what: &str) -> PyResult<String> {
    let keys: toml::Table =
        serde_json::from_str(json).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    toml::to_string(&keys).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// A run's events as (kind, JSON text) for the Python callable; Ctrl-C and an exception in
/// the callable stop the run at its next check.
struct Events {
    callback: Py<PyAny>,
    interrupt: Arc<AtomicBool>,
    error: Mutex<Option<PyErr>>,
}

impl Events {
    fn send(&self, event: &Event) {
        let (kind, data) = match event {
            Event::Info(message) => ("info", serde_json::json!({ "message": message })),
            Event::Start { done, total, budget } => {
                ("start", serde_json::json!({ "done": done, "total": total, "budget": budget }))
            }
            Event::Step(record, state) => (
                "step",
                serde_json::json!({ "record": record, "best_score": state.best_score, "position": state.position }),
            ),
            Event::EvalStart { label, questions } => {
                ("eval_start", serde_json::json!({ "label": label, "questions": questions }))
            }
            Event::EvalProgress(done) => ("eval_progress", serde_json::json!({ "done": done })),
            Event::Finished(dir) => ("finished", serde_json::json!({ "folder": dir })),
        };
        Python::attach(|py| {
            let result =
                py.check_signals().and_then(|_| self.callback.call1(py, (kind, data.to_string())));
            if let Err(e) = result {
                self.interrupt.store(true, Ordering::SeqCst);
                self.error.lock().expect("not poisoned").get_or_insert(e);
            }
        });
    }

    /// The run's result as Python sees it: the callable's exception first, then Ctrl-C as
    /// KeyboardInterrupt (the checkpoint of the last finished step stays), then errors.
    fn finish<T>(self, result: anyhow::Result<T>) -> PyResult<T> {
        if let Some(e) = self.error.into_inner().expect("not poisoned") {
            return Err(e);
        }
        result.map_err(|e| {
            if e.downcast_ref::<Cancelled>().is_some() {
                PyKeyboardInterrupt::new_err(
                    "interrupted: finished steps are saved; resume with resume=True",
                )
            } else {
                PyRuntimeError::new_err(format!("{e:#}"))
            }
        })
    }
}

/// Ctrl-C sets `interrupt` while the native code runs (Python's own handler cannot run then).
fn on_ctrl_c(interrupt: &Arc<AtomicBool>) -> PyResult<signal_hook::SigId> {
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(interrupt))
        .map_err(|e| PyRuntimeError::new_err(format!("cannot watch Ctrl-C: {e}")))
}

/// Runs `work` without the GIL, with Ctrl-C setting the interrupt flag it is given and its
/// events sent to `on_event`; its result as [`Events::finish`] makes it.
fn run_detached<T: Send>(
    py: Python<'_>,
    on_event: Py<PyAny>,
    work: impl FnOnce(&Arc<AtomicBool>, &Events) -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let events =
        Events { callback: on_event, interrupt: Arc::clone(&interrupt), error: Mutex::new(None) };
    let hook = on_ctrl_c(&interrupt)?;
    let result = py.detach(|| work(&interrupt, &events));
    signal_hook::low_level::unregister(hook);
    events.finish(result)
}

/// Runs (or with `resume`, continues) an optimisation in `out`; returns summary.json's text.
#[pyfunction]
#[pyo3(signature = (settings, out, on_event, size=None, preset=None, resume=false, steps=None))]
#[allow(clippy::too_many_arguments)]
fn optimize(
    py: Python<'_>,
    settings: &str,
    out: PathBuf,
    on_event: Py<PyAny>,
    size: Option<&str>,
    preset: Option<&str>,
    resume: bool,
    steps: Option<usize>,
) -> PyResult<String> {
    let start = if resume {
        Start::Resume(Changes { steps, data_dir: None })
    } else {
        Start::New(settings_from(settings, size, preset)?)
    };
    let summary = run_detached(py, on_event, |interrupt, events| {
        app::optimize(start, &out, interrupt, &mut |e| events.send(&e))
    })?;
    serde_json::to_string(&summary).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Scores `prompt` on the test questions the settings choose; returns the report (with one
/// record per question) as JSON text.
#[pyfunction]
#[pyo3(signature = (settings, prompt, on_event, size=None))]
fn evaluate(
    py: Python<'_>,
    settings: &str,
    prompt: &str,
    on_event: Py<PyAny>,
    size: Option<&str>,
) -> PyResult<String> {
    let settings = settings_from(settings, size, None)?;
    let result = run_detached(py, on_event, |interrupt, events| {
        let (task, split) = settings.load_task()?;
        let test = app::test_questions(&split, &task)?;
        let lm = LanguageModel::open(&settings.model, &settings.open_options(), &mut |m| {
            events.send(&Event::Info(m.to_string()))
        })?;
        let label = "eval";
        events.send(&Event::EvalStart { label, questions: test.len() });
        let cfg = EvalConfig::of(&settings, Some(Arc::clone(interrupt)));
        let report = evaluate_prompt(&lm, &task, &test, prompt, &cfg, &mut |done| {
            events.send(&Event::EvalProgress(done))
        })?;
        Ok(
            serde_json::json!({ "task": task.name, "model": settings.model, "prompt": prompt, "report": report, "records": report.records }),
        )
    })?;
    Ok(result.to_string())
}

/// Runs (or with `resume`, continues) a protocol in `out`, or its `shard` (index, count);
/// returns the table of the tasks finished so far as JSON text.
#[pyfunction]
#[pyo3(signature = (settings, tasks, out, on_event, methods=None, baseline_tasks=None, transfer_to=None, size=None, preset=None, shard=None, resume=false))]
#[allow(clippy::too_many_arguments)]
fn protocol(
    py: Python<'_>,
    settings: &str,
    tasks: Vec<String>,
    out: PathBuf,
    on_event: Py<PyAny>,
    methods: Option<Vec<String>>,
    baseline_tasks: Option<usize>,
    transfer_to: Option<String>,
    size: Option<&str>,
    preset: Option<&str>,
    shard: Option<(usize, usize)>,
    resume: bool,
) -> PyResult<String> {
    let shard = match shard {
        Some((index, count)) if index < count => Shard { index, count },
        Some((index, count)) => {
            return Err(PyValueError::new_err(format!(
                "shard ({index}, {count}): the index must be below the count"
            )))
        }
        None => Shard::ALL,
    };
    let start = if resume {
        Start::Resume(Changes::default())
    } else {
        let methods = methods
            .unwrap_or_default()
            .iter()
            .map(|m| {
                Method::from_str(m, true)
                    .map_err(|_| PyValueError::new_err(format!("unknown method {m:?}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let settings = settings_from(settings, size, preset)?;
        let tasks = if tasks.is_empty() {
            PAPER_TASKS.iter().map(|t| t.to_string()).collect()
        } else {
            tasks
        };
        Start::New(ProtocolConfig { settings, tasks, transfer_to, methods, baseline_tasks })
    };
    let (table, _) = run_detached(py, on_event, |interrupt, events| {
        app::protocol(start, &out, shard, interrupt, &mut |event| match event {
            ProtocolEvent::Run(e) => events.send(&e),
            ProtocolEvent::Task { index, total, name, .. } => {
                events.send(&Event::Info(format!("task {}/{total}: {name}", index + 1)))
            }
            ProtocolEvent::Table(..) => {}
        })
    })?;
    serde_json::to_string(&table).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Runs (or with `resume`, continues) a screening in `out`: each configuration (its name and
/// a JSON object of the settings it changes from `settings`), or those of the TOML file
/// `file`, on each task, judged on train and dev only; returns the table as JSON text.
#[pyfunction]
#[pyo3(signature = (settings, tasks, out, on_event, configurations=None, file=None, size=None, preset=None, resume=false))]
#[allow(clippy::too_many_arguments)]
fn screen(
    py: Python<'_>,
    settings: &str,
    tasks: Vec<String>,
    out: PathBuf,
    on_event: Py<PyAny>,
    configurations: Option<Vec<(String, String)>>,
    file: Option<PathBuf>,
    size: Option<&str>,
    preset: Option<&str>,
    resume: bool,
) -> PyResult<String> {
    let start = if resume {
        Start::Resume(Changes::default())
    } else {
        let configurations = match (configurations, file) {
            (Some(pairs), None) => pairs
                .into_iter()
                .map(|(name, json)| {
                    let text = toml_text(&json, &format!("configuration {name}"))?;
                    Ok((name, text))
                })
                .collect::<PyResult<Vec<_>>>()?,
            (None, Some(file)) => ScreenConfig::configurations_from_file(&file)
                .map_err(|e| PyValueError::new_err(format!("{e:#}")))?,
            _ => return Err(PyValueError::new_err("pass the configurations or a file of them")),
        };
        let base = settings_from(settings, size, preset)?;
        let config = ScreenConfig { base, tasks, configurations };
        config.check().map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        Start::New(config)
    };
    let (table, _) = run_detached(py, on_event, |interrupt, events| {
        app::screen(start, &out, interrupt, &mut |event| match event {
            ScreenEvent::Run { index, total, configuration, task, .. } => events.send(
                &Event::Info(format!("run {}/{total}: {configuration} on {task}", index + 1)),
            ),
            ScreenEvent::Event(e) => events.send(&e),
        })
    })?;
    serde_json::to_string(&table).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The run folder at `path` (finished or interrupted) as JSON text: its settings, step
/// records and summary (null before it has finished).
#[pyfunction]
fn read_run(path: PathBuf) -> PyResult<String> {
    let run = app::read_run(&path).map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
    serde_json::to_string(&run).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Every setting's key with its default, as JSON text (after `size`).
#[pyfunction]
#[pyo3(signature = (size=None))]
fn defaults(size: Option<&str>) -> PyResult<String> {
    let settings = settings_from("{}", size, None)?;
    serde_json::to_string(&settings).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The finished run in `run` exported to `to` (jinja, llamacpp, hf, ollama, python), written
/// to `out` when given; returns the file's text.
#[pyfunction]
#[pyo3(signature = (run, to, out=None))]
fn export(py: Python<'_>, run: &str, to: &str, out: Option<&str>) -> PyResult<String> {
    use clap::ValueEnum;
    let target = greater::export::Target::from_str(to, true).map_err(|_| {
        PyValueError::new_err(format!("to={to:?}: one of jinja, llamacpp, hf, ollama, python"))
    })?;
    py.detach(|| {
        let laid = greater::export::Laid::of_run(std::path::Path::new(run), &mut |_| {})?;
        laid.write(target, out.map(std::path::Path::new))
    })
    .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))
}

#[pymodule]
fn _greater(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(optimize, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(protocol, m)?)?;
    m.add_function(wrap_pyfunction!(screen, m)?)?;
    m.add_function(wrap_pyfunction!(defaults, m)?)?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    m.add_function(wrap_pyfunction!(read_run, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
