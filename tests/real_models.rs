//! Tests on the real offline models: logits against candle-transformers' independent
//! implementations, the `mixed16` head's greedy choice against its full logits, tokenizer
//! ids against an independent tokenizer, the chat template, and end-to-end generation
//! through the CLI.

mod common;

use std::process::Command;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use greater::catalog;
use greater::model::weights::hf_name;
use greater::model::{Arch, KvCache, Model, Pass, Precision};
use greater::runtime::{LanguageModel, OpenOptions};
use greater::tokenizer::{ChatTemplate, Message, SystemTurn};

const N_TOKENS: usize = 64;

/// Logits of our f32 model at every position of `ids`, in one pass.
fn our_logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = [KvCache::default()];
    let x = model.embed(ids).unwrap().unsqueeze(0).unwrap();
    let hidden = model.forward(&x, &mut cache, Pass::Fast).unwrap().squeeze(0).unwrap();
    model.logits(&hidden).unwrap().to_vec2().unwrap()
}

/// Logits of the reference, fed one token at a time (it returns the last position only).
fn reference_logits(ids: &[u32], mut step: Reference) -> Vec<Vec<f32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            let x = Tensor::new(&[id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            step(&x, pos).squeeze(0).unwrap().to_vec1().unwrap()
        })
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

/// Same argmax at every position and max |difference| below `tolerance`; returns the max.
fn assert_parity(ours: &[Vec<f32>], reference: &[Vec<f32>], tolerance: f32) -> f32 {
    let mut max_diff = 0f32;
    for (pos, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert_eq!(argmax(a), argmax(b), "argmax differs at position {pos}");
        for (x, y) in a.iter().zip(b) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    assert!(max_diff < tolerance, "max |logit difference| {max_diff} >= {tolerance}");
    max_diff
}

type Reference = Box<dyn FnMut(&Tensor, usize) -> Tensor>;

/// Compares our logits on the first 64 tokens of the parity text with a candle-transformers
/// model built from the same GGUF. Models other than SmolLM2 are checked when cached.
fn check_parity(
    alias: &str,
    build: impl FnOnce(gguf_file::Content, &mut std::fs::File) -> Reference,
) {
    let entry = catalog::find(alias).unwrap();
    if alias != "smollm2-135m" && !entry.is_cached() {
        eprintln!("SKIPPED: {alias} is not cached at {}", entry.path().display());
        return;
    }
    let lm =
        LanguageModel::open(alias, &OpenOptions::default(), &mut |m| eprintln!("{m}")).unwrap();
    let ids = lm.tokenizer.encode(common::PARITY_TEXT, false).unwrap();
    assert!(ids.len() >= N_TOKENS, "parity text has only {} tokens", ids.len());
    let ids = &ids[..N_TOKENS];
    // The reference dequantises every weight to f32 (candle reads this when it builds
    // its first matmul in a thread), so both sides compute in f32 from the same values.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let mut file = std::fs::File::open(&lm.path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let theirs = reference_logits(ids, build(content, &mut file));
    let max_diff = assert_parity(&our_logits(&lm.model, ids), &theirs, 1e-2);
    eprintln!("{alias}: max |logit difference| over {N_TOKENS} positions: {max_diff:.2e}");
}

#[test]
fn smollm2_logits_match_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    check_parity("smollm2-135m", |content, file| {
        let mut m = ModelWeights::from_gguf(content, file, &Device::Cpu).unwrap();
        Box::new(move |x, pos| m.forward(x, pos).unwrap())
    });
}

#[test]
fn qwen25_coder_logits_match_candle_quantized_qwen2() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    check_parity("qwen2.5-coder-0.5b", |content, file| {
        let mut m = ModelWeights::from_gguf(content, file, &Device::Cpu).unwrap();
        Box::new(move |x, pos| m.forward(x, pos).unwrap())
    });
}

/// candle's quantized_gemma3 uses SiLU in the MLP where Gemma uses GELU (tanh), so the
/// reference is candle-transformers' Hugging Face Gemma 3, fed the GGUF's dequantised
/// weights under their Hugging Face names (norms back to w - 1).
#[test]
fn gemma3_logits_match_candle_gemma3() {
    use candle_transformers::models::gemma3::{Config, Model as Gemma3};
    check_parity("gemma3-270m", |content, file| {
        let mut tensors = std::collections::HashMap::new();
        for name in content.tensor_infos.keys() {
            let t =
                content.tensor(file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            let t = if name.ends_with("norm.weight") { (t - 1.0).unwrap() } else { t };
            tensors.insert(hf_name(name, Arch::Gemma3), t);
        }
        let cfg: Config = serde_json::from_value(serde_json::json!({
            "attention_bias": false, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
            "num_hidden_layers": 18, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "vocab_size": 262_144,
            "final_logit_softcapping": null, "attn_logit_softcapping": null,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
            "max_position_embeddings": 32_768
        }))
        .unwrap();
        let vb =
            candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
        let mut m = Gemma3::new(false, &cfg, vb).unwrap();
        Box::new(move |x, pos| m.forward(x, pos).unwrap().squeeze(0).unwrap())
    });
}

/// Multilingual, whitespace- and digit-heavy.
const TOKENIZER_TEXT: &str =
    "Hello world! Grüße aus Zürich, 12345 + 678 = 13023.\n\n  Indented   spaces\tand tabs; \
東京は日本の首都です。 Привет, мир! 3.14159 x 2^10 = 1024 🙂 don't isn't";

/// Recorded with `python3 scripts/reference_token_ids.py <SmolLM2 GGUF>` (Python `gguf` +
/// `tokenizers`, configured like SmolLM2's own tokenizer.json).
const SMOLLM2_REFERENCE_IDS: &[u32] = &[
    19556, 905, 17, 9171, 7170, 34878, 85, 253, 376, 1777, 7170, 5130, 28, 216, 33, 34, 35, 36, 37,
    1232, 216, 38, 39, 40, 446, 216, 33, 35, 32, 34, 35, 30, 8866, 1218, 6574, 256, 5600, 197, 397,
    29416, 43, 17097, 247, 126, 16736, 122, 7365, 124, 23274, 115, 40993, 26453, 180, 116, 240,
    180, 38466, 7365, 117, 39958, 19076, 5470, 249, 46879, 16464, 32547, 28, 41337, 7872, 9175, 17,
    216, 35, 30, 33, 36, 33, 37, 41, 1792, 216, 34, 78, 33, 32, 446, 216, 33, 32, 34, 36, 47526,
    1326, 982, 3247, 982,
];

#[test]
fn greedy_tokens_in_mixed16_are_the_argmax_of_its_full_logits() {
    // The head screens with 8-bit inputs and recomputes only the columns that could win;
    // every position of the parity text must pick what the full 16-bit head picks.
    let options = OpenOptions { precision: Precision::Mixed16, ..Default::default() };
    let lm = LanguageModel::open("smollm2-135m", &options, &mut |m| eprintln!("{m}")).unwrap();
    let ids = lm.tokenizer.encode(common::PARITY_TEXT, false).unwrap();
    let mut cache = [KvCache::default()];
    let x = lm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let hidden = lm.model.forward(&x, &mut cache, Pass::Fast).unwrap().squeeze(0).unwrap();
    let logits = lm.model.logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
    // The first of equal maxima, as candle's argmax and greedy decoding take it.
    let first_max =
        |row: &Vec<f32>| (0..row.len()).fold(0, |b, c| if row[c] > row[b] { c } else { b }) as u32;
    let want: Vec<u32> = logits.iter().map(first_max).collect();
    assert_eq!(lm.model.greedy_tokens(&hidden).unwrap(), want);
}

#[test]
fn smollm2_tokenizer_matches_reference_ids_and_round_trips() {
    let tok = &common::smollm2().tokenizer;
    let ids = tok.encode(TOKENIZER_TEXT, false).unwrap();
    assert_eq!(ids, SMOLLM2_REFERENCE_IDS);
    assert_eq!(tok.decode(&ids).unwrap(), TOKENIZER_TEXT);
    // Special tokens written in text become single ids; they end generation.
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!(
        tok.encode("a<|im_end|>", false).unwrap(),
        vec![tok.encode("a", false).unwrap()[0], im_end]
    );
    assert!(tok.stop_ids.contains(&im_end));
    assert!(tok.is_special(im_end));
}

#[test]
fn smollm2_chat_template_renders_two_turns_exactly() {
    let chat = common::smollm2().chat.as_ref().unwrap();
    let messages = [
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "4."),
        Message::new("user", "And 3+3?"),
    ];
    assert_eq!(
        chat.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n\
<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    );
    // A system turn replaces the default one; no generation prompt without the flag.
    let with_system = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
    assert_eq!(
        chat.render(&with_system, false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn cli_generate_answers_paris() {
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["generate", "--model", "smollm2-135m", "--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Paris"), "reply: {stdout}");
}

#[test]
fn cli_eval_writes_one_record_per_question_matching_the_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("eval.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args([
            "eval",
            "--model",
            "smollm2-135m",
            "--task",
            "arithmetic",
            "--train",
            "0",
            "--test",
            "5",
        ])
        .args(["--max-reasoning", "48", "--out", out_path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&out_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5);
    let correct = records.iter().filter(|r| r["correct"].as_bool().unwrap()).count();
    assert!(stdout.contains(&format!("({correct}/5)")), "{stdout}");
    assert!(stdout.contains(&format!("accuracy {:.3}", correct as f64 / 5.0)), "{stdout}");
    let cut = records.iter().filter(|r| r["cut_by_budget"].as_bool().unwrap()).count();
    assert!(stdout.contains(&format!("reasoning cut at the 48-token budget: {cut}/5")), "{stdout}");
    for r in &records {
        assert_eq!(r["prompt"], "Let's think step by step.");
        let tokens = r["reasoning_tokens"].as_u64().unwrap();
        assert!(tokens <= 48, "{tokens} reasoning tokens over a budget of 48");
        assert_eq!(r["cut_by_budget"].as_bool().unwrap(), tokens == 48, "{r}");
        let parsed = r["parsed_answer"].as_str();
        assert_eq!(r["correct"].as_bool().unwrap(), parsed == r["gold"].as_str());
        assert!(r["question"].as_str().unwrap().ends_with(" ="));
    }
}

#[test]
fn system_none_gives_chatml_turns_without_system_text_for_smollm2_and_qwen() {
    let user = "What is 2+2?. Use proper logical reasoning.";
    let bare = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    for alias in ["smollm2-135m", "qwen2.5-coder-0.5b"] {
        if alias != "smollm2-135m" && !catalog::find(alias).unwrap().is_cached() {
            eprintln!("SKIPPED: {alias} is not cached");
            continue;
        }
        let opened;
        let lm = if alias == "smollm2-135m" {
            common::smollm2()
        } else {
            opened = LanguageModel::open(alias, &OpenOptions::default(), &mut |_| {}).unwrap();
            &opened
        };
        let ids = |system: &str| lm.chat_ids(&system.parse().unwrap(), user).unwrap();
        assert_eq!(ids("none"), lm.tokenizer.encode(&bare, false).unwrap(), "{alias}: system none");
        let text = lm.chat_text(&SystemTurn::Template, user).unwrap();
        assert!(
            text.starts_with("<|im_start|>system\nYou are") && text.ends_with(&bare),
            "{alias}: {text:?}"
        );
        let own = format!("<|im_start|>system\nBe brief.<|im_end|>\n{bare}");
        assert_eq!(
            ids("Be brief."),
            lm.tokenizer.encode(&own, false).unwrap(),
            "{alias}: a system text"
        );
    }
}

#[test]
fn system_none_drops_a_llama3_default_system_turn_and_keeps_templates_without_one() {
    let llama3 = "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n\
Default text.<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
    let chat = ChatTemplate::new(llama3, Some("<|begin_of_text|>"), None).unwrap();
    assert_eq!(
        chat.render_turn(&SystemTurn::None, "Hi").unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // No default system turn, or no system role at all: the user-only rendering as it is.
    let plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}";
    let no_role = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\
<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}";
    for source in [plain, no_role] {
        let chat = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(
            chat.render_turn(&SystemTurn::None, "Hi").unwrap(),
            chat.render_turn(&SystemTurn::Template, "Hi").unwrap()
        );
    }
}

#[test]
fn a_chat_template_that_never_ends_errors_out_within_seconds() {
    let endless =
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}";
    let chat = ChatTemplate::new(endless, None, None).unwrap();
    let t = std::time::Instant::now();
    let err = chat.render_turn(&SystemTurn::Template, "Hi").unwrap_err().to_string();
    assert!(err.contains("cannot render the chat template") && err.contains("fuel"), "{err}");
    assert!(t.elapsed().as_secs() < 10);
}

#[global_allocator]
static ALLOC: greater::tokenizer::BudgetedAlloc = greater::tokenizer::BudgetedAlloc;

#[test]
fn a_chat_template_that_doubles_a_string_errors_out_instead_of_exhausting_memory() {
    let doubling = "{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(40) %}\
{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}";
    let chat = ChatTemplate::new(doubling, None, None).unwrap();
    let err = chat.render_turn(&SystemTurn::Template, "Hi").unwrap_err().to_string();
    assert!(err.contains("cannot render the chat template") && err.contains("MiB"), "{err}");
    // The same loop at a size that fits renders, so the budget is what stopped it.
    let fits = doubling.replace("range(40)", "range(10)");
    let chat = ChatTemplate::new(&fits, None, None).unwrap();
    assert_eq!(chat.render_turn(&SystemTurn::Template, "Hi").unwrap(), "16384");
}
