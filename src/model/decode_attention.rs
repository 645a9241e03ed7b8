//! Attention of one new query per sequence over that sequence's own cache, for batched
//! decoding. As tensor ops this is a dozen small ops per sequence and layer; one pass over
//! the caches does the same arithmetic without the per-op overhead, which dominated
//! decoding at large batches.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

pub struct DecodeAttention {
    /// Per sequence: all keys and values, [1, kv_heads, len, head_dim] (views of the cache).
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// Where a cache view starts, and its strides between heads and between positions.
fn view(layout: &Layout) -> Result<(usize, usize, usize)> {
    let stride = layout.stride();
    if stride[3] != 1 {
        candle_core::bail!("decode-attention: head dimension not contiguous");
    }
    Ok((layout.start_offset(), stride[1], stride[2]))
}

impl CustomOp1 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    /// `q`: [batch, heads, head_dim] contiguous f32 -> [batch, heads * head_dim].
    fn cpu_fwd(&self, q: &CpuStorage, q_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, hd) = q_l.shape().dims3()?;
        let (Some((qs, qe)), CpuStorage::F32(q)) = (q_l.contiguous_offsets(), q) else {
            candle_core::bail!("decode-attention needs a contiguous f32 query");
        };
        let q = &q[qs..qe];
        let guards: Vec<_> =
            self.keys.iter().chain(&self.values).map(|t| t.storage_and_layout()).collect();
        let mut caches = Vec::with_capacity(guards.len());
        for (g, layout) in &guards {
            let Storage::Cpu(CpuStorage::F32(data)) = &**g else {
                candle_core::bail!("decode-attention needs f32 caches on the CPU");
            };
            let (start, head_stride, pos_stride) = view(layout)?;
            caches.push((data.as_slice(), start, head_stride, pos_stride, layout.dims()[2]));
        }
        let n_rep = self.n_heads / self.n_kv_heads;
        let mut out = vec![0f32; batch * heads * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(row, dst)| {
            let (b, h) = (row / heads, row % heads);
            let (k, k0, k_head, k_pos, len) = caches[b];
            let (v, v0, v_head, v_pos, _) = caches[batch + b];
            let (k0, v0) = (k0 + (h / n_rep) * k_head, v0 + (h / n_rep) * v_head);
            let qr = &q[row * hd..(row + 1) * hd];
            let lo = self.window.map_or(0, |w| len.saturating_sub(w));
            let mut scores: Vec<f32> = (lo..len)
                .map(|t| {
                    let kr = &k[k0 + t * k_pos..k0 + t * k_pos + hd];
                    let s = dot(qr, kr) * self.scale;
                    self.softcap.map_or(s, |c| (s / c).tanh() * c)
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in &mut scores {
                *s /= sum;
            }
            let value =
                |i: usize, at: usize| &v[v0 + (lo + i) * v_pos + at..v0 + (lo + i) * v_pos + hd];
            let mut blocks = dst.chunks_exact_mut(VALUE_BLOCK);
            for (c, block) in blocks.by_ref().enumerate() {
                block.copy_from_slice(&weighted_sum::<VALUE_BLOCK>(&scores, |i| {
                    value(i, c * VALUE_BLOCK)
                }));
            }
            let tail = blocks.into_remainder();
            let at = hd - tail.len();
            for (i, w) in scores.iter().enumerate() {
                for (d, x) in tail.iter_mut().zip(value(i, at)) {
                    *d += w * x;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, heads * hd))))
    }
}

/// Value elements per block of [`weighted_sum`]: 4 vector registers of accumulators.
const VALUE_BLOCK: usize = 64;

/// Σ_i `weights[i]` · `row(i)[..N]`, each element a product then a sum over i in order (as
/// the plain loop rounds), the N sums kept in registers across the rows instead of stored
/// and reloaded for every row.
fn weighted_sum<'a, const N: usize>(weights: &[f32], row: impl Fn(usize) -> &'a [f32]) -> [f32; N] {
    let mut acc = [0f32; N];
    for (i, &w) in weights.iter().enumerate() {
        let r: &[f32; N] = row(i)[..N].try_into().expect("a row holds a block");
        for (a, x) in acc.iter_mut().zip(r) {
            *a += w * x;
        }
    }
    acc
}

/// Dot product summed in 16 independent lanes, which the compiler turns into vector
/// instructions (one running sum must stay scalar to keep its order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
