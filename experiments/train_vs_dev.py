"""Do train mistakes saved by the search predict dev accuracy gained?

For every finished run under experiments/ (a folder with summary.json), each searched
prompt that met dev is compared with the better of the two starts on train (fewer train
mistakes, then the lower score): train mistakes saved against dev questions gained.

    python3 experiments/train_vs_dev.py
"""

import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def pairs():
    for path in sorted(glob.glob(os.path.join(HERE, "**", "summary.json"), recursive=True)):
        summary = json.load(open(path))
        by_label = {c["label"]: c for c in summary["contenders"]}
        starts = [by_label[l] for l in ("zero-shot CoT", "initial") if l in by_label]
        if len(starts) < 2 or not all(s.get("dev") for s in starts):
            continue
        start = min(starts, key=lambda c: (c["train"]["mistakes"], c["train"]["score"]))
        for c in summary["contenders"]:
            if c["label"].startswith("train") and c.get("dev"):
                saved = start["train"]["mistakes"] - c["train"]["mistakes"]
                gained = c["dev"]["correct"] - start["dev"]["correct"]
                yield os.path.relpath(os.path.dirname(path), HERE), saved, gained


def main():
    rows = list(pairs())
    runs = len({r[0] for r in rows})
    print(f"{len(rows)} searched prompts on dev, from {runs} runs")
    groups = {"none (or fewer)": lambda s: s <= 0, "one": lambda s: s == 1, "two or more": lambda s: s >= 2}
    for name, test in groups.items():
        gains = [g for _, s, g in rows if test(s)]
        if gains:
            up = sum(g > 0 for g in gains)
            down = sum(g < 0 for g in gains)
            print(f"train mistakes saved {name}: {len(gains)} prompts, dev {up} up / {down} down, "
                  f"mean {statistics.mean(gains):+.2f} questions")
    saved = [s for _, s, _ in rows]
    gained = [g for _, _, g in rows]
    if len(rows) > 1:
        print(f"correlation: {statistics.correlation(saved, gained):.2f}")


if __name__ == "__main__":
    main()
