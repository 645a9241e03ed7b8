//! Model runtime: architectures, weights, generation and gradients.

pub mod catalog;
mod causal_softmax;
pub mod config;
mod decode_attention;
pub mod few_rows;
mod frozen_matmul;
mod fused_backward;
pub mod generate;
pub mod gradient;
pub mod packed;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{KvCache, Model, Pass};
