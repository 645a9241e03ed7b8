#!/usr/bin/env bash
# Issue 41 §2: zero-shot CoT and the paper's initial prompt on every BIG-Bench Hard task,
# GSM8K and FOLIO, for Qwen2.5-Coder 1.5B and 0.5B: 100 questions each at 512 reasoning
# tokens. One `greater eval` per (model, prompt, task), its JSON summary and its records
# kept; a finished one is skipped, so the scan resumes where it stopped (an interrupted eval
# resumes at its next question, from its records' `.partial` log). Run from the repository's root after `cargo build --release`.
#
# The 100 questions are the first 100 of split seed 2's shuffle (`--train 0 --dev 0 --test
# 100 --seed 2`): train and dev of any seed-2 protocol with train + dev >= 100, never its test.
set -euo pipefail
cd "$(dirname "$0")/../.."
greater=./target/release/greater
out=experiments/headroom/evals
tasks=$("$greater" tasks | awk 'NR > 1 && $3 != "generated," && $1 !~ /-train$/ {print $1}')
initial="proper logical reasoning and think step by step. Finally give the actual correct answer."

scan() { # model, prompt name, prompt text
    mkdir -p "$out/$1"
    for task in $tasks; do
        local stem="$out/$1/$task.$2"
        [ -f "$stem.json" ] && continue
        "$greater" --json eval --model "$1" --task "$task" --data-dir ../shared/data \
            --seed 2 --train 0 --dev 0 --test 100 --max-reasoning 512 \
            --prompt "$3" --out "$stem.jsonl" > "$stem.json.partial"
        mv "$stem.json.partial" "$stem.json"
    done
}

# Zero-shot CoT first on both models (it decides headroom), then the initial prompt.
scan qwen2.5-coder-1.5b zero-shot-cot "Let's think step by step."
scan qwen2.5-coder-0.5b zero-shot-cot "Let's think step by step."
scan qwen2.5-coder-1.5b initial "$initial"
scan qwen2.5-coder-0.5b initial "$initial"
python3 experiments/headroom/table.py
