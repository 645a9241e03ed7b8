//! Shared by the tests that need a real model: each test binary opens it once.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};
use greater::model::transformer::random_weights;
use greater::model::weights::WeightSource;
use greater::model::{Arch, Model, Precision};
use greater::runtime::{LanguageModel, OpenOptions};

/// SmolLM2-135M-Instruct, fetched into the cache on first use.
pub fn smollm2() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        LanguageModel::open("smollm2-135m", &OpenOptions::default(), &mut |m| eprintln!("{m}"))
            .expect("smollm2-135m loads")
    })
}

/// A fixed English text for logits comparisons.
pub const PARITY_TEXT: &str = "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon, \
and Neil Armstrong became the first person to walk on its surface. Scientists still study the rocks \
the astronauts brought back, because they tell us how the Moon formed, how old it is, and what the early solar system was like.";

/// 40 byte-level tokens: letters, digits, a space, punctuation, one merge, an end token.
pub fn tiny_vocab() -> Vec<String> {
    let mut v: Vec<String> = ('a'..='z').chain('0'..='9').map(String::from).collect();
    v.extend(["Ġ", ".", "ab", "<|end|>"].map(String::from));
    v
}

/// Every byte as a GPT-2 byte-level token, one merge ("ab"), and an end token: any text
/// tokenizes.
pub fn byte_vocab() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    let mut v: Vec<String> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect();
    v.extend(["ab", "<|end|>"].map(String::from));
    v
}

pub const TINY_TEMPLATE: &str = "{% for m in messages %}{{ m.content }}{% endfor %}";

/// A tiny llama GGUF with f32 random weights, a byte-level vocabulary whose last token is
/// the end token, and (optionally) a chat template. Returns the same model built in memory.
pub fn write_tiny_gguf(
    path: &Path,
    arch: &str,
    with_template: bool,
    vocab: Vec<String>,
    context: usize,
) -> Model {
    let n = vocab.len();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let tokenizer = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), strings(vocab)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [vec![1i32; n - 1], vec![3]].concat().into_iter().map(Value::I32).collect(),
            ),
        ),
        ("tokenizer.ggml.merges".into(), strings(vec!["a b".into()])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(n as u32 - 1)),
    ];
    write_gguf_with_tokenizer(path, arch, with_template, n, tokenizer, context)
}

/// A tiny llama GGUF with a SentencePiece vocabulary that adds a space prefix, as Llama 2
/// and Mistral do: `<unk> <s> </s>`, the 256 byte pieces, `▁`, letters, `.` and `,`, and
/// a few merged pieces (`▁t`, `he`, `▁the`, `▁Use`).
pub fn write_tiny_sentencepiece_gguf(path: &Path) -> Model {
    let mut pieces: Vec<(String, i32)> =
        vec![("<unk>".into(), 2), ("<s>".into(), 3), ("</s>".into(), 3)];
    pieces.extend((0..256).map(|b| (format!("<0x{b:02X}>"), 6)));
    pieces.push(("\u{2581}".into(), 1));
    pieces.extend(('a'..='z').chain('A'..='Z').chain(".,'".chars()).map(|c| (c.to_string(), 1)));
    pieces.extend(
        ["\u{2581}t", "he", "\u{2581}the", "\u{2581}U", "se", "\u{2581}Use"]
            .map(|p| (p.to_string(), 1)),
    );
    let n = pieces.len();
    // Scores: merged pieces above single ones, so merges happen.
    let scores: Vec<Value> =
        pieces.iter().map(|(p, _)| Value::F32(p.chars().count() as f32)).collect();
    let tokenizer = vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(pieces.iter().map(|(p, _)| Value::String(p.clone())).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(pieces.iter().map(|&(_, t)| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    write_gguf_with_tokenizer(path, "llama", true, n, tokenizer, 512)
}

fn write_gguf_with_tokenizer(
    path: &Path,
    arch: &str,
    with_template: bool,
    vocab_size: usize,
    tokenizer: Vec<(String, Value)>,
    context: usize,
) -> Model {
    let mut cfg = Arch::Llama.tiny_config();
    cfg.vocab_size = vocab_size;
    cfg.max_position = context;
    let device = Device::Cpu;
    let weights = random_weights(&cfg, 11, DType::F32, &device).unwrap();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), Value::U32(cfg.n_layers as u32)),
        (format!("{arch}.embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(cfg.n_heads as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(cfg.n_kv_heads as u32)),
        (format!("{arch}.attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps as f32)),
        (format!("{arch}.context_length"), Value::U32(cfg.max_position as u32)),
    ];
    md.extend(tokenizer);
    if with_template {
        md.push(("tokenizer.chat_template".into(), Value::String(TINY_TEMPLATE.into())));
    }
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
    Model::load(&WeightSource::Map(weights), cfg, DType::F32, &device, Precision::F32).unwrap()
}
