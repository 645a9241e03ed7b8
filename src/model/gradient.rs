//! Gradients with respect to a one-hot choice of prompt token: the position takes the
//! embedding `w @ E[candidates]`, and d loss / d w ranks the candidates.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

use super::generate::length_batches;
use super::on_pool;
use super::transformer::{KvCache, Model, Pass};

/// One sequence whose token at `position` is a mixture of `candidates` rows of the
/// embedding matrix, weighted by `weights` (one-hot on the current token in practice).
pub struct OneHotInput<'a> {
    /// Already computed, without gradient tracking: ids[..prefix.len()].
    pub prefix: &'a KvCache,
    /// The whole sequence; the id at `position` is ignored.
    pub ids: &'a [u32],
    /// The position whose token is replaced by a one-hot mixture.
    pub position: usize,
    /// The tokens the mixture ranges over.
    pub candidates: &'a [u32],
    /// Each candidate's weight in the mixture (the gradient is taken at these).
    pub weights: &'a [f32],
    /// Positions whose next-token logits the loss reads, in this order.
    pub loss_positions: &'a [usize],
}

/// Padded positions per batched gradient pass: bounds the memory its graph keeps (a few MB
/// per position for these models). Examples this short run many to a pass, where alone
/// their matrix products would have too few rows to be efficient.
const GRADIENT_BATCH_TOKENS: usize = 512;

/// Loss value and d loss / d weights, for a loss built from the logits
/// [loss_positions.len(), vocab].
pub fn loss_and_gradient(
    model: &Model,
    input: &OneHotInput,
    loss: impl Fn(&Tensor) -> Result<Tensor> + Sync,
) -> Result<(f64, Vec<f32>)> {
    Ok(loss_and_gradients(model, std::slice::from_ref(input), |_, logits| loss(logits))?.remove(0))
}

/// [`loss_and_gradient`] of every input, the loss of input `i` being `loss(i, its logits)`:
/// inputs of similar length share one padded forward and backward. Sequences attend only
/// to themselves, so each gets the gradient it would get alone.
pub fn loss_and_gradients(
    model: &Model,
    inputs: &[OneHotInput],
    loss: impl Fn(usize, &Tensor) -> Result<Tensor> + Sync,
) -> Result<Vec<(f64, Vec<f32>)>> {
    on_pool(|| {
        let lens: Vec<usize> =
            inputs.iter().map(|i| i.ids.len().saturating_sub(i.prefix.len())).collect();
        let mut out: Vec<Option<(f64, Vec<f32>)>> = vec![None; inputs.len()];
        for batch in length_batches(&lens, GRADIENT_BATCH_TOKENS) {
            let group: Vec<&OneHotInput> = batch.iter().map(|&i| &inputs[i]).collect();
            let (weights, values) =
                forward_losses(model, &group, |j, logits| loss(batch[j], logits))?;
            let total = values.iter().skip(1).try_fold(values[0].clone(), |sum, v| sum + v)?;
            let grads = total.backward()?;
            for ((&i, w), value) in batch.iter().zip(&weights).zip(&values) {
                let grad = match grads.get(w.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    // The loss does not read anything downstream of the position.
                    None => vec![0.0; inputs[i].candidates.len()],
                };
                out[i] = Some((scalar(value)?, grad));
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every input is in a batch")).collect())
    })
}

/// The loss alone (no backward pass), e.g. for finite-difference checks.
#[cfg(feature = "testing")]
pub fn loss_value(
    model: &Model,
    input: &OneHotInput,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<f64> {
    let (_, values) = forward_losses(model, &[input], |_, logits| loss(logits))?;
    scalar(&values[0])
}

fn scalar(value: &Tensor) -> Result<f64> {
    Ok(value.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The input embeddings of the uncached part of `input`, its position a mixture of the
/// candidates' rows weighted by the returned variable.
fn mixed_embeddings(model: &Model, input: &OneHotInput) -> Result<(Var, Tensor)> {
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
    let weights = Var::from_tensor(
        &Tensor::new(input.weights, model.device())?.to_dtype(model.dtype())?.unsqueeze(0)?,
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
    Ok((weights, Tensor::cat(&rows, 0)?))
}

/// One differentiable forward of `inputs`, each padded at its end to the longest (padding
/// comes after every position a loss reads, so causal attention keeps it out); the one-hot
/// variables and the losses, in input order.
fn forward_losses(
    model: &Model,
    inputs: &[&OneHotInput],
    loss: impl Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<(Vec<Var>, Vec<Tensor>)> {
    let (weights, rows): (Vec<Var>, Vec<Tensor>) = inputs
        .iter()
        .map(|i| mixed_embeddings(model, i))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let longest = rows
        .iter()
        .map(|r| r.dim(0))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let padded = rows
        .iter()
        .map(|r| {
            let (len, hidden) = r.dims2()?;
            if len == longest {
                return Ok(r.clone());
            }
            Tensor::cat(&[r, &Tensor::zeros((longest - len, hidden), r.dtype(), r.device())?], 0)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::stack(&padded, 0)?;
    let mut caches: Vec<KvCache> = inputs.iter().map(|i| i.prefix.clone()).collect();
    let hidden = model.forward(&x, &mut caches, Pass::Differentiable)?.flatten_to(1)?;
    // Every input's loss rows, read in one vocabulary projection.
    let picked: Vec<u32> = inputs
        .iter()
        .enumerate()
        .flat_map(|(b, i)| {
            i.loss_positions.iter().map(move |&p| (b * longest + p - i.prefix.len()) as u32)
        })
        .collect();
    let logits =
        model.logits(&hidden.index_select(&Tensor::new(picked.as_slice(), model.device())?, 0)?)?;
    let mut offset = 0;
    let mut values = Vec::with_capacity(inputs.len());
    for (j, input) in inputs.iter().enumerate() {
        let n = input.loss_positions.len();
        values.push(loss(j, &logits.narrow(0, offset, n)?)?);
        offset += n;
    }
    Ok((weights, values))
}

/// Mean cross-entropy of `targets` under `logits / temperature` ([n, vocab] logits).
pub fn cross_entropy(logits: &Tensor, targets: &[u32], temperature: f64) -> Result<Tensor> {
    let target = Tensor::new(targets, logits.device())?;
    Ok(candle_nn::loss::cross_entropy(&(logits / temperature)?, &target)?)
}
