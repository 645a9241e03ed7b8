//! Batched decoding with a KV cache: greedy by default, seeded temperature / top-p sampling
//! on request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::on_pool;
use super::transformer::{KvCache, Model, Pass};

/// Seeded sampling: temperature, then nucleus (top-p).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax.
    pub temperature: f64,
    /// Mass of the most likely tokens kept.
    pub top_p: f64,
    /// Seed of the first sequence's draws (sequence i uses seed + i).
    pub seed: u64,
}

/// How [`generate`] decodes.
#[derive(Debug, Clone, Default)]
pub struct GenerateConfig {
    /// Tokens each sequence may add.
    pub max_tokens: usize,
    /// Ids that end a sequence (EOS, end of turn); the stop id is not returned.
    pub stop_ids: Vec<u32>,
    /// None decodes greedily.
    pub sampling: Option<Sampling>,
    /// Checked before every decoding step: when set, generation fails with [`Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The error of a generation stopped through [`GenerateConfig::cancel`].
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation cancelled")
    }
}
impl std::error::Error for Cancelled {}

/// One sequence to continue: an optional already-computed prefix and the ids after it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Cache of the ids before `ids` (empty: start of sequence).
    pub prefix: KvCache,
    /// Ids to run after the prefix; generation continues after the last.
    pub ids: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// It produced a stop id.
    StopToken,
    /// It reached `max_tokens`.
    Budget,
    /// The model's context was full: the tokens made so far are kept.
    ContextLimit,
}

/// One sequence's continuation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The tokens generated, without the stop id.
    pub ids: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// The request's prefix and ids, then `ids[..fed]`: continue from here with `ids[fed..]`.
    pub cache: KvCache,
    /// How many of `ids` the cache holds.
    pub fed: usize,
    /// Final-normed hidden states of the request's ids, [ids.len(), hidden], from the
    /// prefill: what a caller needs of the request's own tokens without another forward.
    pub prefill: Tensor,
}

impl PartialEq for Generated {
    /// Same tokens and stop; caches are compared through what they were fed.
    fn eq(&self, other: &Self) -> bool {
        self.ids == other.ids && self.stop == other.stop && self.fed == other.fed
    }
}

/// Runs `ids` after `prefix` and returns the cache and the logits of the last position.
pub fn prefill(model: &Model, prefix: KvCache, ids: &[u32]) -> Result<(KvCache, Tensor)> {
    Ok(prefill_all(model, vec![Request { prefix, ids: ids.to_vec() }])?.remove(0))
}

/// Padded positions per batched forward of [`run_all`]: bounds the activations' memory.
const BATCH_TOKENS: usize = 4096;

/// Runs every request's ids after its prefix: the grown caches and each request's
/// final-normed hidden states [ids.len(), hidden], in request order. Requests of similar
/// length share one forward (see [`Model::forward_ragged`]), so a weight is read once per
/// batch rather than once per request.
pub fn run_all(model: &Model, requests: Vec<Request>) -> Result<Vec<(KvCache, Tensor)>> {
    on_pool(move || {
        let lens: Vec<usize> = requests.iter().map(|r| r.ids.len()).collect();
        let mut slots: Vec<Option<Request>> = requests.into_iter().map(Some).collect();
        let mut out: Vec<Option<(KvCache, Tensor)>> = (0..slots.len()).map(|_| None).collect();
        for batch in length_batches(&lens, BATCH_TOKENS) {
            let (mut caches, ids): (Vec<KvCache>, Vec<Vec<u32>>) = batch
                .iter()
                .map(|&i| slots[i].take().expect("each request runs once"))
                .map(|r| (r.prefix, r.ids))
                .unzip();
            let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
            let hidden = model.forward_ragged(&mut caches, &ids)?;
            for ((&i, cache), h) in batch.iter().zip(caches).zip(hidden) {
                out[i] = Some((cache, h));
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every request ran")).collect())
    })
}

/// Indices of sequences of lengths `lens` grouped for padded batches: shortest first, each
/// batch as many as fit `budget` padded positions (at least one).
pub fn length_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut batches = Vec::new();
    let mut rest = order.as_slice();
    while !rest.is_empty() {
        // Sorted by length, so the last of a batch is its longest.
        let mut n = 1;
        while n < rest.len() && (n + 1) * lens[rest[n]] <= budget {
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        batches.push(batch.to_vec());
        rest = tail;
    }
    batches
}

/// [`run_all`] for requests with ids: each request's cache and hidden states, and the
/// final-normed hidden states after the requests' last ids, [requests, hidden].
fn run_all_with_lasts(
    model: &Model,
    requests: Vec<Request>,
) -> Result<(Vec<(KvCache, Tensor)>, Tensor)> {
    if requests.iter().any(|r| r.ids.is_empty()) {
        bail!("cannot continue an empty prompt");
    }
    let ran = run_all(model, requests)?;
    if ran.is_empty() {
        let none = Tensor::zeros((0, model.cfg.hidden_size), model.dtype(), model.device())?;
        return Ok((ran, none));
    }
    let lasts = ran
        .iter()
        .map(|(_, h)| h.narrow(0, h.dim(0)? - 1, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((ran, Tensor::cat(&lasts, 0)?))
}

/// [`run_all`], keeping the cache and the next-token logits `[vocab]` after each request.
pub fn prefill_all(model: &Model, requests: Vec<Request>) -> Result<Vec<(KvCache, Tensor)>> {
    let (ran, lasts) = run_all_with_lasts(model, requests)?;
    if ran.is_empty() {
        return Ok(Vec::new());
    }
    let logits = model.logits(&lasts)?;
    ran.into_iter().enumerate().map(|(i, (cache, _))| Ok((cache, logits.get(i)?))).collect()
}

/// Continues every request, prefilled in batches and decoded together with the other
/// still-running ones. Padding and batch-mates never enter a request's sums, so its tokens
/// are the ones it would get alone.
pub fn generate(
    model: &Model,
    requests: Vec<Request>,
    cfg: &GenerateConfig,
) -> Result<Vec<Generated>> {
    on_pool(move || {
        let n = requests.len();
        let mut rngs: Vec<Option<ChaCha8Rng>> = (0..n)
            .map(|i| {
                cfg.sampling
                    .as_ref()
                    .map(|s| ChaCha8Rng::seed_from_u64(s.seed.wrapping_add(i as u64)))
            })
            .collect();
        let mut out: Vec<Generated> = Vec::with_capacity(n);
        // (request index, cache, next token) of the sequences still running.
        let mut running: Vec<(usize, KvCache, u32)> = Vec::with_capacity(n);
        let (ran, lasts) = run_all_with_lasts(model, requests)?;
        let firsts = match (ran.is_empty(), cfg.max_tokens) {
            (true, _) | (_, 0) => Vec::new(),
            _ => next_tokens(model, &lasts, cfg.sampling.as_ref(), &mut rngs)?,
        };
        for (i, (cache, prefill)) in ran.into_iter().enumerate() {
            out.push(Generated {
                ids: Vec::new(),
                stop: StopReason::Budget,
                cache: KvCache::default(),
                fed: 0,
                prefill,
            });
            if cfg.max_tokens == 0 {
                // Nothing to generate: the prompt is still fed, so the caller can continue it.
                out[i].cache = cache;
                continue;
            }
            running.push((i, cache, firsts[i]));
        }
        loop {
            running.retain_mut(|(i, cache, tok)| {
                let out = &mut out[*i];
                let stop = cfg.stop_ids.contains(tok);
                if !stop {
                    out.ids.push(*tok);
                }
                // The next token would sit past the last position the model has.
                let full = cache.len() >= model.cfg.context();
                if stop || out.ids.len() >= cfg.max_tokens || full {
                    out.stop = match (stop, out.ids.len() >= cfg.max_tokens) {
                        (true, _) => StopReason::StopToken,
                        (false, true) => StopReason::Budget,
                        (false, false) => StopReason::ContextLimit,
                    };
                    out.fed = out.ids.len() - usize::from(!stop);
                    out.cache = std::mem::take(cache);
                    return false;
                }
                true
            });
            if running.is_empty() {
                return Ok(out);
            }
            if cfg.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Cancelled.into());
            }
            let toks: Vec<u32> = running.iter().map(|r| r.2).collect();
            let x = model.embed(&toks)?.unsqueeze(1)?;
            let mut caches: Vec<KvCache> =
                running.iter_mut().map(|r| std::mem::take(&mut r.1)).collect();
            let hidden = model.forward(&x, &mut caches, Pass::Fast)?;
            let mut batch_rngs: Vec<Option<ChaCha8Rng>> =
                running.iter().map(|r| rngs[r.0].take()).collect();
            let next =
                next_tokens(model, &hidden.squeeze(1)?, cfg.sampling.as_ref(), &mut batch_rngs)?;
            for ((r, cache), (tok, rng)) in
                running.iter_mut().zip(caches).zip(next.into_iter().zip(batch_rngs))
            {
                r.1 = cache;
                r.2 = tok;
                rngs[r.0] = rng;
            }
        }
    })
}

/// Next token after each of final-normed hidden states [batch, hidden]: the most likely, or
/// drawn with row i's rng.
fn next_tokens(
    model: &Model,
    hidden: &Tensor,
    sampling: Option<&Sampling>,
    rngs: &mut [Option<ChaCha8Rng>],
) -> Result<Vec<u32>> {
    let Some(s) = sampling.filter(|s| s.temperature > 0.0) else {
        return model.greedy_tokens(hidden);
    };
    let logits = model.logits(hidden)?;
    let probs = candle_nn::ops::softmax_last_dim(&(logits.to_dtype(DType::F32)? / s.temperature)?)?;
    let rows = probs.to_vec2::<f32>()?;
    rows.iter()
        .zip(rngs.iter_mut())
        .map(|(row, rng)| {
            let rng = rng.as_mut().expect("sampling without an rng");
            Ok(sample_top_p(row, s.top_p, rng.random::<f32>()))
        })
        .collect()
}

/// Samples from the smallest set of most likely tokens whose mass reaches `top_p`,
/// using `u` in [0, 1) as the random draw.
pub fn sample_top_p(probs: &[f32], top_p: f64, u: f32) -> u32 {
    let mut order: Vec<u32> = (0..probs.len() as u32).collect();
    order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]).then(a.cmp(&b)));
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &t in &order {
        mass += probs[t as usize] as f64;
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let mut target = u as f64 * mass;
    for &t in &order[..kept] {
        target -= probs[t as usize] as f64;
        if target < 0.0 {
            return t;
        }
    }
    order[kept - 1]
}
