//! A weight kept as the integers of its GGUF blocks, for the few-row product.
//!
//! Decoding a few sequences is bound by reading the weights: SmolLM2's f32 weights are
//! 536 MB, about 42 ms a token step at this machine's memory bandwidth. The integers of a
//! GGUF block with one scale (and offset) per 16 or 32 weights take a quarter of that and
//! give back every f32 weight exactly, computed with the same two roundings as the
//! dequantisation that made the f32 copy (`q * scale`, then `+ offset`), so a product
//! over them is bit-identical to the product over the f32 copy.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use half::f16;

pub struct PackedWeight {
    /// Rows and columns of the weight, [n, k] (k a multiple of `block`).
    pub n: usize,
    pub k: usize,
    /// Weights per scale: 16 or 32.
    pub block: usize,
    /// Row-major small integers, one per weight.
    pub q: Vec<i8>,
    /// One per block, row-major: weight = q * scale (+ offset).
    pub scale: Vec<f32>,
    pub offset: Option<Vec<f32>>,
}

/// Block layouts of the GGUF formats kept packed: weights per block and bytes per block.
fn layout(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (32, 18),
        GgmlDType::Q4_1 => (32, 20),
        GgmlDType::Q5_0 => (32, 22),
        GgmlDType::Q5_1 => (32, 24),
        GgmlDType::Q8_0 => (32, 34),
        _ => return None,
    })
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 integers of a 4-bit block: low nibbles are weights 0..16, high nibbles 16..32;
/// `high_bits` (Q5) adds bit j of it as bit 4 of weight j.
fn nibbles(qs: &[u8], high_bits: Option<u32>, minus: i32, out: &mut [i8]) {
    for (j, &b) in qs.iter().enumerate() {
        let (hi0, hi1) = match high_bits {
            Some(h) => ((((h >> j) & 1) << 4) as i32, (((h >> (j + 16)) & 1) << 4) as i32),
            None => (0, 0),
        };
        out[j] = ((b & 0x0F) as i32 + hi0 - minus) as i8;
        out[j + 16] = ((b >> 4) as i32 + hi1 - minus) as i8;
    }
}

impl PackedWeight {
    /// The blocks of a GGUF tensor [n, k] stored as `dtype`, or None for a format that is
    /// not kept packed (K-quants, floats).
    pub fn from_ggml(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Result<Option<Self>> {
        let Some((block, bytes)) = layout(dtype) else { return Ok(None) };
        if k % block != 0 || data.len() != n * k / block * bytes {
            bail!("{dtype:?} tensor [{n}, {k}]: {} bytes do not hold its blocks", data.len());
        }
        let blocks = n * k / block;
        let mut q = vec![0i8; n * k];
        let mut scale = Vec::with_capacity(blocks);
        let mut offset = Vec::with_capacity(blocks);
        for (src, dst) in data.chunks_exact(bytes).zip(q.chunks_exact_mut(block)) {
            scale.push(half_at(src, 0));
            match dtype {
                GgmlDType::Q4_0 => nibbles(&src[2..18], None, 8, dst),
                GgmlDType::Q4_1 => {
                    offset.push(half_at(src, 2));
                    nibbles(&src[4..20], None, 0, dst);
                }
                GgmlDType::Q5_0 => {
                    let h = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                    nibbles(&src[6..22], Some(h), 16, dst);
                }
                GgmlDType::Q5_1 => {
                    offset.push(half_at(src, 2));
                    let h = u32::from_le_bytes([src[4], src[5], src[6], src[7]]);
                    nibbles(&src[8..24], Some(h), 0, dst);
                }
                GgmlDType::Q8_0 => {
                    for (d, &s) in dst.iter_mut().zip(&src[2..34]) {
                        *d = s as i8;
                    }
                }
                _ => unreachable!("layout() admits only the formats above"),
            }
        }
        let offset = (!offset.is_empty()).then_some(offset);
        Ok(Some(PackedWeight { n, k, block, q, scale, offset }))
    }

    /// Every weight as f32, row-major, the way [`crate::model::few_rows`] computes it.
    pub fn to_f32(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let b = i / self.block;
                let w = q as f32 * self.scale[b];
                self.offset.as_ref().map_or(w, |o| w + o[b])
            })
            .collect()
    }
}
