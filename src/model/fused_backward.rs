//! candle's fused RMSNorm and rotary kernels are fast but record no backward op. Here they
//! run unchanged and a custom op re-attaches the exact gradient of what they compute, which
//! is far cheaper than rebuilding the same maths from a dozen differentiable tensor ops
//! (each of which keeps its temporaries and a gradient for every constant input).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::config::RopeStyle;

type Backward = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Returns `y` (already computed from `x`); its gradient flows to `x` through `backward`.
struct WithGradient {
    /// (x, d loss / d y) -> d loss / d x
    backward: Backward,
}

impl CustomOp2 for WithGradient {
    fn name(&self) -> &'static str {
        "with-gradient"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = yl.contiguous_offsets() else {
            candle_core::bail!("with-gradient: the computed value must be contiguous")
        };
        let out = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            other => candle_core::bail!(
                "with-gradient: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(x, grad)?), None))
    }
}

fn attach(x: &Tensor, y: &Tensor, backward: Backward) -> Result<Tensor> {
    x.apply_op2(y, WithGradient { backward })
}

/// RMSNorm values without a gradient: candle's fused kernel where it exists (f32).
pub fn rms_norm_value(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
    } else {
        candle_nn::ops::rms_norm_slow(&x.detach(), weight, eps)
    }
}

/// RMSNorm over the last axis, y = w * x / sqrt(mean(x^2) + eps), with its gradient:
/// dx = r (g w) - x r^3 mean(g w x), r = 1 / sqrt(mean(x^2) + eps).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = rms_norm_value(&x.detach(), weight, eps)?;
    let w = weight.clone();
    attach(
        &x,
        &y,
        Box::new(move |x, g| {
            let gw = g.broadcast_mul(&w)?;
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.powf(-0.5)?;
            let dot = (&gw * x)?.mean_keepdim(D::Minus1)?;
            gw.broadcast_mul(&r)? - x.broadcast_mul(&(dot * r.powf(3.0)?)?)?
        }),
    )
}

/// candle's fused rotary kernel for `style` (no gradient).
pub fn rope_kernel(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    match style {
        RopeStyle::Halves => candle_nn::rotary_emb::rope(x, cos, sin),
        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin),
    }
}

/// Rotary embedding with its gradient: a rotation, so the gradient is rotated back
/// (the same kernel with -sin).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = rope_kernel(&x.detach(), cos, sin, style)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach(&x, &y, Box::new(move |_, g| rope_kernel(&g.contiguous()?, &cos, &neg_sin, style)))
}
