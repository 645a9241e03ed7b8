//! Evaluation: reasoning under a prompt, the extractor, a short greedy answer, parsed and
//! compared with the gold answer.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::model::generate::{generate, GenerateConfig, Generated, Request, StopReason};
use crate::records::Paired;
use crate::runtime::LanguageModel;
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
) -> Result<Vec<Generated>> {
    let requests = questions
        .iter()
        .map(|q| Ok(Request { prefix: Default::default(), ids: user_ids(layout, q, prompt)? }))
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
    /// Tokens decoded (reasoning and answers).
    pub tokens_generated: usize,
    /// Wall seconds.
    pub seconds: f64,
    /// One record per question, in the questions' order.
    #[serde(skip)]
    pub records: Vec<Record>,
}

/// Accuracy of `prompt` on `examples`; `progress` is told how many are done.
///
/// ```no_run
/// use greater::eval::evaluate;
/// use greater::runtime::LanguageModel;
/// use greater::settings::OptimizeConfig;
/// use greater::tasks::{Count, Split};
///
/// let settings = OptimizeConfig { test: Count::N(20), ..OptimizeConfig::default() };
/// let (task, split) = settings.load_task()?;
/// let lm = LanguageModel::open(&settings.model, &settings.open_options(), &mut |m| eprintln!("{m}"))?;
/// let test = Split::pick(&split.test, &task);
/// let report = evaluate(&lm, &task, &test, "Let's think step by step.", &settings.eval_config(None), &mut |_| {})?;
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
    let start = Instant::now();
    let layout = Layout::new(lm, task, &cfg.system, &cfg.connector)?;
    let extractor = layout.extractor();
    let answer_cfg = lm.generate_config(task.kind.answer_budget(), None);
    let mut records = Vec::with_capacity(examples.len());
    let mut tokens = 0;
    for chunk in examples.chunks(cfg.batch.max(1)) {
        let questions: Vec<&str> = chunk.iter().map(|e| e.question.as_str()).collect();
        let reasoning = reason(lm, &layout, &questions, prompt, cfg)?;
        let requests: Vec<Request> = reasoning
            .iter()
            .map(|r| Request {
                prefix: r.cache.clone(),
                ids: [&r.ids[r.fed..], extractor].concat(),
            })
            .collect();
        let answers = generate(&lm.model, requests, &answer_cfg)?;
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
        tokens_generated: tokens,
        seconds: start.elapsed().as_secs_f64(),
        records,
    })
}

/// 95% Wilson score interval for `k` successes in `n` trials.
pub fn wilson_interval(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n) = (1.959_963_984_540_054_f64, n as f64);
    let p = k as f64 / n;
    let denom = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
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

/// Two-sided exact McNemar p-value of `b` questions only one prompt got right against `c`
/// only the other did: twice the Binomial(b + c, 1/2) tail at the smaller count, at most 1.
/// Each term is taken from logs, since 2^-(b+c) underflows for a few thousand questions.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let mut ln_choose = 0.0;
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64 / i as f64).ln();
        }
        tail += (ln_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// One JSON line per record.
pub fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for r in records {
            serde_json::to_writer(&mut out, r)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}
