//! Softmax over attention scores with the causal (and sliding-window) mask built in.
//! As plain tensor ops, the mask would be a [rows, keys] tensor added to the scores, and
//! candle's backward would allocate and keep a gradient for it in every layer; this op
//! reads the mask from three integers and returns only the gradient of the scores.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

/// Rows are queries `past + (row % len)`; a query sees keys `k <= q` with `q - k < window`.
struct CausalSoftmax {
    past: usize,
    len: usize,
    window: usize,
}

impl CausalSoftmax {
    fn row<T: Float + Send + Sync>(&self, row: usize, src: &[T], dst: &mut [T]) {
        let q = self.past + row % self.len;
        let lo = (q + 1).saturating_sub(self.window);
        let visible = &src[lo..=q];
        let max = visible.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for (d, &s) in dst[lo..=q].iter_mut().zip(visible) {
            *d = (s - max).exp();
            sum = sum + *d;
        }
        for d in &mut dst[lo..=q] {
            *d = *d / sum;
        }
    }

    fn apply<T: Float + Send + Sync>(&self, src: &[T], keys: usize) -> Vec<T> {
        let mut out = vec![T::zero(); src.len()];
        out.par_chunks_mut(keys)
            .zip(src.par_chunks(keys))
            .enumerate()
            .for_each(|(r, (dst, src))| self.row(r, src, dst));
        out
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let keys = layout.dims()[layout.dims().len() - 1];
        if keys != self.past + self.len {
            candle_core::bail!("causal-softmax: {keys} keys, expected {}", self.past + self.len);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal-softmax needs contiguous scores")
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&v[start..end], keys)),
            CpuStorage::F64(v) => CpuStorage::F64(self.apply(&v[start..end], keys)),
            other => candle_core::bail!(
                "causal-softmax: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, layout.shape().clone()))
    }

    /// d scores = p * (g - sum(g * p)); masked entries have p = 0 and get no gradient.
    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        Ok(Some((probs * grad.broadcast_sub(&dot)?)?))
    }
}

/// Softmax of `scores` [.., rows, past + len] along the last axis, where row `r` is the
/// query at position `past + r % len` and sees only earlier keys within `window`.
pub fn causal_softmax(
    scores: &Tensor,
    past: usize,
    len: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let window = window.unwrap_or(usize::MAX);
    scores.contiguous()?.apply_op1(CausalSoftmax { past, len, window })
}
