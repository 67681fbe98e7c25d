"""Training curves from a run's train_log.jsonl: per-head loss and teacher-forced top-1 accuracy vs step.

    python scripts/plot_train_log.py runs/NAME/train_log.jsonl --out curves.png [--smooth 50]
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rolling(values: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smooth", type=int, default=50, help="rolling mean over this many steps")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.log) if line.strip()]
    rows = [r for r in rows if "head_loss" in r]
    if not rows:
        raise SystemExit(f"{args.log}: no step records")
    steps = [r["step"] for r in rows]
    n = len(rows[0]["head_loss"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i in range(n):
        ax_loss.plot(steps, rolling([r["head_loss"][i] for r in rows], args.smooth), label=f"head {i}")
        ax_acc.plot(steps, rolling([r["head_acc"][i] for r in rows], args.smooth), label=f"head {i}")
    stage2 = next((r["step"] for r in rows if r.get("stage") == 2), None)
    for ax in (ax_loss, ax_acc):
        if stage2 is not None:
            ax.axvline(stage2, color="grey", linestyle="--", linewidth=1, label="stage 2 starts")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel(f"training loss per head (rolling mean of {args.smooth})")
    ax_acc.set_ylabel("teacher-forced top-1 accuracy per head")
    ax_acc.legend()
    fig.suptitle(args.title or args.log)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
