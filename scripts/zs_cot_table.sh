#!/usr/bin/env bash
# Zero-shot CoT accuracy of the offline models on 50 held-out questions of six tasks
# (the table in the task-layer issue). Usage: scripts/zs_cot_table.sh OUT_DIR [models...]
set -euo pipefail
out=${1:?output folder}; shift
models=${*:-smollm2-135m qwen2.5-coder-0.5b}
data=$(cd "$(dirname "$0")/../../shared/data" && pwd)
mkdir -p "$out"
for model in $models; do
  for task in navigate object_counting boolean_expressions tracking_shuffled_objects_three_objects causal_judgement gsm8k; do
    echo "== $model $task"
    ./target/release/greater eval --model "$model" --task "$task" --data-dir "$data" \
      --baseline zs-cot --train 50 --test 50 --seed 0 --out "$out/$model-$task.jsonl" 2>/dev/null
  done
done
