//! A weight kept as the integers of its GGUF blocks, for the few-row product.
//!
//! Decoding a few sequences is bound by reading the weights: SmolLM2's f32 weights are
//! 536 MB, about 42 ms a token step at this machine's memory bandwidth. The integers of a
//! GGUF block with one scale (and offset) per 16 or 32 weights take 28-31% of that and
//! give back every f32 weight exactly, computed with the same two roundings as the
//! dequantisation that made the f32 copy (`q * scale`, then `+ offset`), so a product
//! over them is bit-identical to the product over the f32 copy.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use half::f16;

/// A weight as its GGUF block integers: small integers with a scale (and an offset) per block.
pub struct PackedWeight {
    /// Rows of the weight [n, k] (k a multiple of `block`).
    pub n: usize,
    /// Columns.
    pub k: usize,
    /// Weights per scale: 16 or 32.
    pub block: usize,
    /// Row-major small integers, one per weight.
    pub q: Vec<i8>,
    /// One per block, row-major: weight = q * scale (+ offset).
    pub scale: Vec<f32>,
    /// One per block for formats with an offset (Q4_1, Q5_1, K-quants): weight = q * scale + offset.
    pub offset: Option<Vec<f32>>,
}

/// The GGUF formats kept packed: weights and bytes per block, weights per scale.
fn layout(dtype: GgmlDType) -> Option<(usize, usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (32, 18, 32),
        GgmlDType::Q4_1 => (32, 20, 32),
        GgmlDType::Q5_0 => (32, 22, 32),
        GgmlDType::Q5_1 => (32, 24, 32),
        GgmlDType::Q8_0 => (32, 34, 32),
        GgmlDType::Q4K => (256, 144, 32),
        GgmlDType::Q6K => (256, 210, 16),
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

/// Scale and min of sub-block j of a Q4_K block: 6 bits each, packed into 12 bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// One block of `dtype`: its integers into `q`, a scale per sub-block, an offset per
/// sub-block for the formats that have one. The scales are rounded exactly as the
/// dequantisation rounds them (Q4_K: d * sc, and - dmin * m as the offset; Q6_K: d * sc).
fn unpack(dtype: GgmlDType, src: &[u8], q: &mut [i8], scale: &mut Vec<f32>, offset: &mut Vec<f32>) {
    match dtype {
        GgmlDType::Q4_0 => {
            scale.push(half_at(src, 0));
            nibbles(&src[2..18], None, 8, q);
        }
        GgmlDType::Q4_1 => {
            scale.push(half_at(src, 0));
            offset.push(half_at(src, 2));
            nibbles(&src[4..20], None, 0, q);
        }
        GgmlDType::Q5_0 => {
            scale.push(half_at(src, 0));
            nibbles(&src[6..22], Some(u32::from_le_bytes([src[2], src[3], src[4], src[5]])), 16, q);
        }
        GgmlDType::Q5_1 => {
            scale.push(half_at(src, 0));
            offset.push(half_at(src, 2));
            nibbles(&src[8..24], Some(u32::from_le_bytes([src[4], src[5], src[6], src[7]])), 0, q);
        }
        GgmlDType::Q8_0 => {
            scale.push(half_at(src, 0));
            for (d, &b) in q.iter_mut().zip(&src[2..34]) {
                *d = b as i8;
            }
        }
        GgmlDType::Q4K => {
            // d, dmin, 12 bytes of scales and mins, then 64-weight chunks of 32 bytes: low
            // nibbles are the chunk's first sub-block, high nibbles its second.
            let (d, dmin, scales, qs) =
                (half_at(src, 0), half_at(src, 2), &src[4..16], &src[16..144]);
            for j in 0..8 {
                let (sc, m) = q4k_scale_min(j, scales);
                scale.push(d * sc as f32);
                offset.push(-(dmin * m as f32));
                let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                for (d, &b) in q[32 * j..32 * j + 32].iter_mut().zip(bytes) {
                    *d = if j % 2 == 0 { b & 0x0F } else { b >> 4 } as i8;
                }
            }
        }
        GgmlDType::Q6K => {
            // 128 bytes of low 4 bits, 64 of high 2 bits, 16 signed scales, d; each half of
            // 128 weights takes 64 low and 32 high bytes in four interleaved quarters.
            let (ql, qh, sc, d) = (&src[..128], &src[128..192], &src[192..208], half_at(src, 208));
            for (h, q) in q.chunks_exact_mut(128).enumerate() {
                let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                for l in 0..32 {
                    q[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    q[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
            }
            scale.extend(sc.iter().map(|&s| d * (s as i8) as f32));
        }
        _ => unreachable!("layout() admits only the formats above"),
    }
}

impl PackedWeight {
    /// The blocks of a GGUF tensor [n, k] stored as `dtype`, or None for a format that is
    /// not kept packed (floats, the other K-quants).
    pub fn from_ggml(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Result<Option<Self>> {
        let Some((weights, bytes, block)) = layout(dtype) else { return Ok(None) };
        if !k.is_multiple_of(weights) || data.len() != n * k / weights * bytes {
            bail!("{dtype:?} tensor [{n}, {k}]: {} bytes do not hold its blocks", data.len());
        }
        let mut q = vec![0i8; n * k];
        let mut scale = Vec::with_capacity(n * k / block);
        let mut offset = Vec::new();
        for (src, dst) in data.chunks_exact(bytes).zip(q.chunks_exact_mut(weights)) {
            unpack(dtype, src, dst, &mut scale, &mut offset);
        }
        let offset = (!offset.is_empty()).then_some(offset);
        Ok(Some(PackedWeight { n, k, block, q, scale, offset }))
    }

    /// Every weight as f32, row-major, the way [`crate::model::kernels::few_rows`] computes it.
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
