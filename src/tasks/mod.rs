//! Tasks: questions with gold answers, how answers are asked for and parsed, and the
//! train / dev / test splits every run records.

pub mod answer;
mod custom;
mod generated;
mod sources;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use answer::AnswerKind;
pub use sources::ExtractorOptions;

/// The initial prompt of the GReaTer paper.
pub const PAPER_INITIAL_PROMPT: &str =
    "proper logical reasoning and think step by step. Finally give the actual correct answer.";
/// The zero-shot chain-of-thought baseline.
pub const ZERO_SHOT_COT: &str = "Let's think step by step.";

/// A question with its gold answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The question text.
    pub question: String,
    /// Gold answer in the normal form of the task's answer kind.
    pub answer: String,
    /// The gold answer as the data spells it ("Yes", not "yes"; a letter without its
    /// parentheses): the tokens the optimiser's answer loss targets after the extractor.
    pub target: String,
}

/// Questions, gold answers and how to read the model's answers.
#[derive(Debug, Clone)]
pub struct Task {
    /// Task name.
    pub name: String,
    /// What kind of answer it takes (parser and extractor follow from it).
    pub kind: AnswerKind,
    /// Appended after the reasoning; ends with `$`.
    pub extractor: String,
    /// The prompt a search starts from.
    pub initial_prompt: String,
    /// Every question of the task.
    pub examples: Vec<Example>,
    /// Where the examples came from (a path, or the generator and its seed).
    pub source: String,
}

/// How to find and build tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// Folder holding `bbh/`, `gsm8k/` and `folio/` (as in the BBH / GSM8K / FOLIO releases).
    pub data_dir: Option<PathBuf>,
    /// Generated tasks: the seed.
    pub seed: u64,
    /// Generated tasks: operators per question.
    pub difficulty: usize,
    /// Generated tasks: how many questions to make.
    pub count: usize,
}

/// Reads a benchmark file into examples.
type Loader = fn(&Path) -> Result<Vec<Example>>;

/// A built-in task: name, answer kind, where its data comes from.
pub struct TaskInfo {
    /// Task name.
    pub name: String,
    /// Its answer kind.
    pub kind: AnswerKind,
    /// Where its data comes from ("generated", "bbh/NAME.json", ...).
    pub source: &'static str,
}

const GENERATED: &[(&str, AnswerKind)] =
    &[("arithmetic", AnswerKind::Integer), ("boolean", AnswerKind::TrueFalse)];

impl Task {
    /// The task of `examples` read from `source`, which also says how many questions
    /// repeat: a repeated question can fall in train and in test, so that a prompt fitted to
    /// it scores it again as held out.
    fn new(name: &str, kind: AnswerKind, examples: Vec<Example>, source: String) -> Self {
        let mut seen = std::collections::HashSet::new();
        let repeats = examples.iter().filter(|e| !seen.insert(e.question.as_str())).count();
        let source = match repeats {
            0 => source,
            n => format!("{source} ({n} of its questions repeat an earlier one)"),
        };
        Task {
            name: name.into(),
            kind,
            extractor: sources::bbh_extractor(name, kind, ExtractorOptions::Data),
            initial_prompt: PAPER_INITIAL_PROMPT.into(),
            examples,
            source,
        }
    }

    /// The task with a BBH extractor listing the options `options` says; other tasks (and
    /// task files with an extractor of their own) as they are.
    pub fn with_extractor_options(mut self, options: ExtractorOptions) -> Self {
        if let Some(kind) = sources::bbh_kind(&self.name) {
            if self.extractor == sources::bbh_extractor(&self.name, kind, ExtractorOptions::Data) {
                self.extractor = sources::bbh_extractor(&self.name, kind, options);
            }
        }
        self
    }

    /// A built-in name (generated, BBH, gsm8k, folio), a `.toml` task file, or a BBH-format
    /// `.json` file named after its task.
    pub fn load(spec: &str, opts: &TaskOptions) -> Result<Task> {
        if let Some(&(name, kind)) = GENERATED.iter().find(|(n, _)| *n == spec) {
            let examples = match name {
                "arithmetic" => generated::arithmetic(opts.count, opts.difficulty, opts.seed),
                _ => generated::boolean(opts.count, opts.difficulty, opts.seed),
            };
            let source = format!(
                "generated {name}: {} questions, difficulty {}, seed {}",
                opts.count, opts.difficulty, opts.seed
            );
            return Ok(Task::new(name, kind, examples, source));
        }
        let path = Path::new(spec);
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => return custom::load(path),
            Some("json") if path.exists() => {
                let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                let Some(kind) = sources::bbh_kind(name) else {
                    bail!("{}: not named after a BBH task; describe other data with a .toml task file", path.display());
                };
                return Ok(Task::new(
                    name,
                    kind,
                    sources::load_bbh(path, kind)?,
                    path.display().to_string(),
                ));
            }
            _ => {}
        }
        let data_file = |rel: &str| -> Result<PathBuf> {
            let Some(dir) = &opts.data_dir else {
                bail!("task '{spec}' reads {rel}: pass --data-dir DIR (the folder holding bbh/, gsm8k/, folio/)");
            };
            Ok(benchmark_file(dir, rel))
        };
        if let Some(kind) = sources::bbh_kind(spec) {
            let path = data_file(&format!("bbh/{spec}.json"))?;
            return Ok(Task::new(
                spec,
                kind,
                sources::load_bbh(&path, kind)?,
                path.display().to_string(),
            ));
        }
        let (rel, loader): (&str, Loader) = match spec {
            "gsm8k" => ("gsm8k/test.jsonl", sources::load_gsm8k),
            "gsm8k-train" => ("gsm8k/train.jsonl", sources::load_gsm8k),
            "folio" => ("folio/validation.jsonl", sources::load_folio),
            "folio-train" => ("folio/train.jsonl", sources::load_folio),
            _ => bail!("{}", unknown_task_message(spec)),
        };
        let kind = if spec.starts_with("gsm8k") {
            AnswerKind::Integer
        } else {
            AnswerKind::TrueFalseUncertain
        };
        let path = data_file(rel)?;
        Ok(Task::new(spec, kind, loader(&path)?, path.display().to_string()))
    }

    /// Loads `spec` and draws its (train, dev, test) split. Generated tasks make at least 300
    /// questions, and more when the split needs them.
    pub fn load_split(
        spec: &str,
        data_dir: Option<PathBuf>,
        seed: u64,
        difficulty: usize,
        (train, dev, test): (usize, usize, Count),
    ) -> Result<(Task, Split)> {
        let count = (train + dev + test.at_least()).max(300);
        let task = Task::load(spec, &TaskOptions { data_dir, seed, difficulty, count })?;
        let test = test.of(task.examples.len().saturating_sub(train + dev));
        let split = Split::new(task.examples.len(), train, dev, test, seed)
            .with_context(|| format!("task {} from {}", task.name, task.source))?;
        Ok((task, split))
    }

    /// What answering each question at random among its options would score on average:
    /// one over the options a multiple-choice question lists (`(A)`, `(B)`, ...; the answer
    /// kind's count where the text lists none), one over the labels of a closed label set,
    /// and zero for open answers (integers, text).
    pub fn chance_level(&self, examples: &[&Example]) -> f64 {
        let per_question = |e: &Example| match self.kind {
            AnswerKind::Choice { options } => {
                let listed = (b'A'..=b'Z')
                    .take_while(|&l| e.question.contains(&format!("({})", l as char)))
                    .count();
                1.0 / if listed > 0 { listed } else { options.max(1) } as f64
            }
            kind => kind.label_count().map_or(0.0, |n| 1.0 / n as f64),
        };
        examples.iter().copied().map(per_question).sum::<f64>() / examples.len().max(1) as f64
    }

    /// The most common gold answer's share: what always answering it would score.
    pub fn majority_floor(examples: &[&Example]) -> f64 {
        let mut counts = std::collections::HashMap::new();
        for e in examples {
            *counts.entry(e.answer.as_str()).or_insert(0usize) += 1;
        }
        counts.values().copied().max().unwrap_or(0) as f64 / examples.len().max(1) as f64
    }
}

/// `rel` (e.g. `bbh/navigate.json`) under the data folder, which may also be the benchmark's
/// own folder (`--data-dir .../bbh`).
fn benchmark_file(dir: &Path, rel: &str) -> PathBuf {
    let direct = dir.join(rel);
    match rel.split_once('/') {
        Some((top, rest)) if !direct.exists() && dir.file_name().is_some_and(|n| n == top) => {
            dir.join(rest)
        }
        _ => direct,
    }
}

/// Every built-in task name with its answer kind.
pub fn builtin_tasks() -> Vec<TaskInfo> {
    let mut out: Vec<TaskInfo> = GENERATED
        .iter()
        .map(|&(n, kind)| TaskInfo { name: n.into(), kind, source: "generated, no file" })
        .collect();
    out.extend(sources::BBH.iter().map(|&(n, kind)| TaskInfo {
        name: n.into(),
        kind,
        source: "bbh/<name>.json",
    }));
    out.extend([
        TaskInfo { name: "gsm8k".into(), kind: AnswerKind::Integer, source: "gsm8k/test.jsonl" },
        TaskInfo {
            name: "gsm8k-train".into(),
            kind: AnswerKind::Integer,
            source: "gsm8k/train.jsonl",
        },
        TaskInfo {
            name: "folio".into(),
            kind: AnswerKind::TrueFalseUncertain,
            source: "folio/validation.jsonl",
        },
        TaskInfo {
            name: "folio-train".into(),
            kind: AnswerKind::TrueFalseUncertain,
            source: "folio/train.jsonl",
        },
    ]);
    out
}

fn unknown_task_message(spec: &str) -> String {
    let names: Vec<String> = builtin_tasks().into_iter().map(|t| t.name).collect();
    let closest = names
        .iter()
        .min_by_key(|n| strsim::levenshtein(n, spec))
        .expect("there are built-in tasks");
    format!("unknown task '{spec}'; did you mean '{closest}'? (`greater tasks` lists them; a .toml file describes your own)")
}

/// Disjoint train / dev / test example indices, drawn from a seeded shuffle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Seed of the shuffle.
    pub seed: u64,
    /// Indices of the questions the search optimises on.
    pub train: Vec<usize>,
    /// Indices of the questions that choose the returned prompt.
    pub dev: Vec<usize>,
    /// Indices of the held-out questions.
    pub test: Vec<usize>,
}

/// How many questions a split takes: a number, or `rest` (every question the other splits
/// leave, so that a benchmark's whole remainder is held out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CountRepr", into = "CountRepr")]
pub enum Count {
    /// Exactly this many.
    N(usize),
    /// Whatever is left.
    Rest,
}

/// `Count` as written: a number or the word `rest`.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CountRepr {
    N(usize),
    Word(String),
}

impl TryFrom<CountRepr> for Count {
    type Error = String;
    fn try_from(r: CountRepr) -> std::result::Result<Self, String> {
        match r {
            CountRepr::N(n) => Ok(Count::N(n)),
            CountRepr::Word(w) => w.parse(),
        }
    }
}

impl From<Count> for CountRepr {
    fn from(c: Count) -> Self {
        match c {
            Count::N(n) => CountRepr::N(n),
            Count::Rest => CountRepr::Word("rest".into()),
        }
    }
}

impl std::str::FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "rest" => Ok(Count::Rest),
            _ => {
                s.parse().map(Count::N).map_err(|_| format!("{s:?}: a number of questions or rest"))
            }
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::N(n) => write!(f, "{n}"),
            Count::Rest => f.write_str("rest"),
        }
    }
}

impl Count {
    /// The number of questions when `left` remain after the other splits.
    pub fn of(self, left: usize) -> usize {
        match self {
            Count::N(n) => n,
            Count::Rest => left,
        }
    }

    /// The fewest questions it can mean (a generated task makes at least this many more).
    pub fn at_least(self) -> usize {
        self.of(0)
    }
}

impl Split {
    /// `train`, `dev` and `test` disjoint questions of `n_examples`, shuffled by `seed`; an error when there are too few.
    pub fn new(
        n_examples: usize,
        train: usize,
        dev: usize,
        test: usize,
        seed: u64,
    ) -> Result<Split> {
        let need = train + dev + test;
        if need > n_examples {
            bail!("the split needs {need} examples (train {train} + dev {dev} + test {test}) but the task has {n_examples}");
        }
        let mut order: Vec<usize> = (0..n_examples).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        Ok(Split {
            seed,
            train: order[..train].to_vec(),
            dev: order[train..train + dev].to_vec(),
            test: order[train + dev..need].to_vec(),
        })
    }

    /// The examples at `indices`.
    pub fn pick<'a>(indices: &[usize], task: &'a Task) -> Vec<&'a Example> {
        indices.iter().map(|&i| &task.examples[i]).collect()
    }
}
