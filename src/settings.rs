//! Settings of an optimisation run: flags, a TOML file (`--config run.toml`, same keys).
//! The defaults are the reference implementation's shipped settings
//! (`../shared/docs/greater-method.md`), except where a setting says otherwise.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::runtime::OpenOptions;
use crate::tasks::{Count, Split, Task};

use crate::layout::REFERENCE_CONNECTOR;
use crate::model::Precision;
use crate::tasks::ExtractorOptions;
use crate::tokenizer::SystemTurn;

/// How the prompt is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
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
    /// APE's rounds on half of the token budget, then GReaTer's token search from APE's
    /// best instruction by train score on the rest: one budget for both stages.
    #[value(name = "ape+greater", alias = "ape_greater")]
    ApeGreater,
}

impl Method {
    /// The method's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Greater => "greater",
            Method::Ape => "ape",
            Method::Gcg => "gcg",
            Method::ApeGreater => "ape+greater",
        }
    }

    /// Whether the method spends a token budget (APE's rounds) rather than a step count.
    pub fn spends_a_budget(self) -> bool {
        matches!(self, Method::Ape | Method::ApeGreater)
    }
}

/// Which tokens may stand in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Vocabulary {
    /// The reference's: text of ASCII letters and spaces only, or exactly `.`, `,` or a space.
    Reference,
    /// Any printable ASCII text that is not only spaces (digits, punctuation).
    Ascii,
}

/// How the per-example gradients are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum GradientSum {
    /// The reference's: the raw sum (examples with a larger gradient weigh more).
    Raw,
    /// Each example's gradient scaled to unit norm first.
    #[value(alias = "per-example")]
    PerExample,
}

/// The token appended when the prompt grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Filler {
    /// The reference's: the token for `_`.
    Underscore,
    /// The admissible token most train examples rank first there.
    Likely,
}

/// Which prompt a step moves to. Spelled `always`, `not_worse` (or `not-worse`) and
/// `margin:N` in flags and files alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The reference's: the best checked token, even when it is worse than the current one.
    Always,
    /// The best checked token only when its score is not worse than the current prompt's.
    NotWorse,
    /// The best checked token among those that make at least this many fewer mistakes than
    /// the current prompt on the step's questions; none otherwise (`margin:0` is
    /// `not_worse`): a step cannot walk into a prompt that saves nothing real.
    Margin(usize),
}

impl std::str::FromStr for Accept {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let margin = |n: &str| {
            n.parse()
                .map_err(|_| format!("accept margin:{n}: N must be a whole number of mistakes"))
        };
        match s {
            "always" => Ok(Accept::Always),
            "not_worse" | "not-worse" => Ok(Accept::NotWorse),
            _ => match s.strip_prefix("margin:") {
                Some("0") => Ok(Accept::NotWorse),
                Some(n) => margin(n).map(Accept::Margin),
                None => Err(format!(
                    "accept {s:?} is not one of always, not_worse, margin:N (N mistakes saved)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accept::Always => f.write_str("always"),
            Accept::NotWorse => f.write_str("not_worse"),
            Accept::Margin(n) => write!(f, "margin:{n}"),
        }
    }
}

impl Serialize for Accept {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Accept {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Every setting of a run, declared once: the flags of `optimize`, `protocol`, `screen` and
/// (the model, task and evaluation groups) `eval`, the keys of a TOML settings file, and
/// `config.json`'s record. The defaults are [`OptimizeConfig::default`]'s; clap shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizeConfig {
    /// Alias (see `greater models`), GGUF file or Hugging Face model folder.
    #[arg(long, short = 'm', help_heading = MODEL)]
    pub model: String,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, help_heading = MODEL)]
    pub chat_template: Option<String>,
    /// Arithmetic of decoding, prefill and scoring: f32, mixed (integer dot products with
    /// 8-bit inputs, llama.cpp's; bf16 gradient products where the CPU has them) or mixed16
    /// (the same with 16-bit inputs: within rounding of f32). A run folder from before this
    /// setting resumes in the f32 it ran with.
    #[arg(long, value_enum, help_heading = MODEL)]
    #[serde(default = "Precision::before_setting")]
    pub precision: Precision,

    /// Built-in task (see `greater tasks`), a .toml task file, or a BBH-format .json file.
    #[arg(long, short = 't', help_heading = TASK)]
    pub task: String,
    /// Folder holding bbh/, gsm8k/ and folio/ for the benchmark tasks.
    #[arg(long, env = "GREATER_DATA", help_heading = TASK)]
    pub data_dir: Option<String>,
    /// Seed of the split, of generated questions and of the search's random draws.
    #[arg(long, short = 's', help_heading = TASK)]
    pub seed: u64,
    /// Operators per question of a generated task.
    #[arg(long, help_heading = TASK)]
    pub difficulty: usize,
    /// Questions the search optimises on.
    #[arg(long, help_heading = TASK)]
    pub train: usize,
    /// Questions that choose the returned prompt (0: the train score chooses).
    #[arg(long, help_heading = TASK)]
    pub dev: usize,
    /// Held-out questions the returned prompt and the baselines are measured on, or `rest`:
    /// every question not in train or dev.
    #[arg(long, help_heading = TASK)]
    pub test: Count,
    /// Letters a BBH multiple-choice extractor lists: data (as many as the data's options)
    /// or reference (the reference script's fixed list per task).
    #[arg(long, value_enum, help_heading = TASK)]
    #[serde(default)]
    pub extractor_options: ExtractorOptions,

    /// Text between the question and the prompt (reference: ". Use").
    #[arg(long, help_heading = LAYOUT)]
    pub connector: String,
    /// The system turn: none (the reference's), template (the chat template's default) or a
    /// text. A run folder from before this setting resumes with the template's.
    #[arg(long, help_heading = LAYOUT)]
    #[serde(default = "SystemTurn::default")]
    pub system: SystemTurn,
    /// Token budget of each reasoning (reference: 1024).
    #[arg(long, help_heading = LAYOUT)]
    pub max_reasoning: usize,
    /// Questions decoded together when evaluating.
    #[arg(long, help_heading = LAYOUT)]
    pub eval_batch: usize,

    /// greater, or a baseline: ape (instructions the model writes from train examples, at
    /// equal generated tokens) or gcg (the token search with no reasoning before the answer).
    #[arg(long, value_enum, help_heading = SEARCH)]
    pub method: Method,
    /// Steps of the search (one prompt position each).
    #[arg(long, help_heading = SEARCH)]
    pub steps: usize,
    /// Stop after this many steps without a better train score (0: never).
    #[arg(long, help_heading = SEARCH)]
    pub patience: usize,
    /// Stop after this many checks of the best prompt on the stopping dev questions without
    /// a gain (0: never). Those questions are set aside from dev (`stop_dev`): the rest
    /// choose the returned prompt.
    #[arg(long, help_heading = SEARCH)]
    #[serde(default)]
    pub dev_patience: usize,
    /// Steps between two dev checks of `dev_patience`.
    #[arg(long, help_heading = SEARCH)]
    #[serde(default = "default_dev_every")]
    pub dev_every: usize,
    /// Dev questions set aside for `dev_patience`'s checks, the first of the dev split
    /// [default: half of it; a run's config.json records the count it used].
    #[arg(long, help_heading = SEARCH)]
    #[serde(default)]
    pub stop_dev: Option<usize>,
    /// The prompt the search starts from [default: the task's, the paper's unless a task
    /// file sets one].
    #[arg(long, help_heading = SEARCH)]
    pub initial_prompt: Option<String>,
    /// Start from the initial prompt, or from the better of it and zero-shot CoT on train
    /// (reference: initial).
    #[arg(long, value_enum, help_heading = SEARCH)]
    pub start: StartFrom,
    /// Each example's top-k tokens at the position (reference: 40).
    #[arg(long, help_heading = SEARCH)]
    pub top_k: usize,
    /// Random example subsets whose top-k sets are intersected (reference: 6).
    #[arg(long, help_heading = SEARCH)]
    pub top_q: usize,
    /// Examples per subset (reference: 5).
    #[arg(long, help_heading = SEARCH)]
    pub subset_size: usize,
    /// Candidates checked for real per step (reference: 3).
    #[arg(long, help_heading = SEARCH)]
    pub shortlist: usize,
    /// Temperature of the answer loss (reference: 0.2).
    #[arg(long, help_heading = SEARCH)]
    pub temperature: f64,
    /// Weight of the prompt's fluency (NLL) in the loss and the score (reference: 0.2).
    #[arg(long, help_heading = SEARCH)]
    pub control_weight: f64,
    /// The current token is a candidate that may be shortlisted and kept (reference: true).
    #[arg(long, action = clap::ArgAction::Set, help_heading = SEARCH)]
    pub keep_current: bool,
    /// A shortlisted token with a `.` in the second half of the prompt is taken at once
    /// (reference: true).
    #[arg(long, action = clap::ArgAction::Set, help_heading = SEARCH)]
    pub sentence_end_rule: bool,
    /// The token appended when the prompt grows (reference: underscore).
    #[arg(long, value_enum, help_heading = SEARCH)]
    pub filler: Filler,
    /// How the per-example gradients combine (reference: raw).
    #[arg(long, value_enum, help_heading = SEARCH)]
    pub gradient_sum: GradientSum,
    /// Tokens allowed in the prompt (reference: reference).
    #[arg(long, value_enum, help_heading = SEARCH)]
    pub vocabulary: Vocabulary,
    /// Which checked token a step moves to: always, not_worse (than the current prompt's
    /// score) or margin:N (at least N fewer mistakes on the step's questions) (reference:
    /// always).
    #[arg(long, help_heading = SEARCH)]
    pub accept: Accept,
    /// Prompts with the best train scores rescored on the dev split; the returned prompt is
    /// the best on dev among them, the initial prompt and zero-shot CoT.
    #[arg(long, help_heading = SEARCH)]
    pub dev_candidates: usize,
    /// Weight of the gold answer's NLL in the real score: separates prompts with the same
    /// mistake count (reference: 0).
    #[arg(long, help_heading = SEARCH)]
    pub answer_weight: f64,
    /// A train reasoning cut at the budget counts as a mistake in the real score, whatever
    /// its forced answer: a search cannot gain by making the model run into the budget
    /// (reference: false).
    #[arg(long, action = clap::ArgAction::Set, help_heading = SEARCH)]
    #[serde(default)]
    pub cut_is_mistake: bool,
    /// A step whose chosen prompt scores below this goes back to position 0 (reference:
    /// 0.12; 0: never).
    #[arg(long, help_heading = SEARCH)]
    pub restart_below: f64,
    /// Check the shortlist question batch by question batch, and stop a candidate's check
    /// once it cannot be chosen even if every remaining answer were right: the same choice
    /// as the full check at less decoding (reference: false).
    #[arg(long, action = clap::ArgAction::Set, help_heading = SEARCH)]
    #[serde(default)]
    pub race: bool,
    /// Train questions each step's gradient and checks use, drawn afresh each step from the
    /// train split (the pool) with the run's seed; the running best is re-scored on the
    /// same questions so the step compares like with like [default: the whole train split
    /// every step, the reference's].
    #[arg(long, help_heading = SEARCH)]
    #[serde(default)]
    pub train_batch: Option<usize>,
    /// Tokens `ape` may decode (its proposals and their train reasoning) [default: what a
    /// GReaTer run of `steps` steps decodes, estimated from the initial prompt's reasoning;
    /// a protocol passes the task's real GReaTer count].
    #[arg(long, help_heading = SEARCH)]
    pub budget_tokens: Option<usize>,
}

/// The most operators a generated question holds: deeper ones outgrow every model's context.
pub const MAX_DIFFICULTY: usize = 32;

/// The most questions a split's part may ask for (a generated task makes as many as asked).
pub const MAX_QUESTIONS: u64 = 100_000;

fn default_dev_every() -> usize {
    5
}

/// Help headings, which are also the groups a subcommand takes (`eval` takes no search
/// setting).
pub const MODEL: &str = "Model";
/// Heading of the task and split settings.
pub const TASK: &str = "Task and split";
/// Heading of the prompt layout and reasoning settings.
pub const LAYOUT: &str = "Prompt layout and reasoning";
/// Heading of the search settings.
pub const SEARCH: &str = "Search";

/// Where the search starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum StartFrom {
    /// The initial prompt (the reference).
    Initial,
    /// The initial prompt or zero-shot CoT, whichever scores better on train.
    Better,
}

/// How big a run is: its question counts, steps and reasoning budget, named (in the spirit
/// of DSPy's `auto=light|medium|heavy`). Applied after `--preset`, before a config file and
/// flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Size {
    /// The built-in demo's: 20 train / 40 dev / 50 test, 12 steps, 64 reasoning tokens
    /// (generated one-operator arithmetic, the questions short).
    Demo,
    /// The default: 20 train / 50 dev / 100 test, 10 steps, 512 reasoning tokens (chosen on
    /// dev over 256 by the screening in `experiments/screen-qwen`); about an hour to three
    /// hours a BBH task for Qwen 0.5B on two cores.
    Light,
    /// 30 train / 100 dev / 100 test, 30 steps, 512 reasoning tokens.
    Medium,
    /// The paper's: 50 train / 100 dev / 100 test, 100 steps, 1024 reasoning tokens.
    Paper,
}

impl Size {
    /// (train, dev, test, steps, max_reasoning)
    pub fn counts(self) -> (usize, usize, Count, usize, usize) {
        match self {
            Size::Demo => (20, 40, Count::N(50), 12, 64),
            Size::Light => (20, 50, Count::N(100), 10, 512),
            Size::Medium => (30, 100, Count::N(100), 30, 512),
            Size::Paper => (50, 100, Count::N(100), 100, 1024),
        }
    }

    /// `settings` with this size's counts.
    pub fn apply(self, settings: OptimizeConfig) -> OptimizeConfig {
        let (train, dev, test, steps, max_reasoning) = self.counts();
        OptimizeConfig { train, dev, test, steps, max_reasoning, ..settings }
    }
}

/// A named starting point for the settings, before a config file and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Every method setting at the reference implementation's value.
    Reference,
}

impl Default for OptimizeConfig {
    /// The reference's method settings, except where the search starts (the better of the
    /// initial prompt and zero-shot CoT on train, chosen on dev by the screening in
    /// `experiments/screen-qwen`), the extractor's option letters (the data's) and the
    /// arithmetic (`mixed16`: f32's answers and gradient shortlists within rounding, faster;
    /// `cargo bench --bench parity`), at [`Size::Light`] (with a dev split, which the
    /// reference has not).
    fn default() -> Self {
        let method = OptimizeConfig {
            start: StartFrom::Better,
            extractor_options: ExtractorOptions::Data,
            precision: Precision::Mixed16,
            ..Self::reference()
        };
        Size::Light.apply(method)
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
            test: Count::N(100),
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
            cut_is_mistake: false,
            restart_below: 0.12,
            start: StartFrom::Initial,
            method: Method::Greater,
            budget_tokens: None,
            train_batch: None,
            race: false,
            dev_patience: 0,
            dev_every: default_dev_every(),
            stop_dev: None,
            precision: Precision::F32,
        }
    }

    /// Each count setting with the range it must lie in (both ends included; an optional
    /// one when given). The upper ends keep one step's work and memory bounded, far above
    /// any useful value; the model's context caps `max_reasoning` further once it is open
    /// (see [`crate::layout::Layout::check_room`]). `--help` shows them.
    pub fn count_ranges(&self) -> [(&'static str, Option<u64>, u64, u64); 19] {
        let n = |v: usize| Some(v as u64);
        let test = match self.test {
            Count::N(n) => Some(n as u64),
            Count::Rest => None,
        };
        [
            ("seed", Some(self.seed), 0, i64::MAX as u64),
            ("difficulty", n(self.difficulty), 1, MAX_DIFFICULTY as u64),
            ("train", n(self.train), 0, MAX_QUESTIONS),
            ("dev", n(self.dev), 0, MAX_QUESTIONS),
            ("test", test, 0, MAX_QUESTIONS),
            ("max_reasoning", n(self.max_reasoning), 1, 1 << 15),
            ("eval_batch", n(self.eval_batch), 1, 1024),
            ("steps", n(self.steps), 0, 1_000_000),
            ("patience", n(self.patience), 0, 1_000_000),
            ("dev_patience", n(self.dev_patience), 0, 1_000_000),
            ("dev_every", n(self.dev_every), 1, 1_000_000),
            ("top_k", n(self.top_k), 1, 1 << 20),
            ("top_q", n(self.top_q), 1, 1000),
            ("subset_size", n(self.subset_size), 1, 1000),
            ("shortlist", n(self.shortlist), 1, 1000),
            ("dev_candidates", n(self.dev_candidates), 1, 1000),
            ("stop_dev", self.stop_dev.map(|v| v as u64), 1, MAX_QUESTIONS),
            ("train_batch", self.train_batch.map(|v| v as u64), 1, MAX_QUESTIONS),
            ("budget_tokens", self.budget_tokens.map(|v| v as u64), 1, 1 << 40),
        ]
    }

    /// An error naming the first setting that no run can use: counts outside their range
    /// ([`Self::count_ranges`]), weights that must be finite and not negative, a temperature
    /// that must be positive.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, value, low, high) in self.count_ranges() {
            match value {
                Some(v) if v < low || v > high => {
                    anyhow::bail!("setting {name} must be from {low} to {high}, not {v}")
                }
                _ => {}
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            anyhow::bail!(
                "setting temperature must be a finite number above 0, not {}",
                self.temperature
            );
        }
        let weights = [
            ("control_weight", self.control_weight),
            ("answer_weight", self.answer_weight),
            ("restart_below", self.restart_below),
        ];
        if let Some((name, v)) = weights.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            anyhow::bail!("setting {name} must be a finite number, 0 or more, not {v}");
        }
        if self.train_batch.is_some() && self.method == Method::Ape {
            anyhow::bail!(
                "setting train_batch applies to the token searches (greater, gcg), not to ape"
            );
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

    /// The one place where settings are layered: `self` (the defaults, a preset or the
    /// demo), then the keys of a TOML file (`(text, its name for errors)`), then the flags
    /// that were given on the command line (`given(key)`) with their values in `flags`.
    ///
    /// ```
    /// use greater::settings::OptimizeConfig;
    ///
    /// let flags = OptimizeConfig { top_k: 20, ..OptimizeConfig::default() };
    /// let file = "top_k = 11\nshortlist = 5\n";
    /// // --top-k typed on the command line beats the file; shortlist comes from the file.
    /// let s = OptimizeConfig::reference().layered(Some((file, "run.toml")), &flags, &|key| key == "top_k")?;
    /// assert_eq!((s.top_k, s.shortlist, s.train), (20, 5, 50));
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn layered(
        &self,
        file: Option<(&str, &str)>,
        flags: &Self,
        given: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<Self> {
        let base = match file {
            Some((text, origin)) => {
                self.with_toml(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?
            }
            None => self.clone(),
        };
        if given("seed") {
            // Before the layering, which goes through TOML: it holds no integer above i64's.
            OptimizeConfig { seed: flags.seed, ..Self::default() }.validate()?;
        }
        let mut table = toml::Table::try_from(&base)?;
        for (key, value) in toml::Table::try_from(flags)? {
            if given(&key) {
                table.insert(key, value);
            }
        }
        let mut layered: Self = table.try_into()?;
        if given("data_dir") {
            layered.data_dir = layered.data_dir.map(|d| absolute(&d));
        }
        layered.validate()?;
        Ok(layered)
    }

    /// The task and its split as these settings ask.
    pub fn load_task(&self) -> Result<(Task, Split)> {
        let sizes = (self.train, self.dev, self.test);
        let data = self.data_dir.as_ref().map(PathBuf::from);
        let (task, split) = Task::load_split(&self.task, data, self.seed, self.difficulty, sizes)?;
        Ok((task.with_extractor_options(self.extractor_options), split))
    }

    /// `dev` (the split's dev indices) as the questions that decide `dev_patience`'s stop
    /// and the ones that choose the returned prompt: disjoint, stopping ones first.
    pub fn dev_parts<'d>(&self, dev: &'d [usize]) -> (&'d [usize], &'d [usize]) {
        let stop = if self.dev_patience > 0 { self.stop_dev.unwrap_or(0) } else { 0 };
        dev.split_at(stop.min(dev.len()))
    }

    /// With `dev_patience`, `stop_dev` resolved to a count for `n_dev` dev questions (half
    /// by default), leaving some to choose the returned prompt.
    pub fn resolve_stop_dev(&mut self, n_dev: usize) -> anyhow::Result<()> {
        if self.dev_patience == 0 {
            return Ok(());
        }
        let stop = self.stop_dev.unwrap_or(n_dev / 2);
        if stop == 0 || stop >= n_dev {
            anyhow::bail!(
                "dev_patience needs dev questions of its own and others to choose the returned prompt: stop_dev {stop} of {n_dev} dev questions (pass --dev N with N >= 2, and --stop-dev below N)"
            );
        }
        self.stop_dev = Some(stop);
        Ok(())
    }

    /// How the model is opened.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            chat_template: self.chat_template.as_ref().map(PathBuf::from),
            precision: self.precision,
        }
    }

    /// The keys of every setting, in declaration order.
    pub fn keys() -> Vec<String> {
        <Self as clap::Args>::augment_args(clap::Command::new("settings"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    }

    /// `command`'s setting flags (it flattens these settings) with [`Self::default`]'s values
    /// as their defaults, so that `--help` shows them and an omitted flag parses.
    pub fn with_defaults(command: clap::Command) -> clap::Command {
        let defaults =
            toml::Table::try_from(Self::default()).expect("settings serialise to a table");
        let ranges = Self::default().count_ranges();
        command.mut_args(|arg| {
            let id = arg.get_id().to_string();
            let arg = match ranges.iter().find(|r| r.0 == id) {
                Some((_, _, low, high)) => {
                    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                    arg.help(format!("{help} [range: {low} to {high}]"))
                }
                None => arg,
            };
            match defaults.get(id.as_str()) {
                Some(toml::Value::String(text)) => arg.default_value(text.clone()).required(false),
                Some(value) => arg.default_value(value.to_string()).required(false),
                None => arg,
            }
        })
    }

    /// The built-in demo: SmolLM2 on generated one-operator arithmetic at [`Size::Demo`]
    /// (the smallest of the settings tried whose gain held on split seeds 0, 1 and 2), with
    /// the template's system turn from the initial prompt: on this model and task, the
    /// screened defaults found no searched prompt better on dev (RESULTS.md, "The demo").
    pub fn demo() -> Self {
        Size::Demo.apply(OptimizeConfig {
            difficulty: 1,
            eval_batch: 50,
            system: SystemTurn::Template,
            start: StartFrom::Initial,
            ..Self::default()
        })
    }
}

/// A data folder as an absolute path, so that `--resume` works from any folder.
fn absolute(dir: &str) -> String {
    std::path::Path::new(dir)
        .canonicalize()
        .map_or_else(|_| dir.to_string(), |p| p.display().to_string())
}
