//! The optimiser: candidate proposal, shortlist and schedule as pure functions; resumable,
//! reproducible runs on a tiny random model; an end-to-end run on SmolLM2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use greater::optimize::candidates::{candidates_from_subsets, draw_subsets, propose, shortlist, sum_normalised, ProposalConfig};
use greater::optimize::run::{run, Start};
use greater::optimize::schedule::{next_position, Next};
use greater::optimize::{OptimizeConfig, StepRecord};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const RANKED: [&[u32]; 4] = [&[1, 2, 3, 4, 5, 6], &[2, 1, 4, 3, 6, 5], &[1, 3, 2, 5, 4, 6], &[7, 8, 1, 2, 3, 4]];

fn ranked() -> Vec<Vec<u32>> {
    RANKED.iter().map(|r| r.to_vec()).collect()
}

#[test]
fn candidates_are_the_union_of_subset_intersections() {
    // k = 2: {1,2} & {1,2} = {1,2}; {1,3} & {7,8} = {}. With the current token 9: 3 tokens.
    let subsets = vec![vec![0, 1], vec![2, 3]];
    assert_eq!(candidates_from_subsets(&ranked(), &subsets, 9, 2, 3), vec![1, 2, 9]);
    // Asking for 6 widens k: k = 4 gives {1,2,3,4} and {1,2,3}: 5 tokens; k = 6 gives
    // {1..6} and {1,2,3,4,5}: with 9, 7 tokens.
    assert_eq!(candidates_from_subsets(&ranked(), &subsets, 9, 2, 6), vec![1, 2, 3, 4, 5, 6, 9]);
    // The current token is counted once when it is already a candidate.
    assert_eq!(candidates_from_subsets(&ranked(), &[vec![0, 1, 2]], 1, 2, 1), vec![1]);
    // Widening stops when k covers the longest ranking: k = 6 gives {1,2,3,4}.
    assert_eq!(candidates_from_subsets(&ranked(), &[vec![0, 3]], 9, 2, 50), vec![1, 2, 3, 4, 9]);
}

#[test]
fn subsets_are_seeded_distinct_and_sorted() {
    let draw = |seed| draw_subsets(10, 6, 5, &mut ChaCha8Rng::seed_from_u64(seed));
    let a = draw(4);
    assert_eq!(a, draw(4));
    assert_ne!(a, draw(5));
    for s in &a {
        assert_eq!(s.len(), 5);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        assert!(s.iter().all(|&e| e < 10));
    }
    // Fewer examples than the subset size: every subset is all of them.
    assert_eq!(draw_subsets(3, 2, 5, &mut ChaCha8Rng::seed_from_u64(0)), vec![vec![0, 1, 2], vec![0, 1, 2]]);
    // With all examples in every subset the proposal is the plain intersection, widened:
    // k = 2 gives {} (example 3 ranks 7, 8 first), k = 4 gives {1, 2}.
    let cfg = ProposalConfig { top_k: 2, subsets: 3, subset_size: 4, min_candidates: 3 };
    assert_eq!(propose(&ranked(), 9, &cfg, &mut ChaCha8Rng::seed_from_u64(1)), vec![1, 2, 9]);
}

#[test]
fn shortlist_takes_the_most_negative_gradients_except_the_current_token() {
    let candidates = [10, 11, 12, 13, 14, 15];
    let gradient = [0.5, -2.0, -0.1, -3.0, -2.0, 1.0];
    // 13 (-3.0), then 11 and 14 tie at -2.0: the lower id first.
    assert_eq!(shortlist(&candidates, &gradient, 12, 3), vec![(13, -3.0), (11, -2.0), (14, -2.0)]);
    // The current token is never shortlisted, however good its gradient.
    assert_eq!(shortlist(&candidates, &gradient, 13, 2), vec![(11, -2.0), (14, -2.0)]);
    assert_eq!(shortlist(&[12], &[0.0], 12, 3), vec![]);
}

#[test]
fn gradients_are_normalised_per_example_then_summed() {
    let total = sum_normalised(&[vec![3.0, 4.0], vec![0.0, -2.0], vec![0.0, 0.0]]);
    assert_eq!(total, vec![0.6, -0.19999999]);
}

#[test]
fn schedule_wraps_after_a_sentence_end_and_grows_otherwise() {
    assert_eq!(next_position(2, 5, " step"), Next::At(3));
    assert_eq!(next_position(4, 5, " answer."), Next::At(0));
    assert_eq!(next_position(4, 5, "!"), Next::At(0));
    assert_eq!(next_position(4, 5, " answer"), Next::Grow);
    assert_eq!(next_position(4, 5, ". Then"), Next::Grow);
}

/// A tiny random llama GGUF that can tokenize any text.
fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    common::write_tiny_gguf(&path, "llama", true, common::byte_vocab(), 512);
    path
}

fn tiny_settings(model: &Path, steps: usize) -> OptimizeConfig {
    OptimizeConfig {
        model: model.display().to_string(),
        task: "arithmetic".into(),
        difficulty: 1,
        train: 3,
        test: 2,
        steps,
        max_reasoning: 5,
        initial_prompt: Some("Go on.".into()),
        ..OptimizeConfig::default()
    }
}

fn steps_without_timings(dir: &Path) -> Vec<StepRecord> {
    std::fs::read_to_string(dir.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: StepRecord = serde_json::from_str(l).unwrap();
            r.seconds = Default::default();
            r
        })
        .collect()
}

fn run_quietly(start: Start, out: &Path) {
    run(start, out, &Arc::new(AtomicBool::new(false)), &mut |_| {}).unwrap();
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    run_quietly(Start::New(tiny_settings(&model, 4)), &whole);
    run_quietly(Start::New(tiny_settings(&model, 2)), &split);
    assert_eq!(steps_without_timings(&split).len(), 2);
    run_quietly(Start::Resume { steps: Some(4) }, &split);
    let (a, b) = (steps_without_timings(&whole), steps_without_timings(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(read(&whole, "best_prompt.txt"), read(&split, "best_prompt.txt"));
    assert_eq!(read(&whole, "checkpoint.json"), read(&split, "checkpoint.json"));
    // A step moves to the best checked token. (With this byte-level vocabulary the leading
    // space token has no admissible alternative, so a step there checks nothing.)
    assert!(a.iter().any(|r| r.chosen.is_some()));
    for r in &a {
        assert!(r.candidates.iter().any(|c| r.prompt_before.contains(c.text.trim())));
        assert!(r.checked.len() <= 3);
        if let Some(chosen) = &r.chosen {
            let best = r.checked.iter().map(|c| c.score.score).fold(f64::INFINITY, f64::min);
            assert_eq!(r.checked.iter().find(|c| c.id == chosen.id).unwrap().score.score, best);
        }
    }
}

#[test]
fn a_run_killed_mid_step_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let reference = tmp.path().join("reference");
    run_quietly(Start::New(tiny_settings(&model, 8)), &reference);

    let (mut child, killed) = spawn_until_first_step(tmp.path(), &model, "killed", 8);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(checkpoint_step(&killed) < 8, "the child finished before it was killed");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--resume", killed.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps_without_timings(&killed), steps_without_timings(&reference));
}

/// Starts `greater optimize` on the tiny model in a child process and waits for its first
/// logged step.
fn spawn_until_first_step(tmp: &Path, model: &Path, name: &str, steps: usize) -> (std::process::Child, PathBuf) {
    let out = tmp.join(name);
    let config = tmp.join(format!("{name}.toml"));
    std::fs::write(&config, toml::to_string(&tiny_settings(model, steps)).unwrap()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = out.join("steps.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !log.exists() || std::fs::read_to_string(&log).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the child never finished a step");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (child, out)
}

fn checkpoint_step(dir: &Path) -> usize {
    let state: greater::optimize::State =
        serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap();
    state.step
}

#[test]
fn ctrl_c_keeps_the_last_checkpoint_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let (child, out) = spawn_until_first_step(tmp.path(), &model, "interrupted", 200);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("interrupted: the last finished step is saved; continue with greater optimize --resume"), "{stdout}");
    let step = checkpoint_step(&out);
    assert!((1..200).contains(&step));
    assert_eq!(steps_without_timings(&out).len(), step);
}

#[test]
fn smollm2_two_steps_write_a_complete_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_greater"))
        .args(["optimize", "--model", "smollm2-135m", "--task", "arithmetic", "--train", "4", "--test", "4"])
        .args(["--steps", "2", "--max-reasoning", "32", "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("budget: 2 steps"), "{stdout}");
    for f in ["config.json", "steps.jsonl", "checkpoint.json", "best_prompt.txt", "summary.json", "summary.md"] {
        assert!(out_dir.join(f).exists(), "missing {f}");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_sha256"], "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    assert_eq!(config["split"]["train"].as_array().unwrap().len(), 4);
    assert_eq!(config["settings"]["top_k"], 11);
    assert_eq!(steps_without_timings(&out_dir).len(), 2);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let labels: Vec<&str> = summary["evaluations"].as_array().unwrap().iter().map(|e| e["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["zero-shot CoT", "initial", "optimised"]);
    let best = std::fs::read_to_string(out_dir.join("best_prompt.txt")).unwrap();
    assert_eq!(summary["best_prompt"], best.as_str());
    assert!(stdout.contains("| optimised |"), "{stdout}");
}
