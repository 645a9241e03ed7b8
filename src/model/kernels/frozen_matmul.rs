//! `x @ W^T` for a weight that is never trained. candle's matmul backward computes the
//! gradient of both operands, so every linear layer of the gradient pass would also build
//! (and allocate) a weight-sized gradient nobody reads; this op returns only d/dx.
//!
//! With few rows (decoding, scoring) on a CPU with AVX-512 the product runs in
//! [`few_rows`], which reads each weight row once instead of packing the weight first; with
//! more rows gemm's packing pays for itself. A GGUF weight kept packed ([`PackedWeight`])
//! takes that path further, since its integers are a fraction of the f32 bytes to read.
//! Otherwise, without a gradient and with a few dozen rows, `(W @ x^T)^T` is computed
//! instead: gemm is faster in that orientation at those sizes, while from a few hundred rows
//! on both run alike and the transposing copy costs more. The thresholds below come from
//! `cargo bench --bench runtime` (see BENCHMARKS.md).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use std::sync::Arc;

use super::bf16::{self, Right};
use super::few_rows;
use super::int8::{self, InputBits, Int8Weight};
use super::packed::PackedWeight;

/// A weight's block integers, which products without a gradient read instead of its f32
/// copy.
#[derive(Clone)]
pub enum FastWeight {
    /// Precision `f32`: integers that give back the f32 weights bit for bit, for the
    /// few-row product.
    Exact(Arc<PackedWeight>),
    /// Precisions `mixed` and `mixed16`: integer dot products with the input quantised per
    /// block to these bits.
    Int8(Arc<Int8Weight>, InputBits),
}

struct FrozenMatmul {
    /// [out, in]
    weight: Tensor,
    /// The same weight as integers, read instead of `weight` when given.
    fast: Option<FastWeight>,
    /// Products in bf16 with f32 sums, forward and backward (the gradient pass of the
    /// `mixed` precision).
    bf16: bool,
}

/// `g @ W` in bf16 products with f32 sums: the input gradient of a bf16 [`FrozenMatmul`].
struct Bf16InputGradient {
    /// [out, in]
    weight: Tensor,
}

impl CustomOp1 for Bf16InputGradient {
    fn name(&self) -> &'static str {
        "bf16-input-gradient"
    }

    fn cpu_fwd(&self, g: &CpuStorage, g_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_l) = self.weight.storage_and_layout();
        let (m, n) = g_l.shape().dims2()?;
        let k = w_l.shape().dims2()?.1;
        match (&*w, g, g_l.contiguous_offsets(), w_l.contiguous_offsets()) {
            (
                Storage::Cpu(CpuStorage::F32(wd)),
                CpuStorage::F32(gd),
                Some((gs, ge)),
                Some((ws, we)),
            ) => {
                let y = bf16::matmul(&gd[gs..ge], n, &wd[ws..we], n, k, Right::Plain);
                Ok((CpuStorage::F32(y), Shape::from((m, k))))
            }
            _ => candle_core::bail!("bf16-input-gradient: needs contiguous f32 on the CPU"),
        }
    }
}

/// `x` [m, k] times the transpose of `w` [n, k], on any backend.
fn forward<B: BackendStorage>(x: &B, x_l: &Layout, w: &B, w_l: &Layout) -> Result<(B, Shape)> {
    let (m, k) = x_l.shape().dims2()?;
    let (n, _) = w_l.shape().dims2()?;
    let out = x.matmul(w, (1, m, n, k), x_l, &w_l.transpose(0, 1)?)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_l) = self.weight.storage_and_layout();
        let (m, k) = x_l.shape().dims2()?;
        let n = w_l.shape().dims2()?.0;
        let exact = match &self.fast {
            Some(FastWeight::Exact(p)) => Some(p),
            _ => None,
        };
        match (&*w, x, x_l.contiguous_offsets(), w_l.contiguous_offsets()) {
            (
                Storage::Cpu(CpuStorage::F32(wd)),
                CpuStorage::F32(xd),
                Some((xs, xe)),
                Some((ws, we)),
            ) if self.bf16 => Ok((
                CpuStorage::F32(bf16::matmul(&xd[xs..xe], k, &wd[ws..we], n, k, Right::Transposed)),
                Shape::from((m, n)),
            )),
            (_, CpuStorage::F32(xd), Some((xs, xe)), _)
                if matches!(self.fast, Some(FastWeight::Int8(..))) =>
            {
                let Some(FastWeight::Int8(q, bits)) = &self.fast else { unreachable!() };
                Ok((CpuStorage::F32(int8::matmul(&xd[xs..xe], q, *bits)), Shape::from((m, n))))
            }
            (
                Storage::Cpu(CpuStorage::F32(wd)),
                CpuStorage::F32(xd),
                Some((xs, xe)),
                Some((ws, we)),
            ) if takes_few_rows(m, DType::F32, exact.is_some()) => {
                let y = match exact {
                    Some(p) => few_rows::matmul_packed(&xd[xs..xe], p, m),
                    None => few_rows::matmul(&xd[xs..xe], &wd[ws..we], m, k, n),
                };
                Ok((CpuStorage::F32(y), Shape::from((m, n))))
            }
            (Storage::Cpu(w), ..) => forward(x, x_l, w, w_l),
            _ => candle_core::bail!("frozen-matmul: input on the CPU but weight elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.bf16 {
            return Ok(Some(
                grad.contiguous()?.apply_op1(Bf16InputGradient { weight: self.weight.clone() })?,
            ));
        }
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// Rows up to which [`few_rows`] is used: with f32 weights, and with packed weights, whose
/// integers it reads at under a third of the f32 bytes.
const FEW_ROWS: usize = 16;
const FEW_ROWS_PACKED: usize = 64;

/// Rows up to which the transposed orientation is used when [`few_rows`] is not (chosen
/// against 0 and unbounded in decoding at batch 8 and 32 and in a prefill).
const TRANSPOSED_ROWS: usize = 64;

/// Whether a CPU product of `m` rows in `dtype` runs in [`few_rows`].
fn takes_few_rows(m: usize, dtype: DType, packed: bool) -> bool {
    m <= if packed { FEW_ROWS_PACKED } else { FEW_ROWS }
        && dtype == DType::F32
        && few_rows::available()
}

/// Rows from which the gradient pass's products run in bf16 when `bf16` is asked for: fewer
/// leave the packing of the weight unpaid.
const BF16_ROWS: usize = 64;

/// `x` [m, in] @ `weight`^T [in, out]; `fast`, when given, holds the same weight. Integer
/// dot products (`FastWeight::Int8`) serve only passes without a gradient; the gradient
/// pass multiplies by the f32 weight, in bf16 products with f32 sums when `bf16`.
pub fn frozen_matmul(
    x: &Tensor,
    weight: &Tensor,
    fast: Option<&FastWeight>,
    bf16: bool,
) -> Result<Tensor> {
    let m = x.dim(0)?;
    let on_cpu = x.device().is_cpu() && x.dtype() == DType::F32;
    if bf16 && on_cpu && x.track_op() && m >= BF16_ROWS {
        return x.apply_op1(FrozenMatmul { weight: weight.clone(), fast: None, bf16: true });
    }
    let fast = match fast {
        Some(FastWeight::Int8(..)) if !on_cpu || x.track_op() => None,
        other => other.cloned(),
    };
    let few = match &fast {
        Some(FastWeight::Int8(..)) => true,
        other => on_cpu && takes_few_rows(m, x.dtype(), other.is_some()),
    };
    if !few && !x.track_op() && m <= TRANSPOSED_ROWS {
        return weight.matmul(&x.t()?)?.t()?.contiguous();
    }
    x.apply_op1(FrozenMatmul { weight: weight.clone(), fast, bf16: false })
}
