//! Rebuilds a Hugging Face `tokenizer.json` from the vocabulary llama.cpp stores in GGUF
//! metadata, so both model formats tokenize through the same `tokenizers` machinery.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::{json, Value};

const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// GPT-2's word-splitting expression, shared by several pre-tokenizer types.
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split expressions applied in order before byte-level mapping, per `tokenizer.ggml.pre`
/// (the same table llama.cpp keeps).
fn byte_level_splits(pre: &str) -> Result<Vec<&'static str>> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => vec![GPT2_SPLIT],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => vec![r"\p{N}", GPT2_SPLIT],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2_SPLIT],
        "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx" => vec![LLAMA3_SPLIT],
        other => bail!(
            "unsupported byte-level pre-tokenizer '{other}' (supported: default, gpt2, smollm, starcoder, qwen2, llama-bpe); load the model's Hugging Face folder instead"
        ),
    })
}

pub struct GgufVocab {
    /// A serialized `tokenizer.json`.
    pub tokenizer_json: String,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
}

fn md<'a>(content: &'a Content, key: &str) -> Option<&'a GgufValue> {
    content.metadata.get(key)
}

fn md_u32(content: &Content, key: &str) -> Option<u32> {
    md(content, key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|x| x as u32)))
}

fn md_bool(content: &Content, key: &str) -> Option<bool> {
    md(content, key).and_then(|v| v.to_bool().ok())
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>> {
    let values = md(content, key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_vec()
        .with_context(|| format!("{key} is not an array"))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().with_context(|| format!("{key} holds a non-string")))
        .collect()
}

fn number_array<T>(
    content: &Content,
    key: &str,
    conv: impl Fn(&GgufValue) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = md(content, key) else { return Ok(None) };
    let values = v.to_vec().with_context(|| format!("{key} is not an array"))?;
    values
        .iter()
        .map(|v| conv(v).with_context(|| format!("{key} holds a value of the wrong type")))
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

pub fn vocab_from_gguf(content: &Content) -> Result<GgufVocab> {
    let model = md(content, "tokenizer.ggml.model")
        .context("GGUF has no tokenizer (tokenizer.ggml.model is missing)")?
        .to_string()
        .context("tokenizer.ggml.model is not a string")?
        .clone();
    let tokens = string_array(content, "tokenizer.ggml.tokens")?;
    let types = number_array(content, "tokenizer.ggml.token_type", |v| v.to_i32().ok())?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        bail!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len());
    }
    let byte_level = match model.as_str() {
        "gpt2" => true,
        "llama" => false,
        other => bail!("unsupported GGUF tokenizer model '{other}' (supported: gpt2, llama)"),
    };
    let add_space_prefix =
        md_bool(content, "tokenizer.ggml.add_space_prefix").unwrap_or(!byte_level);
    let add_bos = md_bool(content, "tokenizer.ggml.add_bos_token").unwrap_or(!byte_level);
    let bos_id = md_u32(content, "tokenizer.ggml.bos_token_id");

    // The first occurrence of a duplicated string keeps it.
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        vocab.entry(tok.clone()).or_insert(json!(id));
    }
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, (tok, &t))| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": !byte_level && t == TOKEN_USER_DEFINED, "special": t == TOKEN_CONTROL})
        })
        .collect();

    let (merges, normalizer, pre_tokenizer, decoder) = if byte_level {
        let merges = string_array(content, "tokenizer.ggml.merges")?;
        let pre = md(content, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "default".into());
        let mut steps: Vec<Value> = byte_level_splits(&pre)?
            .into_iter()
            .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        steps.push(byte_level.clone());
        let normalizer =
            if pre.starts_with("qwen2") { json!({"type": "NFC"}) } else { Value::Null };
        (json!(merges), normalizer, json!({"type": "Sequence", "pretokenizers": steps}), byte_level)
    } else {
        let scores = number_array(content, "tokenizer.ggml.scores", |v| v.to_f32().ok())?
            .unwrap_or_else(|| (0..tokens.len()).map(|i| -(i as f32)).collect());
        let mut normalizers = Vec::new();
        if add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            json!(merges_from_scores(&tokens, &types, &scores)),
            json!({"type": "Sequence", "normalizers": normalizers}),
            Value::Null,
            json!({"type": "Sequence", "decoders": decoders}),
        )
    };
    let unk = md_u32(content, "tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize).cloned());
    let post_processor = match bos_id.and_then(|i| tokens.get(i as usize)) {
        Some(bos) if add_bos => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}
        }),
        _ => Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": if byte_level { Value::Null } else { json!(unk) },
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": !byte_level, "byte_fallback": !byte_level, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    Ok(GgufVocab {
        tokenizer_json: spec.to_string(),
        bos_id,
        eos_id: md_u32(content, "tokenizer.ggml.eos_token_id"),
        eot_id: md_u32(content, "tokenizer.ggml.eot_token_id"),
    })
}

/// SentencePiece vocabularies store scores, not merges. A piece that splits into two
/// pieces of the vocabulary yields that merge, ranked by the merged piece's score (the
/// conversion Hugging Face applies to llama and gemma tokenizers).
fn merges_from_scores(tokens: &[String], types: &[i32], scores: &[f32]) -> Vec<[String; 2]> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_NORMAL)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    let mut seen = HashSet::new();
    for (&piece, &id) in &index {
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                if seen.insert((li, ri)) {
                    merges.push((scores.get(id).copied().unwrap_or(0.0), id, li, ri));
                }
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, l, r)| [tokens[l].clone(), tokens[r].clone()]).collect()
}
