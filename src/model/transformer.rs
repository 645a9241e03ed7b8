//! The decoder: one forward pass shared by generation (fused, no-gradient kernels) and the
//! gradient pass (plain differentiable tensor ops), for every supported architecture.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use super::causal_softmax::causal_softmax;
use super::config::{Activation, Arch, ModelConfig, RopeStyle};
use super::decode_attention::DecodeAttention;
use super::fused_backward;
use super::kernels::bf16;
use super::kernels::few_rows;
use super::kernels::frozen_matmul::{frozen_matmul, FastWeight};
use super::kernels::int8::{self, InputBits, Int8Weight};
use super::weights::WeightSource;
use super::Precision;

/// Whether a forward pass must be differentiable. candle's fused softmax, RMSNorm and rotary
/// kernels are faster but record no backward op, so they silently cut the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Fused kernels, no gradient: generation, prefill and scoring.
    Fast,
    /// Every op records its backward: the gradient pass.
    Differentiable,
}

/// Keys and values of the positions a sequence has already seen, per layer.
///
/// Generation appends in place into buffers with spare room, so a step copies only the new
/// position. Cloning is cheap (tensors are reference counted) and safe: a clone sees only
/// positions `..len`, which later in-place appends never touch, and a clone copies the
/// buffers before its own first append.
#[derive(Debug, Default)]
pub struct KvCache {
    /// Per layer: keys and values [1, kv_heads, capacity, head_dim], and whether this cache
    /// may write into their spare room.
    layers: Vec<(Tensor, Tensor, bool)>,
    len: usize,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.iter().map(|(k, v, _)| (k.clone(), v.clone(), false)).collect(),
            len: self.len,
        }
    }
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the positions from `len` on; their keys stay in the spare room, overwritten
    /// by the next append.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends this layer's new keys/values and returns all of them. The differentiable
    /// pass concatenates (an in-place write would cut the gradient).
    fn extend(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
        pass: Pass,
    ) -> Result<(Tensor, Tensor)> {
        let (old, new) = (self.len, k.dim(2)?);
        let total = old + new;
        if layer == self.layers.len() {
            self.layers.push((k.narrow(2, 0, 0)?, v.narrow(2, 0, 0)?, false));
        }
        let (bk, bv, owned) = &mut self.layers[layer];
        if pass == Pass::Differentiable {
            *bk = Tensor::cat(&[&bk.narrow(2, 0, old)?, &k], 2)?;
            *bv = Tensor::cat(&[&bv.narrow(2, 0, old)?, &v], 2)?;
            *owned = false;
        } else {
            if !*owned || bk.dim(2)? < total {
                // Grow geometrically so appends stay amortised O(1) per position.
                let capacity = (2 * total).max(64);
                let grow = |b: &Tensor, fresh: &Tensor| -> Result<Tensor> {
                    let (_, h, _, d) = fresh.dims4()?;
                    let buf = Tensor::zeros((1, h, capacity, d), fresh.dtype(), fresh.device())?;
                    if old > 0 {
                        buf.slice_set(&b.narrow(2, 0, old)?.contiguous()?, 2, 0)?;
                    }
                    Ok(buf)
                };
                *bk = grow(bk, &k)?;
                *bv = grow(bv, &v)?;
                *owned = true;
            }
            bk.slice_set(&k.contiguous()?, 2, old)?;
            bv.slice_set(&v.contiguous()?, 2, old)?;
        }
        Ok((bk.narrow(2, 0, total)?, bv.narrow(2, 0, total)?))
    }
}

struct Linear {
    weight: Tensor,
    /// The weight's block integers, for products without a gradient (see [`FastWeight`]).
    fast: Option<FastWeight>,
    /// The gradient pass multiplies in bf16 (the `mixed` precision on a CPU that has it).
    bf16: bool,
    bias: Option<Tensor>,
}

impl Linear {
    /// `x`: [N, in] -> [N, out].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen_matmul(x, &self.weight, self.fast.as_ref(), self.bf16)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Per row of `x` [N, in], the index of its largest output (the first of equal ones).
    fn argmax(&self, x: &Tensor) -> Result<Vec<u32>> {
        if let (Some(FastWeight::Int8(w, InputBits::Sixteen)), None) = (&self.fast, &self.bias) {
            if x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
                return Ok(int8::argmax_sixteen(&x.flatten_all()?.to_vec1::<f32>()?, w));
            }
        }
        Ok(self.forward(x)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }
}

struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Tensor>,
    sliding: bool,
}

/// cos/sin of position x frequency, [max_positions, head_dim/2].
struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    /// Computed in f32 like the Hugging Face and candle references, so logits match them.
    fn new(
        cfg: &ModelConfig,
        theta: f64,
        linear_factor: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let n_pos = cfg.context();
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let base = 1.0 / (theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32);
                let factor = cfg.rope_freq_factors.get(i).copied().unwrap_or(1.0) as f32;
                base / factor / linear_factor as f32
            })
            .collect();
        let mut cos = Vec::with_capacity(n_pos * half);
        let mut sin = Vec::with_capacity(n_pos * half);
        for p in 0..n_pos {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTable {
            cos: Tensor::from_vec(cos, (n_pos, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n_pos, half), device)?.to_dtype(dtype)?,
        })
    }

    /// cos and sin at `positions`, shaped [batch, len, head_dim/2].
    fn at(&self, positions: &[u32], batch: usize) -> Result<(Tensor, Tensor)> {
        let n_pos = self.cos.dim(0)?;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= n_pos) {
            bail!("position {p} is beyond the model's context of {n_pos} tokens");
        }
        let idx = Tensor::new(positions, self.cos.device())?;
        let len = positions.len() / batch;
        let half = self.cos.dim(1)?;
        Ok((
            self.cos.index_select(&idx, 0)?.reshape((batch, len, half))?,
            self.sin.index_select(&idx, 0)?.reshape((batch, len, half))?,
        ))
    }
}

/// A decoder-only transformer of any supported family: embedding, blocks, final norm, head.
pub struct Model {
    /// Its shape and numerics.
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    rope_global: RopeTable,
    rope_local: Option<RopeTable>,
}

/// Names and shapes of every tensor an architecture needs (GGUF naming). `Option`al entries
/// may be absent from a file.
pub fn tensor_layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (d, hd, ff, v) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size);
    let (q_out, kv_out) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![v, d], true),
        ("output_norm.weight".to_string(), vec![d], true),
        ("output.weight".to_string(), vec![v, d], false),
    ];
    for i in 0..cfg.n_layers {
        let mut add = |name: &str, shape: Vec<usize>, required: bool| {
            out.push((format!("blk.{i}.{name}"), shape, required))
        };
        add("attn_norm.weight", vec![d], true);
        add("attn_q.weight", vec![q_out, d], true);
        add("attn_k.weight", vec![kv_out, d], true);
        add("attn_v.weight", vec![kv_out, d], true);
        add("attn_output.weight", vec![d, q_out], true);
        if cfg.arch.has_qkv_bias() {
            add("attn_q.bias", vec![q_out], true);
            add("attn_k.bias", vec![kv_out], true);
            add("attn_v.bias", vec![kv_out], true);
        }
        if cfg.arch.has_qk_norm() {
            add("attn_q_norm.weight", vec![hd], true);
            add("attn_k_norm.weight", vec![hd], true);
        }
        if cfg.arch.has_post_norms() {
            add("post_attention_norm.weight", vec![d], true);
            add("post_ffw_norm.weight", vec![d], true);
        }
        add("ffn_norm.weight", vec![d], true);
        add("ffn_gate.weight", vec![ff, d], true);
        add("ffn_up.weight", vec![ff, d], true);
        add("ffn_down.weight", vec![d, ff], true);
    }
    out
}

/// An f32 weight [n, k] without block integers in its file, quantised to 8-bit blocks for
/// the `mixed` precision (None when k is not a multiple of the block).
fn quantized(weight: &Tensor) -> Result<Option<Int8Weight>> {
    let (n, k) = weight.dims2()?;
    if !Int8Weight::fits(k) {
        return Ok(None);
    }
    let values = weight.flatten_all()?.to_vec1::<f32>()?;
    Ok(Some(Int8Weight::quantize(&values, n, k)))
}

/// Uniformly random weights (GGUF names) drawn from `seed`: norms near 1, the rest small.
#[cfg(feature = "testing")]
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut map = HashMap::new();
    for (name, shape, _) in tensor_layout(cfg) {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let values: Vec<f64> =
            (0..n)
                .map(|_| {
                    if is_norm {
                        rng.random_range(0.8..1.2)
                    } else {
                        rng.random_range(-0.15..0.15)
                    }
                })
                .collect();
        map.insert(name, Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?);
    }
    Ok(map)
}

impl Model {
    /// Loads the weights of `source` for `cfg` in `dtype` on `device`; `precision` chooses the products of passes without a gradient.
    pub fn load(
        source: &WeightSource,
        mut cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        // Integer copies only where a product can read them.
        let on_cpu = dtype == DType::F32 && device.is_cpu();
        let bits = precision.input_bits();
        let keep_packed = on_cpu && (few_rows::available() || bits.is_some());
        let layout = tensor_layout(&cfg);
        let (mut tensors, mut packs) = (HashMap::new(), HashMap::new());
        for (name, shape, required) in &layout {
            match source.get_packed(name, dtype, device, keep_packed)? {
                Some((t, _)) if t.dims() != shape => {
                    bail!(
                        "tensor '{name}' has shape {:?}, expected {:?} from the model config",
                        t.dims(),
                        shape
                    )
                }
                Some((t, packed)) => {
                    tensors.insert(name.clone(), t);
                    if let Some(p) = packed {
                        packs.insert(name.clone(), p);
                    }
                }
                None if *required => bail!("model file lacks tensor '{name}'"),
                None => {}
            }
        }
        // llama.cpp stores Llama 3's frequency scaling as a tensor rather than metadata.
        if let Some(f) = source.get("rope_freqs.weight", DType::F32, device)? {
            cfg.rope_freq_factors = f.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        }
        // The embedding's integers serve only a tied vocabulary head; unused ones go with `packs`.
        let mut linear = |name: &str, weight: Tensor, bias: Option<Tensor>| -> Result<Linear> {
            let packed = packs.remove(name);
            let fast = match bits {
                None => packed.map(|p| FastWeight::Exact(Arc::new(p))),
                Some(_) if !on_cpu => None,
                Some(bits) => match packed {
                    Some(p) => Some(FastWeight::Int8(
                        Arc::new(Int8Weight::from_packed(&p).for_kernel(int8::Kernel::best())),
                        bits,
                    )),
                    None => quantized(&weight)?.map(|w| FastWeight::Int8(Arc::new(w), bits)),
                },
            };
            Ok(Linear { weight, fast, bf16: bits.is_some() && on_cpu && bf16::available(), bias })
        };
        let mut take = |name: String| tensors.remove(&name);
        let embed = take("token_embd.weight".into()).context("embedding")?;
        let lm_head = match take("output.weight".into()) {
            Some(weight) => linear("output.weight", weight, None)?,
            None => linear("token_embd.weight", embed.clone(), None)?,
        };
        let final_norm = take("output_norm.weight".into()).context("final norm")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let mut t = |n: &str| take(format!("blk.{i}.{n}"));
            let mut lin = |n: &str| -> Result<Linear> {
                let name = format!("{n}.weight");
                let weight = t(&name).with_context(|| format!("blk.{i}.{name}"))?;
                linear(&format!("blk.{i}.{name}"), weight, t(&format!("{n}.bias")))
            };
            let (q, k, v, o) =
                (lin("attn_q")?, lin("attn_k")?, lin("attn_v")?, lin("attn_output")?);
            let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
            let mut t = |n: &str| take(format!("blk.{i}.{n}"));
            layers.push(Block {
                attn_norm: t("attn_norm.weight").context("attn_norm")?,
                q,
                k,
                v,
                o,
                q_norm: t("attn_q_norm.weight"),
                k_norm: t("attn_k_norm.weight"),
                post_attn_norm: t("post_attention_norm.weight"),
                ffn_norm: t("ffn_norm.weight").context("ffn_norm")?,
                gate,
                up,
                down,
                post_ffn_norm: t("post_ffw_norm.weight"),
                sliding: cfg.layer_is_sliding[i],
            });
        }
        let rope_global =
            RopeTable::new(&cfg, cfg.rope_theta, cfg.rope_linear_factor, dtype, device)?;
        let rope_local = match cfg.rope_local_theta {
            Some(theta) => Some(RopeTable::new(&cfg, theta, 1.0, dtype, device)?),
            None => None,
        };
        Ok(Model { cfg, embed, layers, final_norm, lm_head, rope_global, rope_local })
    }

    /// A model with the weights of [`random_weights`], for tests of the maths.
    #[cfg(feature = "testing")]
    pub fn random(cfg: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let weights = random_weights(&cfg, seed, dtype, device)?;
        Model::load(&WeightSource::Map(weights), cfg, dtype, device, Precision::F32)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }
    /// The dtype of the activations.
    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Rows of the input embedding matrix, [ids.len(), hidden].
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::new(ids, self.device())?;
        Ok(self.embed.index_select(&idx, 0)?)
    }

    /// Final-normed hidden states [batch, len, hidden] for input embeddings `x`
    /// [batch, len, hidden] (unscaled rows of the embedding matrix). Sequence `b` continues
    /// `caches[b]`, which grows by `len`.
    pub fn forward(&self, x: &Tensor, caches: &mut [KvCache], pass: Pass) -> Result<Tensor> {
        let (batch, len, hidden) = x.dims3()?;
        if caches.len() != batch {
            bail!("forward: {} caches for a batch of {batch}", caches.len());
        }
        let positions: Vec<u32> =
            caches.iter().flat_map(|c| (c.len..c.len + len).map(|p| p as u32)).collect();
        let rope_global = self.rope_global.at(&positions, batch)?;
        let rope_local = match &self.rope_local {
            Some(t) => Some(t.at(&positions, batch)?),
            None => None,
        };

        let mut h = x.reshape((batch * len, hidden))?;
        if let Some(scale) = self.cfg.embed_scale() {
            h = (h * scale)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let rope = match (&rope_local, layer.sliding) {
                (Some(local), true) => local,
                _ => &rope_global,
            };
            let a = self.norm(&h, &layer.attn_norm, pass)?;
            let attn = self.attention(layer, li, &a, batch, len, rope, caches, pass)?;
            let mut attn = layer.o.forward(&attn)?;
            if let Some(w) = &layer.post_attn_norm {
                attn = self.norm(&attn, w, pass)?;
            }
            h = (h + attn)?;
            let m = self.norm(&h, &layer.ffn_norm, pass)?;
            let gate = match self.cfg.activation {
                Activation::Silu => layer.gate.forward(&m)?.silu()?,
                Activation::GeluTanh => layer.gate.forward(&m)?.gelu()?,
            };
            let mut m = layer.down.forward(&(gate * layer.up.forward(&m)?)?)?;
            if let Some(w) = &layer.post_ffn_norm {
                m = self.norm(&m, w, pass)?;
            }
            h = (h + m)?;
        }
        for c in caches.iter_mut() {
            c.len += len;
        }
        Ok(self.norm(&h, &self.final_norm, pass)?.reshape((batch, len, hidden))?)
    }

    /// Continues sequence `b` of `caches` with `ids[b]`, all in one batched forward: shorter
    /// sequences are padded at their end and their caches cut back to their real length.
    /// Attention is causal and per sequence, so padding never reaches a real position.
    /// Returns each sequence's final-normed hidden states `[ids[b].len(), hidden]`.
    pub fn forward_ragged(&self, caches: &mut [KvCache], ids: &[&[u32]]) -> Result<Vec<Tensor>> {
        let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        if longest == 0 {
            let empty = Tensor::zeros((0, self.cfg.hidden_size), self.dtype(), self.device())?;
            return Ok(vec![empty; ids.len()]);
        }
        let padded: Vec<u32> = ids
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, longest - s.len())))
            .collect();
        let x = self.embed(&padded)?.reshape((ids.len(), longest, self.cfg.hidden_size))?;
        let hidden = self.forward(&x, caches, Pass::Fast)?;
        // The padding's keys stay in the buffers' spare room, overwritten by the next append.
        ids.iter()
            .zip(caches.iter_mut())
            .enumerate()
            .map(|(b, (s, cache))| {
                cache.truncate(cache.len - (longest - s.len()));
                Ok(hidden.get(b)?.narrow(0, 0, s.len())?)
            })
            .collect()
    }

    /// Next-token logits [n, vocab] for hidden states [n, hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// The most likely next token for each of hidden states [n, hidden]: the argmax of
    /// [`Model::logits`], without all of them where the head allows (see
    /// [`int8::argmax_sixteen`]; a soft cap is monotonic but can make unequal logits equal,
    /// which moves an argmax, so it takes the full logits).
    pub fn greedy_tokens(&self, hidden: &Tensor) -> Result<Vec<u32>> {
        match self.cfg.final_softcap {
            Some(_) => Ok(self.logits(hidden)?.argmax(D::Minus1)?.to_vec1::<u32>()?),
            None => self.lm_head.argmax(hidden),
        }
    }

    fn norm(&self, x: &Tensor, weight: &Tensor, pass: Pass) -> Result<Tensor> {
        let eps = self.cfg.rms_eps as f32;
        Ok(match (pass, fused_kernels(x)) {
            (Pass::Fast, true) => fused_backward::rms_norm_value(x, weight, eps)?,
            (Pass::Differentiable, true) => fused_backward::rms_norm(x, weight, eps)?,
            (_, false) => candle_nn::ops::rms_norm_slow(x, weight, eps)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Block,
        li: usize,
        x: &Tensor,
        batch: usize,
        len: usize,
        (cos, sin): &(Tensor, Tensor),
        caches: &mut [KvCache],
        pass: Pass,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let heads = |t: Tensor, n: usize, norm: &Option<Tensor>| -> Result<Tensor> {
            let t = t.reshape((batch, len, n, hd))?;
            let t = match norm {
                Some(w) => self.norm(&t, w, pass)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(layer.q.forward(x)?, cfg.n_heads, &layer.q_norm)?;
        let k = heads(layer.k.forward(x)?, cfg.n_kv_heads, &layer.k_norm)?;
        let v = heads(layer.v.forward(x)?, cfg.n_kv_heads, &None)?;
        let q = rope(&q, cos, sin, cfg.rope_style, pass)?;
        let k = rope(&k, cos, sin, cfg.rope_style, pass)?;

        let window = if layer.sliding { cfg.sliding_window } else { None };
        if pass == Pass::Fast && len == 1 && q.dtype() == DType::F32 && q.device().is_cpu() {
            let (mut keys, mut values) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
            for (b, cache) in caches.iter_mut().enumerate() {
                let (k_all, v_all) =
                    cache.extend(li, k.narrow(0, b, 1)?, v.narrow(0, b, 1)?, pass)?;
                keys.push(k_all);
                values.push(v_all);
            }
            let op = DecodeAttention {
                keys,
                values,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                scale: cfg.attn_scale as f32,
                softcap: cfg.attn_softcap.map(|c| c as f32),
                window,
            };
            return Ok(q.reshape((batch, cfg.n_heads, hd))?.apply_op1(op)?);
        }
        let n_rep = cfg.n_heads / cfg.n_kv_heads;
        let mut outputs = Vec::with_capacity(batch);
        // Each sequence attends over its own cache, so no padding enters any sum and a
        // sequence computes the same values alone or inside a batch.
        #[allow(clippy::needless_range_loop)] // b indexes the batch's rows and its caches
        for b in 0..batch {
            let past = caches[b].len;
            let (k_all, v_all) =
                caches[b].extend(li, k.narrow(0, b, 1)?, v.narrow(0, b, 1)?, pass)?;
            let k_all = k_all.squeeze(0)?;
            let v_all = v_all.squeeze(0)?;
            // Query heads sharing a key/value head are stacked along the row axis.
            let q_b = q.narrow(0, b, 1)?.reshape((cfg.n_kv_heads, n_rep * len, hd))?;
            let mut scores = (q_b.matmul(&k_all.t()?)? * cfg.attn_scale)?;
            if let Some(cap) = cfg.attn_softcap {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let probs = causal_softmax(&scores, past, len, window)?;
            let out = probs.matmul(&v_all)?; // [kv_heads, n_rep*len, hd]
            let out = out
                .reshape((cfg.n_heads, len, hd))?
                .transpose(0, 1)?
                .reshape((len, cfg.n_heads * hd))?;
            outputs.push(out);
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// The fused kernels (and the gradient re-attached to them) run on the CPU in f32 / f64;
/// elsewhere the plain tensor-op forms are used.
fn fused_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Rotary position embedding of `x` [batch, heads, len, head_dim] with cos/sin
/// [batch, len, head_dim/2]. The fused kernels are used only when no gradient is needed.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle, pass: Pass) -> Result<Tensor> {
    match (pass, fused_kernels(x)) {
        (Pass::Fast, true) => Ok(fused_backward::rope_kernel(x, cos, sin, style)?),
        (Pass::Differentiable, true) => Ok(fused_backward::rope(x, cos, sin, style)?),
        (_, false) => rope_plain(x, cos, sin, style),
    }
}

/// The rotary embedding as plain (differentiable) tensor ops, for devices and dtypes
/// without the fused kernel.
fn rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> Result<Tensor> {
    let (b, h, len, hd) = x.dims4()?;
    let half = hd / 2;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    match style {
        RopeStyle::Halves => {
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
        }
        RopeStyle::Interleaved => {
            let x = x.reshape((b, h, len, half, 2))?;
            let x1 = x.narrow(D::Minus1, 0, 1)?;
            let x2 = x.narrow(D::Minus1, 1, 1)?;
            let cos = cos.unsqueeze(D::Minus1)?;
            let sin = sin.unsqueeze(D::Minus1)?;
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Ok(Tensor::cat(&[r1, r2], D::Minus1)?.reshape((b, h, len, hd))?)
        }
    }
}

impl Arch {
    /// A tiny configuration of this architecture, for random-weight tests.
    #[cfg(feature = "testing")]
    pub fn tiny_config(self) -> ModelConfig {
        let gemma = self.is_gemma();
        ModelConfig {
            arch: self,
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rms_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_local_theta: (self == Arch::Gemma3).then_some(100.0),
            rope_freq_factors: Vec::new(),
            rope_linear_factor: 1.0,
            rope_style: if self == Arch::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Halves
            },
            max_position: 64,
            sliding_window: gemma.then_some(3),
            layer_is_sliding: if gemma { vec![true, false] } else { vec![false, false] },
            attn_softcap: (self == Arch::Gemma2).then_some(5.0),
            final_softcap: (self == Arch::Gemma2).then_some(3.0),
            attn_scale: 1.0 / (8f64).sqrt(),
            activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain-op rotary embedding (used off the CPU) equals candle's fused kernels.
    #[test]
    fn plain_rope_matches_the_fused_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 4), &dev).unwrap();
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            let fused = rope(&x, &cos, &sin, style, Pass::Fast).unwrap();
            let plain = rope_plain(&x, &cos, &sin, style).unwrap();
            let diff = (fused - plain)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{style:?}: {diff}");
        }
    }
}
