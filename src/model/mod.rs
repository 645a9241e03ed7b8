//! Model runtime: architectures, weights, generation and gradients.

pub mod bf16;
mod causal_softmax;
pub mod config;
mod decode_attention;
pub mod few_rows;
mod frozen_matmul;
mod fused_backward;
pub mod generate;
pub mod gradient;
pub mod int8;
pub mod packed;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{KvCache, Model, Pass};

/// The arithmetic of the passes without a gradient (decoding, prefill, scoring).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 products, the same bits on every CPU with AVX-512.
    #[default]
    F32,
    /// Integer dot products over the weights' block integers with the input quantised to
    /// 8 bits per block (llama.cpp's arithmetic); the gradient pass's products in bf16 with
    /// f32 sums where the CPU has AVX512-BF16, f32 elsewhere.
    Mixed,
}

impl Precision {
    /// What a run folder written before the setting existed ran with.
    pub fn before_setting() -> Self {
        Precision::F32
    }
}
