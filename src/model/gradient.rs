//! Gradients with respect to a one-hot choice of prompt token: the position takes the
//! embedding `w @ E[candidates]`, and d loss / d w ranks the candidates.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use super::transformer::{KvCache, Model, Pass};

/// One sequence whose token at `position` is a mixture of `candidates` rows of the
/// embedding matrix, weighted by `weights` (one-hot on the current token in practice).
pub struct OneHotInput<'a> {
    /// Already computed, without gradient tracking: ids[..prefix.len()].
    pub prefix: &'a KvCache,
    /// The whole sequence; the id at `position` is ignored.
    pub ids: &'a [u32],
    pub position: usize,
    pub candidates: &'a [u32],
    pub weights: &'a [f32],
    /// Positions whose next-token logits the loss reads, in this order.
    pub loss_positions: &'a [usize],
}

/// Loss value and d loss / d weights, for a loss built from the logits
/// [loss_positions.len(), vocab].
pub fn loss_and_gradient(
    model: &Model,
    input: &OneHotInput,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(f64, Vec<f32>)> {
    let (weights, value) = forward_loss(model, input, loss)?;
    let grads = value.backward()?;
    let grad = match grads.get(weights.as_tensor()) {
        Some(g) => g.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
        // The loss does not read anything downstream of the position.
        None => vec![0.0; input.candidates.len()],
    };
    Ok((value.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?, grad))
}

/// The loss alone (no backward pass), e.g. for finite-difference checks.
pub fn loss_value(model: &Model, input: &OneHotInput, loss: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let (_, value) = forward_loss(model, input, loss)?;
    Ok(value.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

fn forward_loss(
    model: &Model,
    input: &OneHotInput,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Var, Tensor)> {
    let start = input.prefix.len();
    let (pos, n) = (input.position, input.ids.len());
    if pos < start || pos >= n {
        bail!("one-hot position {pos} is outside the uncached part {start}..{n} of the sequence");
    }
    if input.candidates.len() != input.weights.len() || input.candidates.is_empty() {
        bail!("{} candidates but {} weights", input.candidates.len(), input.weights.len());
    }
    if let Some(&p) = input.loss_positions.iter().find(|&&p| p < start || p >= n) {
        bail!("loss position {p} is outside the uncached part {start}..{n} of the sequence");
    }
    let device = model.device();
    let weights = Var::from_tensor(
        &Tensor::new(input.weights, device)?.to_dtype(model.dtype())?.unsqueeze(0)?,
    )?;
    let mixed = weights.as_tensor().matmul(&model.embed(input.candidates)?)?; // [1, hidden]
    let mut rows = Vec::with_capacity(3);
    if pos > start {
        rows.push(model.embed(&input.ids[start..pos])?);
    }
    rows.push(mixed);
    if pos + 1 < n {
        rows.push(model.embed(&input.ids[pos + 1..])?);
    }
    let x = Tensor::cat(&rows, 0)?.unsqueeze(0)?;
    let mut cache = [input.prefix.clone()];
    let hidden = model.forward(&x, &mut cache, Pass::Differentiable)?.squeeze(0)?;
    let rel: Vec<u32> = input.loss_positions.iter().map(|&p| (p - start) as u32).collect();
    let picked = hidden.index_select(&Tensor::new(rel.as_slice(), device)?, 0)?;
    let value = loss(&model.logits(&picked)?)?;
    Ok((weights, value))
}

/// Mean cross-entropy of `targets` under `logits / temperature` ([n, vocab] logits).
pub fn cross_entropy(logits: &Tensor, targets: &[u32], temperature: f64) -> Result<Tensor> {
    let target = Tensor::new(targets, logits.device())?;
    Ok(candle_nn::loss::cross_entropy(&(logits / temperature)?, &target)?)
}
