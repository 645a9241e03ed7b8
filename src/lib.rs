//! greater: prompt optimisation for local language models with gradients over reasoning.
//!
//! Pipeline: [`model`] (weights, forward, generation, gradients) and [`tokenizer`]
//! (tokens, chat template) are joined in [`runtime`]; [`tasks`] holds questions, gold
//! answers and answer parsing; [`eval`] measures a prompt. The CLI only wires them.

pub mod eval;
pub mod model;
pub mod runtime;
pub mod tasks;
pub mod tokenizer;
