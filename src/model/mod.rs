//! Model runtime: architectures, weights, generation and gradients.

pub mod catalog;
pub mod config;
pub mod generate;
pub mod gradient;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{KvCache, Model, Pass};
