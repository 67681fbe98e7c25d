"""Where numbers go: the console (one line per log_every steps), output_dir/train_log.jsonl (every step, what the
resume test compares), wandb (imported only when enabled), and at the end eval.json and acceptance.png."""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path


def wandb_mode(requested: str) -> str:
    """auto: online with an API key (WANDB_API_KEY or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class MetricLogger:
    """Main process only does anything; other ranks get a logger whose methods are no-ops."""

    def __init__(self, cfg, enabled: bool, print_fn=print):
        self.enabled = enabled
        self.print = print_fn
        self.out = Path(cfg.output_dir)
        self.log_path = self.out / "train_log.jsonl"
        self.run = None
        self.mode = wandb_mode(cfg.wandb)
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self.mode != "disabled":
            try:
                import wandb
            except ImportError:
                self.print(f"wandb is not installed: metrics go to the console and {self.log_path} only")
                self.mode = "disabled"
            else:
                self.run = wandb.init(
                    project=cfg.wandb_project, name=cfg.run_name or self.out.name, mode=self.mode, dir=str(self.out),
                    config=cfg.to_dict(), resume="allow", id=_run_id(self.out),
                )

    def truncate_after(self, step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be trained again)."""
        if not self.enabled or not self.log_path.exists():
            return
        keep = [line for line in self.log_path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.log_path)

    def steps(self, records: list[dict]) -> None:
        """Per-step records (step, loss, head losses, lr, ...) to train_log.jsonl and wandb."""
        if not self.enabled or not records:
            return
        with self.log_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        if self.run is not None:
            for r in records:
                self.run.log({f"train/{k}": v for k, v in r.items() if k != "step"}, step=r["step"])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.enabled and self.run is not None:
            self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _run_id(out: Path) -> str:
    """A stable wandb run id per output_dir, so a resumed run continues the same wandb run."""
    path = out / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    path.write_text(rid)
    return rid


def format_line(step: int, max_steps: int, rec: dict) -> str:
    heads = " ".join(f"{x:.3f}" for x in rec["head_loss"])
    acc = " ".join(f"{x:.2f}" for x in rec["head_acc"])
    return (f"step {step}/{max_steps} | loss {rec['loss']:.4f} | heads [{heads}] | acc [{acc}] | "
            f"lr {rec['lr']:.2e} | {rec['tokens_per_s']:.0f} tok/s | stage {rec['stage']}"
            + (f" | peak {rec['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in rec else ""))


def format_eval(values: dict[str, float]) -> str:
    keys = [k for k in values if k.endswith("/tau") or k.endswith("/tau_walk") or "/acc_head" in k]
    return " | ".join(f"{k} {values[k]:.3f}" for k in sorted(keys))


def plot_acceptance(values: dict[str, float], n_predict: int, path: Path) -> Path | None:
    """Acceptance per head: teacher-forced accuracy, and P(accepted >= i + 1) for chain and tree, per eval set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    heads = list(range(1, n_predict + 1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for prefix in ("data", "generated"):
        for tree, style in (("chain", "-"), ("tree", "--")):
            ys = [values.get(f"{prefix}/{tree}/accept_rate_head{i}", math.nan) for i in range(n_predict)]
            if not all(math.isnan(y) for y in ys):
                tau = values.get(f"{prefix}/{tree}/tau", math.nan)
                axes[0].plot(heads, ys, style, marker="o", label=f"{prefix} {tree} (tau {tau:.2f})")
            ys = [values.get(f"{prefix}/{tree}/accept_cond_head{i}", math.nan) for i in range(n_predict)]
            if not all(math.isnan(y) for y in ys):
                axes[1].plot(heads, ys, style, marker="o", label=f"{prefix} {tree}")
    ys = [values.get(f"data/acc_head{i}", math.nan) for i in range(n_predict)]
    axes[1].plot(heads, ys, ":", marker="s", color="k", label="data top-1 accuracy (teacher forced)")
    axes[0].set(title="P(at least i tokens accepted)", xlabel="head i", ylabel="rate", ylim=(0, 1), xticks=heads)
    axes[1].set(title="P(head i accepted | heads < i accepted)", xlabel="head i", ylim=(0, 1), xticks=heads)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
