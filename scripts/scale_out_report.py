"""The scale-out runs' results (scripts/scale_out.sh): throughput per GPU and scaling efficiency, peak memory,
per-step loss agreement between strategies, and the resumed runs against the uninterrupted ones.

    python scripts/scale_out_report.py OUT_DIR --gpus 2 --resume-at 30   # -> OUT_DIR/scale_out.{json,png}
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_log(path: Path) -> dict[int, dict]:
    """step -> record (a resumed run's log holds each step once: resume cuts the log back to its checkpoint)."""
    if not path.is_file():
        return {}
    return {r["step"]: r for r in map(json.loads, filter(None, path.read_text().splitlines()))}


def steady_tokens_per_s(log: dict[int, dict], skip: int) -> float | None:
    """Median tokens/s (all GPUs) over the log windows after the first `skip` steps (compile, warm-up)."""
    values = [r["tokens_per_s"] for s, r in sorted(log.items()) if s > skip]
    return statistics.median(values) if values else None


def max_rel_diff(a: dict[int, dict], b: dict[int, dict], steps) -> float | None:
    common = [s for s in steps if s in a and s in b]
    if not common:
        return None
    return max(abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--resume-at", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the throughput (compile, warm-up)")
    args = parser.parse_args()

    logs = {p.stem: read_log(p) for p in sorted(args.out.glob("*.jsonl"))}
    result = {"gpus": args.gpus, "throughput": {}, "loss_agreement": {}, "resume": {}}

    print(f"{'run':14s} {'GPUs':>4s} {'tokens/s':>10s} {'per GPU':>9s} {'vs 1 GPU':>9s} {'peak GiB':>9s} {'final loss':>11s}")
    single = steady_tokens_per_s(logs.get("qwen-single", {}), args.skip)
    for name, log in logs.items():
        if not log or name.startswith("resume-"):
            continue
        gpus = 1 if name.endswith("-single") else args.gpus
        tps = steady_tokens_per_s(log, args.skip if name.startswith("qwen-") else 2)
        per_gpu = tps / gpus if tps else None
        eff = per_gpu / single if (per_gpu and single and name.startswith("qwen-")) else None
        last = log[max(log)]
        row = {"gpus": gpus, "tokens_per_s": tps, "per_gpu": per_gpu, "efficiency": eff,
               "peak_mem_gib": last.get("peak_mem_gib"), "final_loss": last["loss"], "steps": max(log)}
        result["throughput"][name] = row
        fmt = lambda v, f: format(v, f) if v is not None else format("-", f">{f.split('.')[0]}")  # noqa: E731
        print(f"{name:14s} {gpus:4d} {fmt(tps, '10.0f')} {fmt(per_gpu, '9.0f')} {fmt(eff, '9.3f')} "
              f"{fmt(row['peak_mem_gib'], '9.1f')} {last['loss']:11.4f}")

    ref = logs.get("qwen-ddp", {})
    if ref:
        print("\nper-step loss vs DDP (same seed, same data order), max relative difference:")
        for name in ("qwen-fsdp2", "qwen-zero3"):
            if logs.get(name):
                d = max_rel_diff(logs[name], ref, sorted(ref))
                result["loss_agreement"][name] = d
                print(f"  {name:12s} {d:.2e}" if d is not None else f"  {name:12s} -")

    for name, log in logs.items():
        if not name.startswith("resume-") or not log:
            continue
        _, src, dst = name.split("-")
        after = range(args.resume_at + 1, max(log) + 1)
        vs_dst = max_rel_diff(log, logs.get(f"qwen-{dst}", {}), after)
        vs_src = max_rel_diff(log, logs.get(f"qwen-{src}", {}), after)
        result["resume"][name] = {"steps": [after.start, after.stop - 1], "vs_uninterrupted_" + dst: vs_dst,
                                  "vs_uninterrupted_" + src: vs_src}
        print(f"\n{name}: {src} checkpoint at step {args.resume_at} resumed under {dst}; steps {after.start}-{after.stop - 1}, "
              f"max relative loss difference vs uninterrupted {dst} {vs_dst if vs_dst is None else f'{vs_dst:.2e}'}, "
              f"vs uninterrupted {src} {vs_src if vs_src is None else f'{vs_src:.2e}'}")

    (args.out / "scale_out.json").write_text(json.dumps(result, indent=1))
    plot(logs, args, args.out / "scale_out.png")


def plot(logs: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in logs.items() if v and (k.startswith("resume-") or k in ("qwen-ddp", "qwen-fsdp2", "qwen-zero3"))}
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"qwen-ddp": "-", "qwen-fsdp2": "--", "qwen-zero3": ":"}
    for name, log in curves.items():
        steps = sorted(s for s in log if not name.startswith("resume-") or s > args.resume_at)
        ax.plot(steps, [log[s]["loss"] for s in steps], styles.get(name, "-."), label=name, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (sum over heads)")
    ax.set_title(f"Same seed on {args.gpus} GPUs: DDP, FSDP2, ZeRO-3, and resumed runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
