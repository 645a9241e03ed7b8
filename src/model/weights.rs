//! Where a model's tensors come from: a GGUF file (dequantised), safetensors shards, or an
//! in-memory map (random test models). Tensors are addressed by their GGUF names.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::Arch;
use super::kernels::packed::PackedWeight;

/// Where a model's tensors come from.
pub enum WeightSource {
    /// A GGUF file.
    Gguf {
        /// The file's path, for messages.
        path: PathBuf,
        /// Its header: metadata and where each tensor lies.
        content: gguf_file::Content,
        /// The open file the tensors are read from.
        file: Mutex<File>,
    },
    /// A Hugging Face folder's safetensors shards, whose names are mapped to GGUF's.
    Safetensors {
        /// The family, which decides the name mapping and Gemma's norm offset.
        arch: Arch,
        /// The shards, memory-mapped.
        tensors: candle_core::safetensors::MmapedSafetensors,
    },
    /// Tensors in memory, by GGUF name (random test models).
    Map(HashMap<String, Tensor>),
}

/// candle's GGUF reader, whose panics on some malformed headers (an alignment of 0 divides
/// by zero) become errors instead of ending the process.
fn read_gguf_header(file: &mut File) -> Result<gguf_file::Content> {
    let mut magic = [0u8; 4];
    if std::io::Read::read_exact(file, &mut magic).is_err() || &magic != b"GGUF" {
        bail!("it does not start with the bytes GGUF");
    }
    std::io::Seek::rewind(file)?;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let read =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(file)));
    std::panic::set_hook(quiet);
    match read {
        Ok(Err(candle_core::Error::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            bail!("the file ends inside its header (truncated?)")
        }
        Ok(content) => Ok(content?),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned());
            bail!(
                "its header is malformed ({})",
                what.unwrap_or_else(|| "the reader stopped".into())
            )
        }
    }
}

impl WeightSource {
    /// Opens a GGUF file and checks that every tensor lies inside it, so a truncated
    /// download is reported up front rather than mid-load.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = read_gguf_header(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        let file_len = file.metadata()?.len();
        for (name, info) in &content.tensor_infos {
            let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let bytes = info.shape.elem_count() / block * type_size;
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                bail!(
                    "{}: truncated GGUF file: tensor '{name}' ends at byte {end} but the file has {file_len} bytes",
                    path.display()
                );
            }
        }
        Ok(WeightSource::Gguf { path: path.to_path_buf(), content, file: Mutex::new(file) })
    }

    /// Opens every `*.safetensors` file of a Hugging Face folder.
    pub fn open_safetensors(dir: &Path, arch: Arch) -> Result<Self> {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read model folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("{}: no *.safetensors files in the model folder", dir.display());
        }
        // SAFETY: the files are memory-mapped read-only; greater never writes them.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&shards) }
            .with_context(|| format!("{}: cannot read safetensors", dir.display()))?;
        Ok(WeightSource::Safetensors { arch, tensors })
    }

    /// The tensor stored under a GGUF name, as `dtype`, or None when the file lacks it.
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        Ok(self.get_packed(name, dtype, device, false)?.map(|(t, _)| t))
    }

    /// [`Self::get`], and with `pack` also the tensor's packed integers when it is a GGUF
    /// matrix in a format [`PackedWeight`] keeps, both from one read of the file.
    pub fn get_packed(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        pack: bool,
    ) -> Result<Option<(Tensor, Option<PackedWeight>)>> {
        let (tensor, packed) = match self {
            WeightSource::Gguf { path, content, file } => {
                if !content.tensor_infos.contains_key(name) {
                    return Ok(None);
                }
                let mut file = file.lock().expect("GGUF file lock poisoned");
                let q = content
                    .tensor(&mut *file, name, device)
                    .with_context(|| format!("{}: cannot read tensor '{name}'", path.display()))?;
                let packed = match q.shape().dims2() {
                    Ok((n, k)) if pack => PackedWeight::from_ggml(q.dtype(), n, k, &q.data()?)
                        .with_context(|| format!("{}: tensor '{name}'", path.display()))?,
                    _ => None,
                };
                (q.dequantize(device)?, packed)
            }
            WeightSource::Safetensors { arch, tensors } => {
                let hf = hf_name(name, *arch);
                let candidates = [hf.clone(), format!("language_model.{hf}")];
                let Some(found) = candidates.iter().find(|n| tensors.get(n).is_ok()) else {
                    return Ok(None);
                };
                let t = tensors.load(found, device)?;
                if arch.is_gemma() && name.ends_with("norm.weight") {
                    // Gemma's RMSNorm multiplies by (1 + w); GGUF files store 1 + w already.
                    ((t.to_dtype(DType::F32)? + 1.0)?, None)
                } else {
                    (t, None)
                }
            }
            WeightSource::Map(map) => match map.get(name) {
                Some(t) => (t.clone(), None),
                None => return Ok(None),
            },
        };
        Ok(Some((tensor.to_dtype(dtype)?, packed)))
    }
}

/// Hugging Face tensor name for a GGUF tensor name.
pub fn hf_name(gguf: &str, arch: Arch) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let (module, suffix) = rest.split_once('.').unwrap_or((rest, ""));
    let hf_module = match (module, arch.has_post_norms()) {
        ("attn_norm", _) => "input_layernorm",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("ffn_norm", false) => "post_attention_layernorm",
        ("ffn_norm", true) => "pre_feedforward_layernorm",
        ("post_attention_norm", _) => "post_attention_layernorm",
        ("post_ffw_norm", _) => "post_feedforward_layernorm",
        (other, _) => other,
    };
    format!("model.layers.{layer}.{hf_module}.{suffix}")
}
