//! Evaluation: reasoning under a prompt, the extractor, a short greedy answer, parsed and
//! compared with the gold answer.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::model::generate::{generate, GenerateConfig, Generated, Request, StopReason};
use crate::records::{write_atomic, EvalSummary, Label, Paired};
use crate::runtime::LanguageModel;
use crate::settings::OptimizeConfig;
use crate::stats::{mcnemar_exact, wilson_interval};
use crate::tasks::{Example, Task};
use crate::tokenizer::SystemTurn;

/// How a prompt is evaluated: batch, reasoning budget and layout.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Questions decoded together.
    pub batch: usize,
    /// Token budget of the reasoning.
    pub max_reasoning: usize,
    /// Text between the question and the prompt (see [`crate::layout`]).
    pub connector: String,
    /// What goes before the user turn.
    pub system: SystemTurn,
    /// Stops the evaluation (see [`GenerateConfig::cancel`]).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl EvalConfig {
    /// How `settings` evaluate held-out questions: the layout and the reasoning budget.
    pub fn of(settings: &OptimizeConfig, cancel: Option<Arc<AtomicBool>>) -> Self {
        EvalConfig {
            batch: settings.eval_batch,
            max_reasoning: settings.max_reasoning,
            connector: settings.connector.clone(),
            system: settings.system.clone(),
            cancel,
        }
    }
}

/// The ids the model reads for `question` under `prompt`, before its reasoning.
pub fn user_ids(layout: &Layout, question: &str, prompt: &str) -> Result<Vec<u32>> {
    layout.user_turn(&layout.question(question)?, &layout.prompt_ids(prompt)?)
}

/// Greedy reasoning for every question under `prompt`, all in one batch.
fn reason(
    lm: &LanguageModel,
    layout: &Layout,
    questions: &[&str],
    prompt: &str,
    cfg: &EvalConfig,
    answer_budget: usize,
) -> Result<Vec<Generated>> {
    let requests = questions
        .iter()
        .map(|q| {
            let ids = user_ids(layout, q, prompt)?;
            layout.check_room(q, ids.len(), cfg.max_reasoning, answer_budget)?;
            Ok(Request { prefix: Default::default(), ids })
        })
        .collect::<Result<_>>()?;
    let gen_cfg = GenerateConfig {
        cancel: cfg.cancel.clone(),
        ..lm.generate_config(cfg.max_reasoning, None)
    };
    generate(&lm.model, requests, &gen_cfg)
}

/// One question's evaluation (a line of `eval --out` and of a run's `test-*.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The question.
    pub question: String,
    /// The prompt evaluated.
    pub prompt: String,
    /// The model's reasoning.
    pub reasoning: String,
    /// Tokens of the reasoning.
    pub reasoning_tokens: usize,
    /// Whether the reasoning ran into the budget: then the extractor forced an answer before
    /// the model had ended its turn.
    pub cut_by_budget: bool,
    /// What the model wrote after the extractor.
    pub raw_answer: String,
    /// The answer parsed from it (None: nothing the task's parser accepts).
    pub parsed_answer: Option<String>,
    /// The gold answer.
    pub gold: String,
    /// Whether the parsed answer equals the gold one.
    pub correct: bool,
}

/// A prompt's accuracy on a list of questions, with every question's record.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Questions evaluated.
    pub n: usize,
    /// Questions answered correctly.
    pub correct: usize,
    /// Share of questions answered correctly.
    pub accuracy: f64,
    /// 95% Wilson score interval.
    pub interval: (f64, f64),
    /// Share of the commonest gold answer: what always giving it would score.
    pub majority_floor: f64,
    /// What answering at random among each question's options would score (0 for open answers).
    pub chance: f64,
    /// Reasonings that ran into the budget (see [`Record::cut_by_budget`]).
    pub cut_by_budget: usize,
    /// Answers the task's parser found nothing in (counted wrong).
    pub unparsed: usize,
    /// Questions whose records were read from an interrupted evaluation's log (see
    /// [`RecordLog`]): their tokens and seconds are not counted below.
    pub resumed: usize,
    /// Tokens decoded (reasoning and answers).
    pub tokens_generated: usize,
    /// Wall seconds.
    pub seconds: f64,
    /// One record per question, in the questions' order.
    #[serde(skip)]
    pub records: Vec<Record>,
}

impl EvalReport {
    /// What a run's summary keeps of this evaluation of `prompt`.
    pub fn summary(&self, label: Label, prompt: &str) -> EvalSummary {
        EvalSummary {
            label,
            prompt: prompt.into(),
            accuracy: self.accuracy,
            correct: self.correct,
            n: self.n,
            interval: self.interval,
            seconds: self.seconds,
            cut_by_budget: Some(self.cut_by_budget),
            unparsed: Some(self.unparsed),
        }
    }
}

/// Accuracy of `prompt` on `examples`; `progress` is told how many are done.
///
/// ```no_run
/// use greater::eval::{evaluate, EvalConfig};
/// use greater::runtime::LanguageModel;
/// use greater::settings::OptimizeConfig;
/// use greater::tasks::{Count, Split};
///
/// let settings = OptimizeConfig { test: Count::N(20), ..OptimizeConfig::default() };
/// let (task, split) = settings.load_task()?;
/// let lm = LanguageModel::open(&settings.model, &settings.open_options(), &mut |m| eprintln!("{m}"))?;
/// let test = Split::pick(&split.test, &task);
/// let report = evaluate(&lm, &task, &test, "Let's think step by step.", &EvalConfig::of(&settings, None), &mut |_| {})?;
/// println!("{:.3} [{:.3}, {:.3}], {} unparsed", report.accuracy, report.interval.0, report.interval.1, report.unparsed);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn evaluate(
    lm: &LanguageModel,
    task: &Task,
    examples: &[&Example],
    prompt: &str,
    cfg: &EvalConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    evaluate_logged(lm, task, examples, prompt, cfg, None, progress)
}

/// [`evaluate`], its records appended to `log` as each batch finishes; the questions `log`
/// already holds (an interrupted evaluation's) are taken from it, not decoded again.
pub fn evaluate_logged(
    lm: &LanguageModel,
    task: &Task,
    examples: &[&Example],
    prompt: &str,
    cfg: &EvalConfig,
    mut log: Option<&mut RecordLog>,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    let start = Instant::now();
    let layout = Layout::new(lm, task, &cfg.system, &cfg.connector)?;
    let extractor = layout.extractor();
    let answer_cfg = lm.generate_config(task.kind.answer_budget(), None);
    let mut records = match log.as_deref_mut() {
        Some(log) => log.take_kept(examples, prompt)?,
        None => Vec::with_capacity(examples.len()),
    };
    let resumed = records.len();
    let mut tokens = 0;
    for chunk in examples[resumed..].chunks(cfg.batch.max(1)) {
        let questions: Vec<&str> = chunk.iter().map(|e| e.question.as_str()).collect();
        let reasoning = reason(lm, &layout, &questions, prompt, cfg, answer_cfg.max_tokens)?;
        let requests: Vec<Request> = reasoning
            .iter()
            .map(|r| Request {
                prefix: r.cache.clone(),
                ids: [&r.ids[r.fed..], extractor].concat(),
            })
            .collect();
        let answers = generate(&lm.model, requests, &answer_cfg)?;
        let done = records.len();
        for ((example, r), answer) in chunk.iter().zip(&reasoning).zip(answers) {
            tokens += r.ids.len() + answer.ids.len();
            let raw_answer = lm.tokenizer.decode(&answer.ids)?;
            let parsed_answer = task.kind.parse(&raw_answer);
            records.push(Record {
                question: example.question.clone(),
                prompt: prompt.to_string(),
                reasoning: lm.tokenizer.decode(&r.ids)?,
                reasoning_tokens: r.ids.len(),
                cut_by_budget: r.stop != StopReason::StopToken,
                correct: parsed_answer.as_deref() == Some(example.answer.as_str()),
                raw_answer,
                parsed_answer,
                gold: example.answer.clone(),
            });
        }
        if let Some(log) = log.as_deref_mut() {
            log.append(&records[done..])?;
        }
        progress(records.len());
    }
    let correct = records.iter().filter(|r| r.correct).count();
    let n = records.len();
    Ok(EvalReport {
        n,
        correct,
        accuracy: correct as f64 / n.max(1) as f64,
        interval: wilson_interval(correct, n),
        majority_floor: Task::majority_floor(examples),
        chance: task.chance_level(examples),
        cut_by_budget: records.iter().filter(|r| r.cut_by_budget).count(),
        unparsed: records.iter().filter(|r| r.parsed_answer.is_none()).count(),
        resumed,
        tokens_generated: tokens,
        seconds: start.elapsed().as_secs_f64(),
        records,
    })
}

/// `first`'s records against `second`'s, question by question; an error when they are not
/// of the same questions in the same order.
pub fn paired(first: &[Record], second: &[Record]) -> Result<Paired> {
    if first.len() != second.len()
        || first.iter().zip(second).any(|(a, b)| a.question != b.question)
    {
        bail!("the two evaluations are not of the same questions in the same order");
    }
    let only = |a: &[Record], b: &[Record]| {
        a.iter().zip(b).filter(|(x, y)| x.correct && !y.correct).count()
    };
    let (only_first, only_second) = (only(first, second), only(second, first));
    Ok(Paired {
        n: first.len(),
        only_first,
        only_second,
        p_value: mcnemar_exact(only_first, only_second),
    })
}

fn json_lines(records: &[Record]) -> Result<Vec<u8>> {
    let mut text = Vec::new();
    for r in records {
        serde_json::to_writer(&mut text, r)?;
        text.push(b'\n');
    }
    Ok(text)
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The records of an evaluation under way: `<file>.partial` holds a first line naming what is
/// evaluated (the caller's `header`), then one synced JSON line per finished question. An
/// evaluation killed or stopped part-way is resumed from it by one of the same header, prompt
/// and questions; `<file>` itself is replaced only when every question is done.
pub struct RecordLog {
    dest: PathBuf,
    partial: PathBuf,
    file: File,
    kept: Vec<Record>,
    restart: bool,
}

impl RecordLog {
    /// The log of the evaluation whose records go to `dest`: a partial one of the same
    /// `header` is continued; one of another header is an error naming the differences.
    pub fn open(dest: &Path, header: &serde_json::Value) -> Result<Self> {
        Self::open_with(dest, header, false)
    }

    /// [`RecordLog::open`], but a partial log of another header, or of other questions, is
    /// started again: for a run folder's own evaluations, whose settings a resume checks.
    pub fn open_or_restart(dest: &Path, header: &serde_json::Value) -> Result<Self> {
        Self::open_with(dest, header, true)
    }

    fn open_with(dest: &Path, header: &serde_json::Value, restart: bool) -> Result<Self> {
        let dest = &regular_file(dest)?;
        let partial = sibling(dest, ".partial");
        let cannot_write = |e: std::io::Error| anyhow!("cannot write {}: {e}", partial.display());
        let kept = match Self::read_partial(&partial, header) {
            Err(_) if restart => None,
            kept => kept?,
        };
        let file = match &kept {
            Some((_, whole)) => {
                let file = OpenOptions::new().append(true).open(&partial).map_err(cannot_write)?;
                // A line torn by a kill mid-write is cut off before anything is appended.
                file.set_len(*whole).map_err(cannot_write)?;
                file
            }
            None => {
                let mut file = File::create(&partial).map_err(cannot_write)?;
                let mut line = serde_json::to_vec(&serde_json::json!({ "evaluating": header }))?;
                line.push(b'\n');
                file.write_all(&line).and_then(|()| file.sync_all()).map_err(cannot_write)?;
                file
            }
        };
        let kept = kept.map(|(records, _)| records).unwrap_or_default();
        Ok(RecordLog { dest: dest.to_path_buf(), partial, file, kept, restart })
    }

    /// The records of a partial log of `header` and the bytes of its whole lines; None
    /// without one.
    fn read_partial(
        partial: &Path,
        header: &serde_json::Value,
    ) -> Result<Option<(Vec<Record>, u64)>> {
        let text = match fs::read_to_string(partial) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => bail!("cannot read {}: {e}", partial.display()),
        };
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        let mut lines = text[..whole].lines();
        let Some(first) = lines.next() else { return Ok(None) };
        let found = serde_json::from_str::<serde_json::Value>(first)
            .ok()
            .and_then(|v| v.get("evaluating").cloned())
            .with_context(|| {
                format!("{}:1: not the first line of an evaluation's log", partial.display())
            })?;
        if found != *header {
            bail!(
                "{} holds an interrupted evaluation of other settings ({}); pass the same ones to resume it, or delete it",
                partial.display(),
                differences(&found, header)
            );
        }
        let records = lines
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: unreadable question record", partial.display(), i + 2)
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some((records, whole as u64)))
    }

    /// The kept records, which must be of the first of `examples` under `prompt` (a run
    /// folder's log that is not is started again).
    fn take_kept(&mut self, examples: &[&Example], prompt: &str) -> Result<Vec<Record>> {
        let kept = std::mem::take(&mut self.kept);
        let same = kept.len() <= examples.len()
            && kept
                .iter()
                .zip(examples)
                .all(|(r, e)| r.question == e.question && r.prompt == prompt);
        if same {
            return Ok(kept);
        }
        if !self.restart {
            bail!(
                "{} holds records of other questions or of another prompt; delete it to evaluate these",
                self.partial.display()
            );
        }
        let cannot_write =
            |e: std::io::Error| anyhow!("cannot write {}: {e}", self.partial.display());
        let first = fs::read_to_string(&self.partial).map_err(cannot_write)?;
        let header = first.find('\n').map_or(0, |i| i + 1);
        self.file.set_len(header as u64).map_err(cannot_write)?;
        Ok(Vec::new())
    }

    fn append(&mut self, records: &[Record]) -> Result<()> {
        self.file
            .write_all(&json_lines(records)?)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write {}", self.partial.display()))
    }

    /// Writes the finished evaluation's `records` to the log's file and removes the partial
    /// log.
    pub fn finish(self, records: &[Record]) -> Result<()> {
        write_atomic(&sibling(&self.dest, ".tmp"), &self.dest, &json_lines(records)?)?;
        fs::remove_file(&self.partial)
            .with_context(|| format!("cannot remove {}", self.partial.display()))
    }

    /// Questions kept from an interrupted evaluation, before it resumes.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Where the records go: the file given, or the one a link given points at.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The partial log's path.
    pub fn partial(&self) -> &Path {
        &self.partial
    }
}

/// `path`, or the file it links to: a records file is replaced by renaming a whole one onto
/// it, which must neither replace a link nor write beside a device (`/dev/stdout`).
fn regular_file(path: &Path) -> Result<PathBuf> {
    let not_a_file = || {
        anyhow!("{} is not a regular file: records are written to a file beside their place and renamed onto it", path.display())
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(path.to_path_buf()),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
        Ok(m) if m.is_file() => Ok(path.to_path_buf()),
        Ok(m) if m.is_symlink() => {
            let target = fs::canonicalize(path)
                .with_context(|| format!("{} is a link to nothing", path.display()))?;
            if !target.is_file() {
                return Err(not_a_file());
            }
            Ok(target)
        }
        Ok(_) => Err(not_a_file()),
    }
}

/// The top-level keys whose values differ between two JSON objects.
fn differences(found: &serde_json::Value, wanted: &serde_json::Value) -> String {
    let empty = serde_json::Map::new();
    let (a, b) = (found.as_object().unwrap_or(&empty), wanted.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k} {} there, {} here", show(a.get(k)), show(b.get(k))))
        .collect::<Vec<_>>()
        .join(", ")
}
