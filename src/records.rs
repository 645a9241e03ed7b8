//! The records a run, protocol or screening folder holds, and nothing else: what is written
//! to disk and read back (settings aside, which are [`crate::settings`]). The code that runs
//! things fills them; [`crate::report`] renders them.
//!
//! ```text
//! run folder       config.json (RunConfig), checkpoint.json (State), calibration.json,
//!                  steps.jsonl (StepRecord per line), <split>-<label>.json (EvalSummary),
//!                  summary.json (Summary), transfer-<model>.json (Transfer)
//! protocol folder  protocol-config.json (ProtocolConfig), protocol.json (ProtocolTable)
//! screen folder    screen-config.json (ScreenConfig), screen.json (ScreenTable)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::settings::{Method, OptimizeConfig};
use crate::tasks::{Count, Split, Task};

// ---------------------------------------------------------------------------------------
// Contenders: the prompts a run may return
// ---------------------------------------------------------------------------------------

/// Which prompt an evaluation or a contender is. Saved as the text people read
/// ("zero-shot CoT", "initial", "train #2", "optimised").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Label {
    /// Zero-shot chain of thought, "Let's think step by step.": the baseline.
    ZeroShotCot,
    /// The prompt the search started from.
    Initial,
    /// The n-th best searched prompt by train score (from 1).
    Train(usize),
    /// The prompt the run returned, measured under its own name on test.
    Optimised,
}

impl Label {
    /// A baseline: a prompt that was not searched.
    pub fn is_baseline(self) -> bool {
        matches!(self, Label::ZeroShotCot | Label::Initial)
    }

    /// The part of an evaluation's file name that names the prompt ("zero_shot_cot", "train__2").
    pub fn file_stem(self) -> String {
        self.to_string().replace([' ', '-', '#'], "_").to_lowercase()
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::ZeroShotCot => write!(f, "zero-shot CoT"),
            Label::Initial => write!(f, "initial"),
            Label::Train(n) => write!(f, "train #{n}"),
            Label::Optimised => write!(f, "optimised"),
        }
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Label {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "zero-shot CoT" => Ok(Label::ZeroShotCot),
            "initial" => Ok(Label::Initial),
            "optimised" => Ok(Label::Optimised),
            _ => s
                .strip_prefix("train #")
                .and_then(|n| n.parse().ok())
                .map(Label::Train)
                .ok_or_else(|| format!("unknown prompt label {s:?}")),
        }
    }
}

/// What chose the returned prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectedBy {
    /// No dev split: the lowest train score.
    #[serde(rename = "train score")]
    TrainScore,
    /// The best dev accuracy among the contenders.
    #[serde(rename = "dev accuracy")]
    DevAccuracy,
}

impl fmt::Display for SelectedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SelectedBy::TrainScore => "train score",
            SelectedBy::DevAccuracy => "dev accuracy",
        })
    }
}

/// A prompt that may be returned, with what was measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contender {
    /// Which prompt this is.
    pub label: Label,
    /// The prompt's text.
    pub prompt: String,
    /// Its score on the train questions.
    pub train: Score,
    /// Its dev evaluation, when there is a dev split.
    pub dev: Option<EvalSummary>,
}

// ---------------------------------------------------------------------------------------
// The search: checkpoint and step log
// ---------------------------------------------------------------------------------------

/// How good a prompt is on the train examples: lower is better.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// mistake rate + control_weight / 10 x prompt NLL + answer_weight x answer NLL
    pub score: f64,
    /// Train questions answered wrongly (with `cut_is_mistake`, also those whose reasoning
    /// was cut at the budget).
    pub mistakes: usize,
    /// Train reasonings cut at the budget, their answers forced mid-reasoning (None in
    /// records of versions that did not count them).
    #[serde(default)]
    pub cut: Option<usize>,
    /// Train questions scored.
    pub n: usize,
    /// Mean negative log-likelihood of the prompt tokens.
    pub nll: f64,
    /// Mean over examples of the gold answer's negative log-likelihood (teacher-forced
    /// after the reasoning and the extractor).
    #[serde(default)]
    pub answer_nll: f64,
    /// Mean length of the train reasonings in tokens: a search that makes the model write
    /// until the budget, or stop reasoning, shows here (None in records of versions that did
    /// not keep it).
    #[serde(default)]
    pub reasoning_tokens: Option<f64>,
}

impl Score {
    /// "13/30 wrong, 2 cut, 240 tokens a reasoning": the mistakes and, when counted, the
    /// reasonings cut at the budget and the mean length of all of them.
    pub fn mistakes_text(&self) -> String {
        let mut text = format!("{}/{} wrong", self.mistakes, self.n);
        if let Some(cut) = self.cut {
            text += &format!(", {cut} cut");
        }
        if let Some(tokens) = self.reasoning_tokens {
            text += &format!(", {tokens:.0} tokens a reasoning");
        }
        text
    }
}

impl State {
    /// An error when a checkpoint cannot be continued: an empty prompt, a position outside
    /// it, or reasoning for another number of train questions.
    pub fn check(&self, train: usize, vocab: usize) -> Result<()> {
        if self.prompt.is_empty() || self.best_prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let reasoning = self.reasoning.iter().flatten().flatten();
        if let Some(id) = self
            .prompt
            .iter()
            .chain(&self.best_prompt)
            .chain(reasoning)
            .find(|&&id| id as usize >= vocab)
        {
            bail!("token id {id} is not in the model's vocabulary of {vocab}");
        }
        if self.position >= self.prompt.len() {
            bail!(
                "position {} is outside the prompt of {} tokens",
                self.position,
                self.prompt.len()
            );
        }
        if let Some(r) = &self.reasoning {
            if r.len() != train {
                bail!("reasoning for {} train questions, the run has {train}", r.len());
            }
        }
        Ok(())
    }
}

/// Everything a run needs to continue after a kill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Steps finished.
    pub step: usize,
    /// Token index in `prompt` that the next step changes.
    pub position: usize,
    /// The current prompt's ids.
    pub prompt: Vec<u32>,
    /// Reasoning of the current prompt per train example, when the last check produced it.
    pub reasoning: Option<Vec<Vec<u32>>>,
    /// The prompt with the lowest train score so far.
    pub best_prompt: Vec<u32>,
    /// Its train score.
    pub best_score: f64,
    /// Steps since the best score last fell (for `patience`).
    pub steps_since_best: usize,
    /// Tokens of the initial prompt (the sentence-end rule applies from half of it).
    pub initial_len: usize,
    /// Scores by prompt text.
    pub scores: BTreeMap<String, Score>,
    /// Tokens the search decoded so far (reasoning, and `ape`'s proposals): its budget.
    #[serde(default)]
    pub generated_tokens: usize,
    /// With `dev_patience`: the best prompt measured on the stopping dev questions every
    /// `dev_every` steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dev_checks: Vec<DevCheck>,
    /// `ape+greater`: the steps done when APE's rounds ended and the token search began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_search_from: Option<usize>,
}

/// The best prompt so far measured on the dev questions set aside for stopping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevCheck {
    /// Steps done when it was measured.
    pub step: usize,
    /// The prompt measured.
    pub prompt: String,
    /// Stopping questions answered right.
    pub correct: usize,
    /// The questions (indices into the task's examples), never a choosing dev or a test one.
    pub questions: Vec<usize>,
}

impl State {
    /// Whether the last `patience` dev checks brought no gain over the best before them.
    pub fn dev_plateaued(&self, patience: usize) -> bool {
        let n = self.dev_checks.len();
        if patience == 0 || n <= patience {
            return false;
        }
        let before = self.dev_checks[..n - patience].iter().map(|c| c.correct).max();
        let recent = self.dev_checks[n - patience..].iter().map(|c| c.correct).max();
        recent <= before
    }
}

/// A token: its id and its text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenText {
    /// Token id.
    pub id: u32,
    /// The token as text (special tokens spelled out).
    pub text: String,
}

/// A shortlisted token checked for real: its prompt regenerated and scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checked {
    /// The candidate token placed at the step's position.
    pub id: u32,
    /// Its text.
    pub text: String,
    /// Its gradient score (higher ranks it first).
    pub gradient: f32,
    /// The whole prompt with the token in place.
    pub prompt: String,
    /// Its real score on train: with `race`, on the questions it met before it was out.
    pub score: Score,
    /// With `race`: the train questions it met before it could no longer be chosen (its
    /// score counts only those); None when it met them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raced_out_after: Option<usize>,
}

/// An instruction `ape` proposed, with its score on train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The instruction, as it reads back from its ids.
    pub prompt: String,
    /// Its real score on train.
    pub score: Score,
}

/// Wall time of a step by part, in the reference's terms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Seconds {
    /// Step 1: the current prompt's reasoning, when the last check did not leave it.
    pub reasoning: f64,
    /// Step 2, and the filler token when the prompt grows.
    pub proposal: f64,
    /// Steps 3-4.
    pub gradient: f64,
    /// Step 5: the shortlist's reasoning regenerated and scored.
    pub checking: f64,
}

impl Seconds {
    /// The parts' names, in the order of [`Self::parts`].
    pub const PARTS: [&'static str; 4] = ["reasoning", "proposal", "gradient", "checking"];

    /// The parts in the order of [`Self::PARTS`].
    pub fn parts(&self) -> [f64; 4] {
        [self.reasoning, self.proposal, self.gradient, self.checking]
    }

    /// Seconds of the whole step.
    pub fn total(&self) -> f64 {
        self.parts().iter().sum()
    }
}

impl fmt::Display for Seconds {
    /// "reasoning 0.0 s, proposal 1.2 s, gradient 3.4 s, checking 5.6 s"
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = Self::PARTS
            .iter()
            .zip(self.parts())
            .map(|(name, s)| format!("{name} {s:.1} s"))
            .collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// One line of the step log: what every method's step has, and what its search did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step (or `ape` round) number, from 1.
    pub step: usize,
    /// The prompt the step began with (`ape`: the best before the round).
    pub prompt_before: String,
    /// What the method searched.
    #[serde(flatten)]
    pub search: Search,
    /// The prompt after the step (`ape`: the best after the round).
    pub prompt: String,
    /// The best prompt so far by train score.
    pub best_prompt: String,
    /// Its train score.
    pub best_score: f64,
    /// Wall time of the step by part.
    pub seconds: Seconds,
    /// Reasoning tokens decoded in this step.
    #[serde(default)]
    pub generated_tokens: usize,
}

/// What one step searched, by method; written inline in the step's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Search {
    /// `greater` and `gcg`: tokens for one position of the prompt.
    Token(TokenStep),
    /// `ape`: a round of instructions written by the model.
    Round {
        /// The round's new instructions, each scored on train. (Logs written before rounds
        /// had a record of their own kept them under `checked`.)
        #[serde(alias = "checked")]
        proposals: Vec<Proposal>,
    },
}

/// A step of the token search at one position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenStep {
    /// The position the step changed.
    pub position: usize,
    /// The proposal's candidate tokens for the position.
    pub candidates: Vec<TokenText>,
    /// The gradient shortlist, best first, with its real scores.
    pub checked: Vec<Checked>,
    /// The token the step chose (None: nothing was checked).
    pub chosen: Option<TokenText>,
    /// The position the next step changes.
    pub next_position: usize,
    /// The current prompt's train score, when the step generated its reasoning afresh (the
    /// prompt grew or was changed by the step before without being checked as it is now);
    /// None when it was known, and in logs written before it was kept.
    #[serde(default)]
    pub current: Option<Score>,
    /// With `train_batch`: the train questions (positions in the train split) this step's
    /// gradient and checks used, the running best re-scored on them first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub questions: Option<Vec<usize>>,
    /// With `train_batch`: the running best prompt's score on this step's questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_on_questions: Option<Box<Score>>,
}

impl TokenStep {
    /// The checked prompt the step chose.
    pub fn chosen_checked(&self) -> Option<&Checked> {
        self.chosen.as_ref().and_then(|t| self.checked.iter().find(|c| c.id == t.id))
    }
}

impl StepRecord {
    /// The token search's step (None for an `ape` round).
    pub fn token(&self) -> Option<&TokenStep> {
        match &self.search {
            Search::Token(t) => Some(t),
            Search::Round { .. } => None,
        }
    }

    /// Every prompt the step scored on train, with its score: the current prompt when its
    /// reasoning was generated afresh, and the checked candidates or the round's proposals.
    pub fn scored(&self) -> Vec<(&str, &Score)> {
        match &self.search {
            Search::Token(t) => (t.current.iter().map(|s| (self.prompt_before.as_str(), s)))
                .chain(t.checked.iter().map(|c| (c.prompt.as_str(), &c.score)))
                .collect(),
            Search::Round { proposals } => {
                proposals.iter().map(|p| (p.prompt.as_str(), &p.score)).collect()
            }
        }
    }
}

/// A token step for tests: from `before`, checked (id, prompt, score as JSON), chose `chosen`
/// and ended with `after`.
#[cfg(test)]
pub fn test_step(
    n: usize,
    before: &str,
    checked: &[(u32, &str, serde_json::Value)],
    chosen: u32,
    after: &str,
    best_score: f64,
) -> StepRecord {
    use serde_json::json;
    let checked: Vec<_> = (checked.iter())
        .map(
            |(id, p, s)| json!({ "id": id, "text": "", "gradient": -1.0, "prompt": p, "score": s }),
        )
        .collect();
    serde_json::from_value(json!({
        "step": n, "position": 0, "prompt_before": before, "candidates": [], "checked": checked,
        "chosen": { "id": chosen, "text": "" }, "prompt": after, "next_position": 1,
        "best_prompt": "", "best_score": best_score, "seconds": {},
    }))
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// A run: its configuration, evaluations and summary
// ---------------------------------------------------------------------------------------

/// What `config.json` records: enough to resume and to reproduce.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Every setting of the run.
    pub settings: OptimizeConfig,
    /// The prompt the search started from (the task's, or the settings').
    pub initial_prompt: String,
    /// The model file the run used.
    pub model_path: String,
    /// Its sha256: a resume refuses another file.
    pub model_sha256: String,
    /// The task as loaded.
    pub task: TaskRecord,
    /// The train, dev and test question indices.
    pub split: Split,
    /// The greater version that started the run.
    pub greater_version: String,
}

impl RunConfig {
    /// "method greater, model M (sha256 ...), task T (kind), split seed S: a train / b dev /
    /// c test questions"
    pub fn setup(&self) -> String {
        format!(
            "method {}, model {} (sha256 {}), task {} ({}), split seed {}: {} train / {} dev / {} test questions",
            self.settings.method.name(),
            self.model_path,
            &self.model_sha256[..12.min(self.model_sha256.len())],
            self.task.name,
            self.task.answer_kind,
            self.split.seed,
            self.split.train.len(),
            self.split.dev.len(),
            self.split.test.len()
        )
    }
}

/// An error when the split the task's data gives `now` is not the one `config` (a run's
/// configuration file) recorded: the data changed under a run, and its questions would not
/// be the ones its records are of.
pub fn same_split(recorded: &Split, now: &Split, config: &std::path::Path) -> Result<()> {
    if recorded != now {
        bail!(
            "the task's data changed since the run: the split differs from the one in {}",
            config.display()
        );
    }
    Ok(())
}

/// What a run records of its task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task name.
    pub name: String,
    /// The answer kind, as text ("integer", "multiple choice (A)-(E)", ...).
    pub answer_kind: String,
    /// The extractor sentence that asks for the final answer.
    pub extractor: String,
    /// Where the questions came from (file or generator).
    pub source: String,
    /// Questions in the task.
    pub examples: usize,
}

/// A prompt's accuracy on a split, without the per-question records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Which prompt.
    pub label: Label,
    /// Its text.
    pub prompt: String,
    /// Share of questions answered correctly.
    pub accuracy: f64,
    /// Questions answered correctly.
    pub correct: usize,
    /// Questions evaluated.
    pub n: usize,
    /// 95% Wilson interval of the accuracy.
    pub interval: (f64, f64),
    /// Wall seconds of the evaluation.
    pub seconds: f64,
    /// Reasonings that ran into the reasoning budget (None in run folders of versions that
    /// did not count them).
    #[serde(default)]
    pub cut_by_budget: Option<usize>,
    /// Answers the task's parser found nothing in (None in run folders of versions that did
    /// not count them).
    #[serde(default)]
    pub unparsed: Option<usize>,
}

/// Two prompts on the same questions, question by question: how many only the first got
/// right, how many only the second, and the exact two-sided McNemar p-value (the chance of a
/// split at least that uneven if neither prompt were the better one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Questions.
    pub n: usize,
    /// Questions only the first prompt got right.
    pub only_first: usize,
    /// Questions only the second prompt got right.
    pub only_second: usize,
    /// Exact two-sided McNemar p-value.
    pub p_value: f64,
}

impl Paired {
    /// "19 / 24 (p 0.54)".
    pub fn text(&self) -> String {
        format!("{} / {} (p {:.2})", self.only_first, self.only_second, self.p_value)
    }
}

/// What `summary.json` holds: the returned prompt and how it was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Steps the search ran.
    pub steps: usize,
    /// The returned prompt (also in best_prompt.txt).
    pub best_prompt: String,
    /// The contender it came from, and what chose it.
    pub selected: Label,
    /// Whether dev accuracy or the train score chose it.
    pub selected_by: SelectedBy,
    /// The lowest train score the search reached.
    pub best_train_score: f64,
    /// Tokens the search decoded (reasoning on train, `ape`'s proposals).
    #[serde(default)]
    pub generated_tokens: usize,
    /// `ape`'s budget in generated tokens.
    #[serde(default)]
    pub budget_tokens: Option<usize>,
    /// The test split's majority-class floor: what always giving the commonest answer scores.
    pub majority_floor: f64,
    /// Every prompt that could be returned: train score and dev accuracy.
    pub contenders: Vec<Contender>,
    /// Test accuracy of zero-shot CoT, the initial and the returned ("optimised") prompt.
    pub evaluations: Vec<EvalSummary>,
    /// The returned prompt against zero-shot CoT on test, question by question (None without
    /// test questions, and in run folders of versions without it).
    #[serde(default)]
    pub paired: Option<Paired>,
}

/// Decoding speed and reasoning length measured on the initial prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// Reasoning tokens decoded per second.
    pub tokens_per_second: f64,
    /// Mean reasoning length in tokens.
    pub mean_reasoning: f64,
}

/// A finished run's returned prompt and zero-shot CoT on another model (the paper's
/// transfer setting): the run's test questions, layout and reasoning budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// The other model.
    pub model: String,
    /// Zero-shot CoT on it.
    pub zero_shot_cot: EvalSummary,
    /// The run's returned prompt on it.
    pub optimised: EvalSummary,
    /// The returned prompt against zero-shot CoT on it, question by question (None in
    /// files written before it was kept).
    #[serde(default)]
    pub paired: Option<Paired>,
}

/// "42 s", "3 min 5 s", "2 h 10 min".
pub fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

// ---------------------------------------------------------------------------------------
// A protocol: one configuration over tasks
// ---------------------------------------------------------------------------------------

/// What `protocol-config.json` holds: the settings every run shares and the tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtocolConfig {
    /// Settings of every run (each task replaces `task`).
    pub settings: OptimizeConfig,
    /// The tasks, in the table's order.
    pub tasks: Vec<String>,
    /// A second model on which each task's returned prompt and zero-shot CoT are evaluated.
    #[serde(default)]
    pub transfer_to: Option<String>,
    /// The methods run on every task, the first filling the "optimised" column; empty: the
    /// settings' method alone.
    #[serde(default)]
    pub methods: Vec<Method>,
    /// The methods after the first run on the first this many tasks only (None: on every
    /// task), for baselines that a protocol cannot afford on all of them.
    #[serde(default)]
    pub baseline_tasks: Option<usize>,
}

impl ProtocolConfig {
    /// An error before any work when a task or method is named twice, a setting is unusable,
    /// or a task cannot be loaded and split as the settings ask.
    pub fn check(&self) -> Result<()> {
        self.settings.validate()?;
        if self.tasks.is_empty() {
            bail!("the protocol has no tasks");
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if self.tasks[..i].contains(t) {
                bail!("task {t} is listed twice: its questions would count twice in the pooled accuracy");
            }
        }
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].contains(m) {
                bail!("method {} is listed twice", m.name());
            }
        }
        match self.baseline_tasks {
            Some(_) if self.methods().len() < 2 => {
                bail!("baseline_tasks needs a second method to run (--methods greater,ape)")
            }
            Some(n) if n == 0 || n > self.tasks.len() => bail!(
                "baseline_tasks is {n}: it must be between 1 and the {} tasks",
                self.tasks.len()
            ),
            _ => {}
        }
        let s = &self.settings;
        for t in &self.tasks {
            let data = s.data_dir.as_ref().map(std::path::PathBuf::from);
            Task::load_split(t, data, s.seed, s.difficulty, (s.train, s.dev, s.test))
                .map_err(|e| anyhow::anyhow!("task {t}: {e}"))?;
        }
        Ok(())
    }

    /// "model M, a train / b dev / c test questions per task, n steps, split seed s,
    /// methods greater, ape (the others on the first 2 tasks)"
    pub fn setup(&self) -> String {
        let (s, methods) = (&self.settings, self.methods());
        let subset = self
            .baseline_tasks
            .map_or(String::new(), |n| format!(" (the others on the first {n} tasks)"));
        format!(
            "model {}, {} train / {} dev / {} test questions per task, {} steps, split seed {}, method{} {}{subset}",
            s.model,
            s.train,
            s.dev,
            s.test,
            s.steps,
            s.seed,
            if methods.len() > 1 { "s" } else { "" },
            methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
        )
    }

    /// The methods to run on every task, the first filling the "optimised" column.
    pub fn methods(&self) -> Vec<Method> {
        if self.methods.is_empty() {
            vec![self.settings.method]
        } else {
            self.methods.clone()
        }
    }

    /// Whether the method at `method_index` of [`Self::methods`] runs on the task at
    /// `task_index`: the first on every task, the others within `baseline_tasks`.
    pub fn runs(&self, method_index: usize, task_index: usize) -> bool {
        method_index == 0 || self.baseline_tasks.is_none_or(|n| task_index < n)
    }
}

/// Another method's result on a task (a baseline beside the first method).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodRow {
    /// The method.
    pub method: Method,
    /// Its returned prompt on test.
    pub optimised: EvalSummary,
    /// The returned prompt's dev accuracy (None without a dev split).
    pub dev_accuracy: Option<f64>,
    /// The contender it returned.
    pub selected: Label,
    /// Steps it ran.
    pub steps: usize,
    /// Tokens it decoded.
    pub generated_tokens: usize,
    /// Wall seconds of its run.
    pub wall_seconds: f64,
    /// The first method's returned prompt against this one's on test, question by question
    /// (None without question records).
    #[serde(default)]
    pub first_against: Option<Paired>,
}

/// A method's pooled test accuracy and its mean gain over zero-shot CoT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodPooled {
    /// The method.
    pub method: Method,
    /// Tasks of the table it has run on (0 in tables of versions that ran it on all).
    #[serde(default)]
    pub tasks: usize,
    /// Its returned prompts' accuracy pooled over those tasks.
    pub optimised: Pooled,
    /// Mean over those tasks of its gain over zero-shot CoT.
    pub mean_gain: f64,
    /// 95% interval of that mean (None with fewer than two tasks).
    pub gain_interval: Option<(f64, f64)>,
    /// Mean over those tasks of the first method's accuracy minus this one's, with its 95%
    /// interval (None in tables of versions without it).
    #[serde(default)]
    pub first_lead: Option<Difference>,
}

impl MethodPooled {
    /// Its mean gain over zero-shot CoT.
    pub fn gain(&self) -> Difference {
        Difference { mean: self.mean_gain, interval: self.gain_interval }
    }

    /// The tasks it ran on, when fewer than the table's `tasks` (None when it ran on all, or
    /// in tables of versions that did not count them).
    pub fn fewer_tasks(&self, tasks: usize) -> Option<usize> {
        (self.tasks > 0 && self.tasks < tasks).then_some(self.tasks)
    }
}

/// A mean over tasks of a per-task difference of accuracies, with a 95% normal interval
/// from the spread of the differences (None with fewer than two tasks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// The mean difference.
    pub mean: f64,
    /// Its 95% interval.
    pub interval: Option<(f64, f64)>,
}

/// One task's line of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task name.
    pub task: String,
    /// The test split's majority-class floor (None in tables of versions without it).
    #[serde(default)]
    pub majority_floor: Option<f64>,
    /// Zero-shot CoT on test.
    pub zero_shot_cot: EvalSummary,
    /// The initial prompt on test.
    pub initial: EvalSummary,
    /// The returned prompt on test.
    pub optimised: EvalSummary,
    /// Dev accuracy of the returned prompt (None without a dev split).
    pub dev_accuracy: Option<f64>,
    /// The contender returned.
    pub selected: Label,
    /// Steps the search ran.
    pub steps: usize,
    /// Wall seconds of the task's run (of a session cut short, the step or evaluation under
    /// way not counted).
    pub wall_seconds: f64,
    /// Tokens the search decoded.
    #[serde(default)]
    pub generated_tokens: usize,
    /// The other methods of the protocol, in its order.
    #[serde(default)]
    pub baselines: Vec<MethodRow>,
    /// The returned prompt and zero-shot CoT on the `transfer_to` model.
    #[serde(default)]
    pub transfer: Option<Transfer>,
    /// What the first method's step log says of its search.
    #[serde(default)]
    pub search: Option<SearchTrace>,
    /// The returned prompt against zero-shot CoT on test, question by question (None when
    /// the run folder holds no question records).
    #[serde(default)]
    pub paired: Option<Paired>,
}

impl TaskRow {
    /// `method`'s result on this task, if it has run here.
    pub fn baseline(&self, method: Method) -> Option<&MethodRow> {
        self.baselines.iter().find(|b| b.method == method)
    }
}

/// Where a search gained or lost, read from its step log: train mistakes, the steps that
/// helped and those that hurt, and whether the gradient ever ranked the current token high.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchTrace {
    /// Train questions.
    pub train_n: usize,
    /// Train mistakes of the prompt the search started from.
    pub start_mistakes: usize,
    /// The fewest train mistakes of any prompt it scored (or the start's).
    pub fewest_mistakes: usize,
    /// Steps that lowered the best train score.
    pub improving_steps: usize,
    /// Steps that moved to a prompt with a higher train score than the one they began with.
    pub worse_moves: usize,
    /// Steps whose checked shortlist held the current prompt.
    pub current_shortlisted: usize,
    /// Steps that kept the current prompt.
    pub current_kept: usize,
    /// Dev accuracy of the better of zero-shot CoT and the initial prompt.
    pub dev_baseline: Option<f64>,
    /// Dev reasonings of that better start cut at the budget (None in tables of versions
    /// without it).
    #[serde(default)]
    pub dev_baseline_cut: Option<usize>,
    /// Dev reasonings of the returned prompt cut at the budget: a search that gains on train
    /// by making the model write until the budget shows here.
    #[serde(default)]
    pub dev_returned_cut: Option<usize>,
    /// Median seconds of a step (the median, so that a step paused or cut by a session
    /// does not speak for the others; None in tables of versions without it).
    #[serde(default)]
    pub step_seconds: Option<f64>,
}

/// Accuracy pooled over every task's test questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pooled {
    /// Share of questions answered correctly.
    pub accuracy: f64,
    /// Questions answered correctly.
    pub correct: usize,
    /// Questions.
    pub n: usize,
    /// 95% Wilson interval.
    pub interval: (f64, f64),
}

/// What `protocol.json` holds: a row per finished task and the pooled results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtocolTable {
    /// One row per finished task, in the protocol's order.
    pub rows: Vec<TaskRow>,
    /// Zero-shot CoT, pooled.
    pub zero_shot_cot: Pooled,
    /// The initial prompt, pooled.
    pub initial: Pooled,
    /// The returned prompts, pooled.
    pub optimised: Pooled,
    /// Mean over tasks of (optimised - zero-shot CoT).
    pub mean_gain: f64,
    /// 95% normal interval of the mean gain from the per-task differences (None with fewer
    /// than two tasks).
    pub gain_interval: Option<(f64, f64)>,
    /// Pooled zero-shot CoT and returned-prompt accuracy on the transfer model.
    #[serde(default)]
    pub transfer: Option<(Pooled, Pooled)>,
    /// The other methods, pooled, in the protocol's order.
    #[serde(default)]
    pub baselines: Vec<MethodPooled>,
}

impl ProtocolTable {
    /// `method`'s pooled result, if it has run on any task.
    pub fn baseline(&self, method: Method) -> Option<&MethodPooled> {
        self.baselines.iter().find(|b| b.method == method)
    }

    /// The first method's mean gain over zero-shot CoT.
    pub fn gain(&self) -> Difference {
        Difference { mean: self.mean_gain, interval: self.gain_interval }
    }
}

// ---------------------------------------------------------------------------------------
// A screening: configurations on dev
// ---------------------------------------------------------------------------------------

/// What a screening runs: base settings, tasks, and named changes to the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenConfig {
    /// Settings every run starts from.
    pub base: OptimizeConfig,
    /// The tasks each configuration runs on.
    pub tasks: Vec<String>,
    /// (name, TOML text of the settings it changes), in the order they run.
    pub configurations: Vec<(String, String)>,
}

impl ScreenConfig {
    /// The configurations of a TOML file whose top-level tables each name one:
    /// `[budget-512]` then `max_reasoning = 512`.
    pub fn configurations_from_toml(text: &str, origin: &str) -> Result<Vec<(String, String)>> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
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

    /// The configurations of a TOML file: see [`Self::configurations_from_toml`].
    pub fn configurations_from_file(file: &std::path::Path) -> Result<Vec<(String, String)>> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        Self::configurations_from_toml(&text, &file.display().to_string())
    }

    /// The settings of configuration `name` on `task`: the base, its changes, the task, and
    /// no test questions.
    pub fn settings(&self, changes: &str, task: &str) -> Result<OptimizeConfig> {
        let mut s = self.base.with_toml(changes)?;
        s.task = task.to_string();
        s.test = Count::N(0);
        Ok(s)
    }

    /// Every configuration's settings valid, names usable as folder names, no repeats.
    pub fn check(&self) -> Result<()> {
        if self.base.dev == 0 {
            bail!("screening judges on dev: pass --dev N");
        }
        if self.tasks.is_empty() {
            bail!("a screening needs tasks to run its configurations on");
        }
        for (i, (name, changes)) in self.configurations.iter().enumerate() {
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                || name.starts_with('.')
            {
                bail!("configuration name {name:?}: use letters, digits, '-', '_' and '.'");
            }
            if self.configurations[..i].iter().any(|(n, _)| n == name) {
                bail!("configuration {name} is listed twice");
            }
            for task in &self.tasks {
                self.settings(changes, task)
                    .with_context(|| format!("configuration {name}"))?
                    .validate()?;
            }
        }
        Ok(())
    }
}

/// One (configuration, task): dev accuracies and what the search did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenRow {
    /// The configuration's name.
    pub configuration: String,
    /// The task.
    pub task: String,
    /// Dev questions.
    pub dev_n: usize,
    /// Zero-shot CoT's dev accuracy.
    pub zero_shot: f64,
    /// The initial prompt's dev accuracy.
    pub initial: f64,
    /// The best dev accuracy of a searched prompt (None: the search scored no prompt but
    /// the baselines).
    pub best_searched: Option<f64>,
    /// That prompt.
    pub best_prompt: Option<String>,
    /// best_searched - max(zero_shot, initial).
    pub gain: Option<f64>,
    /// Train mistakes of the initial prompt.
    pub train_mistakes_initial: usize,
    /// The fewest train mistakes of the run's contenders (the two starts and the searched
    /// prompts with the best train scores).
    pub train_mistakes_best: usize,
    /// Steps the search ran.
    pub steps: usize,
    /// Dev reasonings cut at the reasoning budget, over every prompt measured on dev.
    pub dev_cut: usize,
    /// Seconds of the search's steps.
    pub search_seconds: f64,
    /// The earlier configuration whose run this row reuses, because this one's search would
    /// have repeated it step for step.
    #[serde(default)]
    pub same_search_as: Option<String>,
}

/// The rows and, per configuration, the mean gain over its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenTable {
    /// One per (configuration, task), in the order they ran.
    pub rows: Vec<ScreenRow>,
}

impl ScreenTable {
    /// The mean gain of `configuration` over its tasks where it searched any prompt.
    pub fn mean_gain(&self, configuration: &str) -> Option<f64> {
        let gains: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.configuration == configuration)
            .filter_map(|r| r.gain)
            .collect();
        crate::stats::mean(&gains)
    }
}

/// Writes `bytes` to `tmp` and renames it onto `path`, so that a reader sees the earlier file
/// or the new one whole, never a mix or an empty file. The caller names the temporary: it
/// must sit beside `path` (a rename does not cross file systems) and be its own writer's.
pub fn write_atomic(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let written = File::create(tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    fs::rename(tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
