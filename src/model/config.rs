//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::Value;

/// The decoder families greater knows how to run and differentiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and Mistral.
    Llama,
    /// Qwen 2 and 2.5 (biases on q, k, v).
    Qwen2,
    /// Qwen 3 (norms on q and k).
    Qwen3,
    /// Gemma 2 (softcaps, post-norms, sliding windows).
    Gemma2,
    /// Gemma 3 (q/k norms, post-norms, local rotary base).
    Gemma3,
}

impl Arch {
    /// The names `from_name` accepts, for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, gemma2, gemma3";

    /// Maps a GGUF `general.architecture` or HF `model_type` to an [`Arch`].
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" | "gemma3_text" => Arch::Gemma3,
            other => {
                bail!("unsupported model architecture '{other}' (supported: {})", Arch::SUPPORTED)
            }
        })
    }

    /// Qwen 2 adds biases to the q, k and v projections.
    pub fn has_qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }
    /// RMS norms on each head's q and k.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }
    /// Gemma normalises the output of attention and of the MLP before the residual add.
    pub fn has_post_norms(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
    /// The Gemma family: scaled embeddings, GELU, norm weights stored as (w - 1).
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `j` pairs with `j + head_dim/2` (Hugging Face layout).
    Halves,
    /// Dimension `2j` pairs with `2j + 1`: llama.cpp permutes llama Q/K weights into this layout.
    Interleaved,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama, Qwen).
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// A model's shape and numerics, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The decoder family.
    pub arch: Arch,
    /// Rows of the embedding (and of the output head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Gemma 3 uses a different rotary base on its sliding-window layers.
    pub rope_local_theta: Option<f64>,
    /// Per-frequency divisors (Llama 3 long-context scaling); empty when unscaled.
    pub rope_freq_factors: Vec<f64>,
    /// Linear position scaling of the global layers (Gemma 3 large models).
    pub rope_linear_factor: f64,
    /// How rotary embeddings pair dimensions.
    pub rope_style: RopeStyle,
    /// Positions the model was trained for: generation stops there.
    pub max_position: usize,
    /// Attention window of the sliding layers.
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window (all false without one).
    pub layer_is_sliding: Vec<bool>,
    /// Softcap of the attention logits (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Softcap of the output logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Multiplier of q·k (usually 1/sqrt(head_dim)).
    pub attn_scale: f64,
    /// The MLP's gate activation.
    pub activation: Activation,
}

impl ModelConfig {
    /// Positions a sequence may use: the trained context, capped where the rotary tables
    /// would outgrow memory for the long-context models.
    pub fn context(&self) -> usize {
        self.max_position.min(1 << 15)
    }

    /// The factor embeddings are multiplied by (Gemma: sqrt(hidden_size)).
    pub fn embed_scale(&self) -> Option<f64> {
        self.arch.is_gemma().then(|| (self.hidden_size as f64).sqrt())
    }

    /// An error naming the first value no forward pass can use: sizes of 0, a norm epsilon or
    /// rotary base that is not a finite positive number, a softcap or scale that is not finite.
    fn check_values(&self) -> Result<()> {
        let sizes = [
            ("vocabulary size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("layer count", self.n_layers),
            ("head dimension", self.head_dim),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            bail!("invalid model: {name} is 0");
        }
        let positive = [
            ("norm epsilon (rms_norm_eps / layer_norm_rms_epsilon)", Some(self.rms_eps)),
            ("rotary base (rope_theta / rope.freq_base)", Some(self.rope_theta)),
            ("local rotary base (rope_local_base_freq)", self.rope_local_theta),
            ("rotary linear factor", Some(self.rope_linear_factor)),
            ("attention scale (query_pre_attn_scalar)", Some(self.attn_scale)),
            ("attention softcap (attn_logit_softcapping)", self.attn_softcap),
            ("final softcap (final_logit_softcapping)", self.final_softcap),
        ];
        for (name, value) in positive {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bail!("invalid model: {name} is {v}; it must be a finite number above 0");
            }
        }
        if let Some(f) = self.rope_freq_factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            bail!(
                "invalid model: a rotary frequency factor is {f}; they must be finite and above 0"
            );
        }
        Ok(())
    }

    /// Every `period`-th layer is global, the others slide (Gemma 3: period 6).
    fn sliding_pattern(n_layers: usize, period: usize) -> Vec<bool> {
        (0..n_layers).map(|i| (i + 1) % period != 0).collect()
    }

    /// Defaults shared by both file formats, then per-architecture adjustments.
    fn finish(mut self) -> Result<Self> {
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            bail!(
                "invalid attention heads: {} query heads, {} key/value heads",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head dimension {} is odd; rotary embeddings need it even", self.head_dim);
        }
        self.check_values()?;
        if self.layer_is_sliding.len() != self.n_layers {
            self.layer_is_sliding = match (self.arch, self.sliding_window) {
                (Arch::Gemma2, Some(_)) => (0..self.n_layers).map(|i| i % 2 == 0).collect(),
                (Arch::Gemma3, Some(_)) => Self::sliding_pattern(self.n_layers, 6),
                (_, Some(_)) => vec![true; self.n_layers],
                (_, None) => vec![false; self.n_layers],
            };
        }
        Ok(self)
    }

    /// Reads the `{arch}.*` keys llama.cpp writes.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .context("GGUF has no general.architecture")?
            .to_string()
            .context("general.architecture is not a string")?
            .clone();
        let arch = Arch::from_name(&arch_name)?;
        let p = &arch_name;
        let get_u = |k: &str| -> Result<Option<usize>> {
            match md.get(&format!("{p}.{k}")) {
                None => Ok(None),
                Some(v) => Ok(Some(
                    v.to_u64()
                        .or_else(|_| v.to_u32().map(u64::from))
                        .with_context(|| format!("{p}.{k} is not an integer"))?
                        as usize,
                )),
            }
        };
        let get_f = |k: &str| -> Result<Option<f64>> {
            match md.get(&format!("{p}.{k}")) {
                None => Ok(None),
                Some(v) => {
                    Ok(Some(v.to_f32().with_context(|| format!("{p}.{k} is not a float"))? as f64))
                }
            }
        };
        let need = |k: &str| -> Result<usize> {
            get_u(k)?.with_context(|| format!("GGUF metadata lacks {p}.{k}"))
        };
        let hidden_size = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let head_dim = get_u("attention.key_length")?.unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().context("tokenizer.ggml.tokens is not an array")?.len(),
            None => need("vocab_size")?,
        };
        let sliding_window = get_u("attention.sliding_window")?;
        let rope_theta = get_f("rope.freq_base")?.unwrap_or(10_000.0);
        ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            n_layers: need("block_count")?,
            n_heads,
            n_kv_heads: get_u("attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            rms_eps: get_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            rope_theta,
            rope_local_theta: (arch == Arch::Gemma3).then_some(10_000.0),
            rope_freq_factors: Vec::new(),
            rope_linear_factor: get_f("rope.scaling.factor")?.unwrap_or(1.0),
            // llama.cpp's converter permutes llama's Q/K rows for its interleaved rope kernel.
            rope_style: if arch == Arch::Llama {
                RopeStyle::Interleaved
            } else {
                RopeStyle::Halves
            },
            max_position: get_u("context_length")?.unwrap_or(4096),
            sliding_window,
            layer_is_sliding: Vec::new(),
            attn_softcap: get_f("attn_logit_softcapping")?,
            final_softcap: get_f("final_logit_softcapping")?,
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            activation: if arch.is_gemma() { Activation::GeluTanh } else { Activation::Silu },
        }
        .finish()
    }

    /// Reads a Hugging Face `config.json` (text models; Gemma 3's `text_config` is unwrapped).
    pub fn from_hf_json(json: &Value) -> Result<Self> {
        let json = json.get("text_config").filter(|t| t.is_object()).unwrap_or(json);
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .context("config.json has no model_type")?;
        let arch = Arch::from_name(model_type)?;
        let u = |k: &str| typed(json, k, "a whole number", |v| v.as_u64().map(|n| n as usize));
        let f = |k: &str| typed(json, k, "a number", Value::as_f64);
        let need = |k: &str| u(k)?.with_context(|| format!("config.json lacks {k}"));
        let hidden_size = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        let head_dim = u("head_dim")?.unwrap_or(hidden_size / n_heads.max(1));
        let n_layers = need("num_hidden_layers")?;
        let sliding_window = match arch {
            Arch::Llama | Arch::Gemma2 | Arch::Gemma3 => u("sliding_window")?,
            // Qwen configs carry a window that is only used when use_sliding_window is set.
            Arch::Qwen2 | Arch::Qwen3 => json
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .then(|| u("sliding_window"))
                .transpose()?
                .flatten(),
        };
        let layer_is_sliding = match json.get("layer_types").and_then(Value::as_array) {
            Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
            None => match u("sliding_window_pattern")? {
                Some(period) if sliding_window.is_some() => Self::sliding_pattern(n_layers, period),
                _ => Vec::new(),
            },
        };
        let rope_theta = f("rope_theta")?.unwrap_or(10_000.0);
        let (rope_freq_factors, rope_linear_factor) =
            rope_scaling_from_hf(json.get("rope_scaling"), rope_theta, head_dim)?;
        let activation = match json
            .get("hidden_activation")
            .or_else(|| json.get("hidden_act"))
            .and_then(Value::as_str)
        {
            Some("silu") | None if !arch.is_gemma() => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu") | None => Activation::GeluTanh,
            Some("silu") => Activation::Silu,
            Some(other) => bail!("unsupported activation '{other}' in config.json"),
        };
        let attn_scale = match f("query_pre_attn_scalar")? {
            Some(s) if arch.is_gemma() => 1.0 / s.sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        ModelConfig {
            arch,
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            n_layers,
            n_heads,
            n_kv_heads: u("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim,
            rms_eps: f("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_local_theta: (arch == Arch::Gemma3)
                .then(|| f("rope_local_base_freq").map(|v| v.unwrap_or(10_000.0)))
                .transpose()?,
            rope_freq_factors,
            rope_linear_factor,
            rope_style: RopeStyle::Halves,
            max_position: u("max_position_embeddings")?.unwrap_or(4096),
            sliding_window,
            layer_is_sliding,
            attn_softcap: f("attn_logit_softcapping")?,
            final_softcap: f("final_logit_softcapping")?,
            attn_scale,
            activation,
        }
        .finish()
    }
}

/// `json[k]` read by `read`: None when absent (or null), an error naming the key when present
/// with another type.
fn typed<T>(
    json: &Value,
    k: &str,
    what: &str,
    read: impl Fn(&Value) -> Option<T>,
) -> Result<Option<T>> {
    match json.get(k).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => {
            read(v).map(Some).with_context(|| format!("config.json: {k} is {v}, not {what}"))
        }
    }
}

/// Llama 3 "llama3" frequency scaling (per-frequency divisors) or plain linear scaling.
fn rope_scaling_from_hf(
    scaling: Option<&Value>,
    theta: f64,
    head_dim: usize,
) -> Result<(Vec<f64>, f64)> {
    let Some(s) = scaling.filter(|s| s.is_object()) else {
        return Ok((Vec::new(), 1.0));
    };
    let kind =
        s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str, d: f64| s.get(k).and_then(Value::as_f64).unwrap_or(d);
    match kind {
        "default" => Ok((Vec::new(), 1.0)),
        "linear" => Ok((Vec::new(), num("factor", 1.0))),
        "llama3" => {
            let factor = num("factor", 8.0);
            let low = num("low_freq_factor", 1.0);
            let high = num("high_freq_factor", 4.0);
            let old_ctx = num("original_max_position_embeddings", 8192.0);
            let factors = (0..head_dim / 2)
                .map(|i| {
                    let freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < old_ctx / high {
                        1.0
                    } else if wavelen > old_ctx / low {
                        factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            Ok((factors, 1.0))
        }
        other => bail!("unsupported rope_scaling type '{other}' in config.json"),
    }
}
