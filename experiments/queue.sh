#!/usr/bin/env bash
# The experiments still to run, in order, each resumed where it stopped: start it in the
# background from the repository's root after `cargo build --release`,
#     setsid nohup bash experiments/queue.sh >> experiments.log 2>&1 &
# and pause it (kill -STOP / -CONT on the `greater` process) while building or measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
greater=./target/release/greater

# Issue 41 §2: the headroom scan (experiments/headroom/README.md) decides where the next
# searches run, so it goes first.
bash experiments/headroom/scan.sh

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

# GReaTer started from APE's returned instruction on object_counting, on paper5-scale's split
# (experiments/README.md, "ape-start").
if [ -f experiments/ape-start/protocol-config.json ]; then
    "$greater" protocol --resume experiments/ape-start
else
    "$greater" protocol --model qwen2.5-coder-0.5b --data-dir ../shared/data \
        --tasks object_counting --seed 1 --train 30 --dev 100 --test rest --steps 30 \
        --max-reasoning 512 --methods greater \
        --initial-prompt "$(cat experiments/paper5-scale/object_counting-ape/best_prompt.txt)" \
        --out experiments/ape-start
fi
