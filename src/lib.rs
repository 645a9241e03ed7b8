//! greater: prompt optimisation for local language models with gradients over reasoning.
//!
//! Pipeline: [`model`] (weights, forward, generation, gradients) and [`tokenizer`]
//! (tokens, chat template) are joined in [`runtime`]; [`tasks`] holds questions, gold
//! answers and answer parsing; [`layout`] builds every sequence from them; [`eval`]
//! measures a prompt; [`optimize`] is the GReaTer method, and [`store`] its run folder;
//! [`protocol`] runs it over a list of tasks. The CLI only wires them.

pub mod catalog;
pub mod eval;
pub mod layout;
pub mod model;
pub mod optimize;
pub mod protocol;
pub mod records;
pub mod report;
pub mod runtime;
pub mod screen;
pub mod settings;
pub mod store;
pub mod tasks;
pub mod tokenizer;
