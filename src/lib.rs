//! greater: prompt optimisation for local language models with gradients over reasoning.
//!
//! Pipeline: [`model`] (weights, forward, generation, gradients) and [`tokenizer`]
//! (tokens, chat template) are joined in [`runtime`], which the CLI drives.

pub mod model;
pub mod runtime;
pub mod tokenizer;
