//! What the `mixed` and `mixed16` precisions change against `f32`, on the real models:
//! - logits of a 300-token prefill: the largest absolute difference, and how often the
//!   top token differs, per model;
//! - zero-shot CoT on 100 questions of object_counting and navigate (Qwen 0.5B, 256
//!   reasoning tokens): how many questions get the same answer, and both accuracies;
//! - a 10-step Qwen run (object_counting, 10 train, top-k 40, 256 reasoning tokens) on the
//!   f32 path: at each step the shortlist (top 3 by gradient) of the f32 step and that of
//!   the mixed model from the same prompt, the mixed one from its own reasoning (a shortlist
//!   the sentence-end rule cut short is compared over its length).
//!
//! Not a speed bench: it may run beside other work.
//!
//!     cargo bench --bench parity                  # all three parts, both precisions
//!     cargo bench --bench parity -- logits        # parts whose name contains "logits"
//!     cargo bench --bench parity -- "zero-shot mixed16"

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use greater::eval::{evaluate, EvalConfig};
use greater::model::{KvCache, Pass, Precision};
use greater::optimize::Optimizer;
use greater::runtime::{LanguageModel, OpenOptions};
use greater::settings::{OptimizeConfig, StartFrom};
use greater::tasks::{Count, Task, ZERO_SHOT_COT};
use greater::tokenizer::SystemTurn;

const QWEN: &str = "qwen2.5-coder-0.5b";
const TEXT: &str = "Alice, Bob and Claire are playing a game. At the start of the game, they are each \
holding a ball: Alice has a red ball, Bob has a blue ball, and Claire has a green ball. As the game \
progresses, pairs of players trade balls. First, Alice and Bob swap balls. Then, Bob and Claire swap \
balls. Finally, Alice and Claire swap balls. At the end of the game, which ball does Bob have? ";

fn open(alias: &str, precision: Precision) -> LanguageModel {
    LanguageModel::open(alias, &OpenOptions { precision, ..Default::default() }, &mut |m| {
        eprintln!("{m}")
    })
    .unwrap()
}

/// Logits [300, vocab] of a 300-token prefill.
fn prefill_logits(lm: &LanguageModel) -> Vec<Vec<f32>> {
    let ids = lm.tokenizer.encode(&TEXT.repeat(6), false).unwrap()[..300].to_vec();
    let x = lm.model.embed(&ids).unwrap().unsqueeze(0).unwrap();
    let hidden = lm.model.forward(&x, &mut [KvCache::default()], Pass::Fast).unwrap();
    lm.model.logits(&hidden.squeeze(0).unwrap()).unwrap().to_vec2().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// The precision's name on the command line.
fn name(p: Precision) -> String {
    format!("{p:?}").to_lowercase()
}

fn logits(alias: &str, precision: Precision) {
    let (f32_logits, mixed_logits) =
        (prefill_logits(&open(alias, Precision::F32)), prefill_logits(&open(alias, precision)));
    let mut max_diff = 0f32;
    let mut top_differs = 0;
    for (a, b) in f32_logits.iter().zip(&mixed_logits) {
        max_diff = a.iter().zip(b).fold(max_diff, |m, (x, y)| m.max((x - y).abs()));
        top_differs += (argmax(a) != argmax(b)) as usize;
    }
    let spread = f32_logits.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!(
        "{alias}: logits of a 300-token prefill, {} against f32: max abs difference {max_diff:.4} (largest |logit| {spread:.1}); top token differs at {top_differs} of 300 positions",
        name(precision)
    );
}

fn zero_shot(data: &Path, precision: Precision) {
    let (f32_lm, mixed_lm) = (open(QWEN, Precision::F32), open(QWEN, precision));
    let other = name(precision);
    for name in ["object_counting", "navigate"] {
        let (task, split) =
            Task::load_split(name, Some(data.to_path_buf()), 0, 1, (0, 0, Count::N(100))).unwrap();
        let test: Vec<_> = split.test.iter().map(|&i| &task.examples[i]).collect();
        let cfg = EvalConfig {
            batch: 50,
            max_reasoning: 256,
            connector: ". Use".into(),
            system: Default::default(),
            cancel: None,
        };
        let run = |lm: &LanguageModel| {
            evaluate(lm, &task, &test, ZERO_SHOT_COT, &cfg, &mut |_| {}).unwrap()
        };
        let (a, b) = (run(&f32_lm), run(&mixed_lm));
        let same = a
            .records
            .iter()
            .zip(&b.records)
            .filter(|(x, y)| x.parsed_answer == y.parsed_answer)
            .count();
        let same_reasoning =
            a.records.iter().zip(&b.records).filter(|(x, y)| x.reasoning == y.reasoning).count();
        println!(
            "{QWEN} zero-shot CoT, {name}, 100 test questions: same answer on {same}, same reasoning on {same_reasoning}; accuracy f32 {:.2}, {other} {:.2} ({:+.0} points); {:.0} s against {:.0} s",
            a.accuracy,
            b.accuracy,
            100.0 * (b.accuracy - a.accuracy),
            b.seconds,
            a.seconds
        );
    }
}

fn shortlists(data: &Path, precision: Precision) {
    let (f32_lm, mixed_lm) = (open(QWEN, Precision::F32), open(QWEN, precision));
    let other = name(precision);
    let (task, _) =
        Task::load_split("object_counting", Some(data.to_path_buf()), 0, 1, (10, 0, Count::N(0)))
            .unwrap();
    let train: Vec<_> = task.examples[..10].iter().collect();
    // The layout and start the recorded numbers were measured with.
    let cfg = OptimizeConfig {
        top_k: 40,
        max_reasoning: 256,
        system: SystemTurn::Template,
        start: StartFrom::Initial,
        ..OptimizeConfig::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let exact = Optimizer::new(&f32_lm, &task, &train, &cfg, stop.clone()).unwrap();
    let mixed = Optimizer::new(&mixed_lm, &task, &train, &cfg, stop).unwrap();
    let mut state = exact.initial_state(&[task.initial_prompt.as_str()]).unwrap();
    let (mut same, mut same_set) = (0, 0);
    for step in 1..=10 {
        let fresh = greater::records::State { reasoning: None, ..state.clone() };
        let mut got: Vec<u32> =
            mixed.shortlist(&fresh).unwrap().short.iter().map(|&(id, _)| id).collect();
        let record = exact.step(&mut state).unwrap();
        let want: Vec<u32> = record.token().unwrap().checked.iter().map(|c| c.id).collect();
        got.truncate(want.len());
        same += (got == want) as usize;
        let sorted = |v: &[u32]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        same_set += (sorted(&got) == sorted(&want)) as usize;
        let text = |s: &[u32]| {
            s.iter()
                .map(|&id| f32_lm.tokenizer.decode_with_special(&[id]).unwrap())
                .collect::<Vec<_>>()
        };
        println!("step {step}: f32 shortlist {:?}, {other} {:?}", text(&want), text(&got));
    }
    println!(
        "{QWEN} object_counting, 10 steps: the {other} shortlist holds the same tokens as f32's in {same_set} of 10, in the same order in {same}"
    );
}

fn main() {
    greater::runtime::stop_candle_spinning();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted =
        |part: &str| filters.is_empty() || filters.iter().any(|f| part.contains(f.as_str()));
    for p in [Precision::Mixed, Precision::Mixed16] {
        if wanted(&format!("logits {}", name(p))) {
            logits("smollm2-135m", p);
            logits(QWEN, p);
        }
    }
    for p in [Precision::Mixed, Precision::Mixed16] {
        if wanted(&format!("zero-shot {}", name(p))) {
            zero_shot(&data, p);
        }
    }
    for p in [Precision::Mixed, Precision::Mixed16] {
        if wanted(&format!("shortlists {}", name(p))) {
            shortlists(&data, p);
        }
    }
}
