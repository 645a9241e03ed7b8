#![warn(missing_docs)]
//! greater: prompt optimisation for local language models with gradients over reasoning.
//!
//! Pipeline: [`model`] (weights, forward, generation, gradients) and [`tokenizer`]
//! (tokens, chat template) are joined in [`runtime`]; [`tasks`] holds questions, gold
//! answers and answer parsing; [`layout`] builds every sequence from them; [`eval`]
//! measures a prompt; [`settings`] declares every setting once; [`optimize`] is the GReaTer
//! method, [`store`] its run folder and [`records`] what the folder holds; [`protocol`] and
//! [`screen`] run it over lists of tasks and configurations; [`report`] renders the records.
//! The CLI only wires them. ARCHITECTURE.md describes the layers.
//!
//! Optimising a prompt from Rust (the CLI's `greater optimize`; `examples/optimize_prompt.rs`
//! is a complete program):
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use greater::optimize::run::{run, Start};
//! use greater::settings::{OptimizeConfig, Size};
//!
//! let settings = OptimizeConfig { model: "smollm2-135m".into(), task: "arithmetic".into(), ..Size::Demo.apply(OptimizeConfig::default()) };
//! let stop = Arc::new(AtomicBool::new(false)); // set it to stop after the current step
//! let summary = run(Start::New(settings), "runs/demo".as_ref(), &stop, &mut |_event| {})?;
//! println!("returned prompt: {:?}", summary.best_prompt);
//! for e in &summary.evaluations {
//!     println!("{}: {:.3} ({}/{})", e.label, e.accuracy, e.correct, e.n);
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod app;
pub mod catalog;
pub mod eval;
pub mod export;
pub mod layout;
pub mod model;
pub mod optimize;
pub mod protocol;
pub mod records;
pub mod report;
pub mod runtime;
pub mod screen;
pub mod settings;
pub mod stats;
pub mod store;
pub mod tasks;
pub mod tokenizer;
