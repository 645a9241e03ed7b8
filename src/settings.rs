//! Settings of an optimisation run: flags, a TOML file (`--config run.toml`, same keys).
//! The defaults are the reference implementation's shipped settings
//! (`../shared/docs/greater-method.md`), except where a setting says otherwise.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::layout::REFERENCE_CONNECTOR;
use crate::model::Precision;
use crate::tasks::ExtractorOptions;
use crate::tokenizer::SystemTurn;

/// How the prompt is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// GReaTer: token search ranked by the gradient of the answer loss through the
    /// model's own reasoning.
    #[default]
    Greater,
    /// APE-style baseline: the model writes instructions from a few train questions and
    /// their answers; each is scored on train, until the token budget is spent.
    Ape,
    /// GCG-style ablation: the same token search, the answer right after the question and
    /// prompt, no reasoning in the loss or the train score.
    Gcg,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Greater => "greater",
            Method::Ape => "ape",
            Method::Gcg => "gcg",
        }
    }
}

/// Which tokens may stand in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Vocabulary {
    /// The reference's: text of ASCII letters and spaces only, or exactly `.`, `,` or a space.
    Reference,
    /// Any printable ASCII text that is not only spaces (digits, punctuation).
    Ascii,
}

/// How the per-example gradients are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GradientSum {
    /// The reference's: the raw sum (examples with a larger gradient weigh more).
    Raw,
    /// Each example's gradient scaled to unit norm first.
    PerExample,
}

/// The token appended when the prompt grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Filler {
    /// The reference's: the token for `_`.
    Underscore,
    /// The admissible token most train examples rank first there.
    Likely,
}

/// Which prompt a step moves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Accept {
    /// The reference's: the best checked token, even when it is worse than the current one.
    Always,
    /// The best checked token only when its score is not worse than the current prompt's.
    NotWorse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizeConfig {
    pub model: String,
    pub task: String,
    pub data_dir: Option<String>,
    pub seed: u64,
    /// Operators per question of a generated task.
    pub difficulty: usize,
    pub train: usize,
    pub dev: usize,
    pub test: usize,
    pub steps: usize,
    /// Stop after this many steps without a better score (0: never).
    pub patience: usize,
    pub top_k: usize,
    pub top_q: usize,
    pub subset_size: usize,
    pub shortlist: usize,
    pub temperature: f64,
    pub control_weight: f64,
    /// None: the task's initial prompt (the paper's unless a task file sets one).
    pub initial_prompt: Option<String>,
    /// Token budget of each reasoning.
    pub max_reasoning: usize,
    /// Questions decoded together when evaluating.
    pub eval_batch: usize,
    pub chat_template: Option<String>,
    /// Text between the question and the prompt (reference: ". Use").
    pub connector: String,
    /// The system turn: `none` (the reference's), `template` (the chat template's default)
    /// or a text. A run folder from before this setting resumes with the template's.
    #[serde(default = "SystemTurn::default")]
    pub system: SystemTurn,
    /// Letters a BBH multiple-choice extractor lists: `data` (as many as the data's options)
    /// or `reference` (the reference script's fixed list per task).
    #[serde(default)]
    pub extractor_options: ExtractorOptions,
    /// The current token is a candidate that may be shortlisted and kept (reference: true).
    pub keep_current: bool,
    /// A shortlisted token with a `.` in the second half of the prompt is taken at once
    /// (reference: true).
    pub sentence_end_rule: bool,
    pub filler: Filler,
    pub gradient_sum: GradientSum,
    pub vocabulary: Vocabulary,
    pub accept: Accept,
    /// Prompts with the best train scores rescored on the dev split; the returned prompt is
    /// the best on dev among them, the initial prompt and zero-shot CoT.
    pub dev_candidates: usize,
    /// Weight of the gold answer's NLL in the real score: separates prompts with the same
    /// mistake count (reference: 0).
    pub answer_weight: f64,
    /// A step whose chosen prompt scores below this goes back to position 0 (reference:
    /// 0.12; 0: never).
    pub restart_below: f64,
    /// Start from the initial prompt, or from the better of it and zero-shot CoT on train
    /// (reference: initial).
    pub start: StartFrom,
    pub method: Method,
    /// Tokens `ape` may decode (its proposals and their train reasoning). None: what a
    /// GReaTer run of `steps` steps decodes, estimated from the initial prompt's reasoning
    /// (a protocol passes the task's real GReaTer count).
    pub budget_tokens: Option<usize>,
    /// Arithmetic of decoding, prefill and scoring (the gradient pass stays in f32). A run
    /// folder from before this setting resumes in the f32 it ran with.
    #[serde(default = "Precision::before_setting")]
    pub precision: Precision,
}

/// Where the search starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    Initial,
    /// The initial prompt or zero-shot CoT, whichever scores better on train.
    Better,
}

/// A named starting point for the settings, before a config file and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Every method setting at the reference implementation's value.
    Reference,
}

impl Default for OptimizeConfig {
    /// The reference's settings, except the system turn (the chat template's) and the
    /// extractor's option letters (the data's).
    fn default() -> Self {
        OptimizeConfig { system: SystemTurn::Template, extractor_options: ExtractorOptions::Data, ..Self::reference() }
    }
}

impl OptimizeConfig {
    /// Every method setting at the reference implementation's value (`--preset reference`),
    /// so that its configuration stays one flag away whatever the defaults are.
    pub fn reference() -> Self {
        OptimizeConfig {
            model: "smollm2-135m".into(),
            task: "arithmetic".into(),
            data_dir: None,
            seed: 0,
            difficulty: 2,
            train: 50,
            dev: 0,
            test: 100,
            steps: 100,
            patience: 0,
            top_k: 40,
            top_q: 6,
            subset_size: 5,
            shortlist: 3,
            temperature: 0.2,
            control_weight: 0.2,
            initial_prompt: None,
            max_reasoning: 1024,
            eval_batch: 32,
            chat_template: None,
            connector: REFERENCE_CONNECTOR.into(),
            system: SystemTurn::None,
            extractor_options: ExtractorOptions::Reference,
            keep_current: true,
            sentence_end_rule: true,
            filler: Filler::Underscore,
            gradient_sum: GradientSum::Raw,
            vocabulary: Vocabulary::Reference,
            accept: Accept::Always,
            dev_candidates: 4,
            answer_weight: 0.0,
            restart_below: 0.12,
            start: StartFrom::Initial,
            method: Method::Greater,
            budget_tokens: None,
            precision: Precision::F32,
        }
    }

    /// An error naming the first setting that no run can use: counts that must be at least 1,
    /// weights that must be finite and not negative, a temperature that must be positive.
    pub fn validate(&self) -> anyhow::Result<()> {
        let counts = [
            ("top_k", self.top_k),
            ("top_q", self.top_q),
            ("subset_size", self.subset_size),
            ("shortlist", self.shortlist),
            ("max_reasoning", self.max_reasoning),
            ("eval_batch", self.eval_batch),
            ("dev_candidates", self.dev_candidates),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, v)| *v == 0) {
            anyhow::bail!("setting {name} must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            anyhow::bail!("setting temperature must be a finite number above 0, not {}", self.temperature);
        }
        let weights = [("control_weight", self.control_weight), ("answer_weight", self.answer_weight), ("restart_below", self.restart_below)];
        if let Some((name, v)) = weights.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            anyhow::bail!("setting {name} must be a finite number, 0 or more, not {v}");
        }
        Ok(())
    }

    /// `text` (a TOML file's) over `self`: the keys it sets, `self`'s values for the rest.
    pub fn with_toml(&self, text: &str) -> Result<Self, toml::de::Error> {
        // Parsed alone first, for errors that name the file's line.
        toml::from_str::<OptimizeConfig>(text)?;
        let mut table = toml::Table::try_from(self).expect("settings serialise to a table");
        table.extend(toml::from_str::<toml::Table>(text)?);
        table.try_into()
    }

    /// The built-in demo: SmolLM2 on generated one-operator arithmetic, twelve steps on 20
    /// examples, the returned prompt chosen on 40 dev questions and measured on 50 test ones
    /// (the smallest of the settings tried whose gain held on split seeds 0, 1 and 2).
    pub fn demo() -> Self {
        OptimizeConfig {
            difficulty: 1,
            train: 20,
            dev: 40,
            test: 50,
            steps: 12,
            max_reasoning: 64,
            eval_batch: 50,
            ..Self::default()
        }
    }
}
