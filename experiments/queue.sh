#!/usr/bin/env bash
# The experiments still to run, in order, each resumed where it stopped: start it in the
# background from the repository's root after `cargo build --release`,
#     setsid nohup bash experiments/queue.sh >> experiments.log 2>&1 &
# and pause it (kill -STOP / -CONT on the `greater` process) while building or measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
greater=./target/release/greater

# Issue 20 §3: GReaTer on the five tasks, then APE on the first two.
"$greater" protocol --resume experiments/paper5-scale

# Cut reasonings as mistakes and not-worse moves, screened on dev (experiments/README.md).
if [ -f experiments/screen-cut/runs/screen-config.json ]; then
    "$greater" screen --resume experiments/screen-cut/runs
else
    "$greater" screen --model qwen2.5-coder-0.5b --data-dir ../shared/data \
        --tasks causal_judgement,hyperbaton --train 30 --dev 100 \
        --steps 20 --max-reasoning 512 --configurations experiments/screen-cut/screen.toml \
        --out experiments/screen-cut/runs
fi
