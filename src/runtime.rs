//! A ready-to-use language model: weights, tokenizer and chat template resolved from an
//! alias, a GGUF file or a Hugging Face folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use crate::catalog;
use crate::model::generate::{generate, GenerateConfig, Request, Sampling, StopReason};
use crate::model::weights::WeightSource;
use crate::model::{Model, ModelConfig, Precision};
use crate::tokenizer::{read_json, ChatTemplate, SystemTurn, Tokenizer};

/// A model ready to use: weights, tokenizer, chat template, and the file they came from.
pub struct LanguageModel {
    /// The transformer.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (None: a base model, unless one is given).
    pub chat: Option<ChatTemplate>,
    /// The file or folder the weights came from.
    pub path: PathBuf,
}

/// How a model is opened.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// A Jinja chat template file that replaces (or supplies) the model's own.
    pub chat_template: Option<PathBuf>,
    /// The arithmetic of decoding, prefill and scoring.
    pub precision: Precision,
}

impl LanguageModel {
    /// `spec` is a catalog alias (fetched on first use), a GGUF file or a model folder.
    pub fn open(spec: &str, opts: &OpenOptions, log: &mut dyn FnMut(&str)) -> Result<Self> {
        crate::model::kernels::isa::check_env()?;
        keep_freed_memory();
        let device = Device::Cpu;
        let path = resolve(spec, log)?;
        let (model, tokenizer, own_template) = if path.is_dir() {
            open_hf_dir(&path, &device, opts.precision)?
        } else {
            open_gguf(&path, &device, opts.precision)?
        };
        // An id past the embedding would fail deep inside the first forward pass.
        if tokenizer.id_bound() > model.cfg.vocab_size {
            bail!(
                "{}: the tokenizer has ids up to {} but the model's embedding has {} rows (vocab_size)",
                path.display(),
                tokenizer.id_bound() - 1,
                model.cfg.vocab_size
            );
        }
        let source = match &opts.chat_template {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read chat template {}", p.display()))?,
            ),
            None => own_template,
        };
        let chat = match source {
            Some(src) => {
                Some(ChatTemplate::new(&src, tokenizer.bos.as_deref(), tokenizer.eos.as_deref())?)
            }
            None => None,
        };
        Ok(LanguageModel { model, tokenizer, chat, path })
    }

    /// The chat text of one user turn after `system`, ready for the reply.
    pub fn chat_text(&self, system: &SystemTurn, user: &str) -> Result<String> {
        let Some(chat) = &self.chat else {
            bail!(
                "{} has no chat template; pass one with --chat-template FILE",
                self.path.display()
            );
        };
        chat.render_turn(system, user)
    }

    /// Prompt ids for one user turn after `system`, ready for the reply.
    pub fn chat_ids(&self, system: &SystemTurn, user: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(&self.chat_text(system, user)?, false)?;
        self.check_context(ids.len())?;
        Ok(ids)
    }

    /// An error when `n_tokens` do not fit the model's context.
    pub fn check_context(&self, n_tokens: usize) -> Result<()> {
        let limit = self.model.cfg.context();
        if n_tokens >= limit {
            bail!("the prompt has {n_tokens} tokens but the model's context holds {limit}");
        }
        Ok(())
    }

    /// Generation settings with this model's stop tokens.
    pub fn generate_config(&self, max_tokens: usize, sampling: Option<Sampling>) -> GenerateConfig {
        GenerateConfig {
            max_tokens,
            stop_ids: self.tokenizer.stop_ids.clone(),
            sampling,
            cancel: None,
        }
    }

    /// Replies to each prompt (ids), decoded to text.
    /// Replies to `prompts`, each with why it stopped.
    pub fn complete(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerateConfig,
    ) -> Result<Vec<(String, StopReason)>> {
        let requests = prompts
            .iter()
            .map(|ids| Request { prefix: Default::default(), ids: ids.clone() })
            .collect();
        generate(&self.model, requests, cfg)?
            .into_iter()
            .map(|g| Ok((self.tokenizer.decode(&g.ids)?, g.stop)))
            .collect()
    }
}

fn resolve(spec: &str, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    if let Some(entry) = catalog::find(spec) {
        return entry.ensure(log);
    }
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let aliases: Vec<&str> = catalog::CATALOG.iter().map(|e| e.alias).collect();
    bail!(
        "model '{spec}' is neither a known alias ({}) nor an existing GGUF file or model folder",
        aliases.join(", ")
    )
}

fn open_gguf(
    path: &Path,
    device: &Device,
    precision: Precision,
) -> Result<(Model, Tokenizer, Option<String>)> {
    let source = WeightSource::open_gguf(path)?;
    let WeightSource::Gguf { content, .. } = &source else { unreachable!() };
    let cfg = ModelConfig::from_gguf(content).with_context(|| format!("{}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(content).with_context(|| format!("{}", path.display()))?;
    let template =
        content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok().cloned());
    let model = Model::load(&source, cfg, DType::F32, device, precision)
        .with_context(|| format!("{}", path.display()))?;
    Ok((model, tokenizer, template))
}

fn open_hf_dir(
    dir: &Path,
    device: &Device,
    precision: Precision,
) -> Result<(Model, Tokenizer, Option<String>)> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        bail!("{}: model folder has no config.json", dir.display());
    }
    let cfg = ModelConfig::from_hf_json(&read_json(&config_path)?)
        .with_context(|| format!("{}", config_path.display()))?;
    let tok_config_path = dir.join("tokenizer_config.json");
    let tok_config =
        if tok_config_path.exists() { Some(read_json(&tok_config_path)?) } else { None };
    let tokenizer = Tokenizer::from_hf_dir(dir, tok_config.as_ref())?;
    let template = match tok_config.as_ref().and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Some(s.clone()),
        // Several named templates: the default one.
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    let source = WeightSource::open_safetensors(dir, cfg.arch)?;
    let model = Model::load(&source, cfg, DType::F32, device, precision)
        .with_context(|| format!("{}", dir.display()))?;
    Ok((model, tokenizer, template))
}

/// Every pass allocates and frees activations of megabytes per layer. glibc gives freed
/// memory back to the kernel (trimming the heap top, unmapping large chunks), so the next
/// pass page-faults it in again, zeroed: a quarter of a Qwen gradient pass was the kernel
/// clearing pages. The mmap threshold at its ceiling and trimming turned off (-1, as
/// mallopt(3) documents; its largest positive value, 2 GiB, is less than what a Qwen
/// gradient pass over a 512-token reasoning frees at its end) keep freed memory for reuse;
/// the peak is unchanged (memory is reused, not added). One arena for all threads: the
/// passes run on rayon's threads ([`crate::model::on_pool`]), and with an arena per thread
/// each would keep its own freed memory (a larger resident size, and slower steps in
/// `cargo bench --bench step`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // glibc's ceiling for the mmap threshold on 64-bit targets: 4 Mi x sizeof(long).
        const MAX_MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets allocator parameters; glibc takes its own locks.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        });
    }
}

/// After each of its parallel ops, candle's worker thread spins for up to 25,000 rounds
/// before it sleeps. The few-row products run on rayon's threads in between, so with as many
/// threads as cores that spinning takes a core from them (a profile of an evaluation shows
/// it). Call at the start of a program, before any other thread; a value the user set is
/// kept.
pub fn stop_candle_spinning() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}
