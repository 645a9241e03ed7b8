//! Tokenizer (from `tokenizer.json` or GGUF metadata) and the model's chat template.

pub mod budget;
pub mod chat;
mod gguf;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Content;
use serde_json::Value;

pub use budget::BudgetedAlloc;
pub use chat::{ChatTemplate, Message, SystemTurn};

/// Token strings that end an assistant turn in common chat formats.
const END_OF_TURN: &[&str] =
    &["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "<|end_of_text|>"];

/// A tokenizer with what generation and layouts need: BOS/EOS, stop ids, special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The beginning-of-sequence text, when the model has one.
    pub bos: Option<String>,
    /// The end-of-sequence text, when the model has one.
    pub eos: Option<String>,
    /// Ids that end generation: EOS, end of turn.
    pub stop_ids: Vec<u32>,
    special_ids: HashSet<u32>,
}

impl Tokenizer {
    /// One more than the largest id the tokenizer can produce (added tokens included).
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab(true).values().max().map_or(0, |&id| id as usize + 1)
    }
}

fn tokenizer_error(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("tokenizer: {e}")
}

impl Tokenizer {
    fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<String>,
        eos: Option<String>,
        extra_stop: &[u32],
    ) -> Self {
        let special_ids: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut stop_ids: Vec<u32> = eos
            .iter()
            .map(String::as_str)
            .chain(END_OF_TURN.iter().copied())
            .filter_map(|t| inner.token_to_id(t))
            .chain(extra_stop.iter().copied())
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Tokenizer { inner, bos, eos, stop_ids, special_ids }
    }

    /// The tokenizer llama.cpp describes in GGUF metadata.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let v = gguf::vocab_from_gguf(content)?;
        let inner = tokenizers::Tokenizer::from_bytes(v.tokenizer_json.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot build the tokenizer from GGUF metadata: {e}"))?;
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let (bos, eos) = (name(v.bos_id), name(v.eos_id));
        let extra: Vec<u32> = v.eos_id.into_iter().chain(v.eot_id).collect();
        Ok(Self::new(inner, bos, eos, &extra))
    }

    /// `tokenizer.json`, with BOS/EOS named by `tokenizer_config.json` when present.
    pub fn from_hf_dir(dir: &Path, config: Option<&Value>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let token = |key: &str| -> Option<String> {
            let v = config?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        Ok(Self::new(inner, bos, eos, &[]))
    }

    /// Token ids of `text`. Special-token strings in the text (as a chat template writes
    /// them) become their ids; `add_special` adds what the tokenizer adds itself (BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(tokenizer_error)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` where it continues a longer text: no space prefix of its own (which a
    /// SentencePiece tokenizer adds at the start of every encoding). The text is encoded after
    /// a newline, which merges with nothing that follows it, and the newline's ids are dropped.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let anchor = self.encode("\n", false)?;
        let ids = self.encode(&format!("\n{text}"), false)?;
        match ids.strip_prefix(anchor.as_slice()) {
            Some(rest) => Ok(rest.to_vec()),
            None => self.encode(text, false),
        }
    }

    /// Text of `ids` where they continue a longer text (the inverse of
    /// [`Self::encode_continuation`]: a SentencePiece decoder would drop their leading space).
    pub fn decode_continuation(&self, ids: &[u32]) -> Result<String> {
        let anchor = self.encode("\n", false)?;
        let anchor_text = self.decode_with_special(&anchor)?;
        let text = self.decode_with_special(&[&anchor[..], ids].concat())?;
        text.strip_prefix(anchor_text.as_str())
            .map_or_else(|| self.decode_with_special(ids), |t| Ok(t.to_string()))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    /// Text of `ids` with special tokens written out.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tokenizer_error)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The id of a whole token's text, when the vocabulary has it.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.inner.token_to_id(piece)
    }
}

/// Reads a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}
