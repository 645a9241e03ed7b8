//! Settings of an optimisation run: flags, a TOML file (`--config run.toml`, same keys),
//! and the reference implementation's defaults.

use serde::{Deserialize, Serialize};

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
}

impl Default for OptimizeConfig {
    fn default() -> Self {
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
            top_k: 11,
            top_q: 6,
            subset_size: 5,
            shortlist: 3,
            temperature: 0.2,
            control_weight: 0.2,
            initial_prompt: None,
            max_reasoning: 256,
            eval_batch: 32,
            chat_template: None,
        }
    }
}

impl OptimizeConfig {
    /// The built-in demo: SmolLM2 on generated arithmetic, a few steps on a few examples.
    pub fn demo() -> Self {
        OptimizeConfig { train: 8, test: 30, steps: 4, max_reasoning: 96, ..Self::default() }
    }

}
