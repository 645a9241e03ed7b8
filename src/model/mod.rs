//! Model runtime: architectures, weights, generation and gradients, over the SIMD
//! [`kernels`].

mod causal_softmax;
pub mod config;
mod decode_attention;
mod fused_backward;
pub mod generate;
pub mod gradient;
pub mod kernels;
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
    /// As `mixed`, with the input of the integer products quantised to 16 bits per block
    /// (two rows of bytes, twice the integer work): results within rounding of `f32`'s.
    Mixed16,
}

impl Precision {
    /// How the input of the integer products is quantised (None: f32 products).
    pub fn input_bits(self) -> Option<kernels::int8::InputBits> {
        match self {
            Precision::F32 => None,
            Precision::Mixed => Some(kernels::int8::InputBits::Eight),
            Precision::Mixed16 => Some(kernels::int8::InputBits::Sixteen),
        }
    }

    /// What a run folder written before the setting existed ran with.
    pub fn before_setting() -> Self {
        Precision::F32
    }
}

/// Runs `work` on a thread of rayon's pool (directly when already on one). The kernels split
/// each product and attention over the pool; a pass makes hundreds of such calls, and from a
/// thread outside the pool each is handed to the pool and waited for with a sleep and a
/// wake-up, where from a worker it is a nested join. `cargo bench --bench step` measures it.
pub fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
