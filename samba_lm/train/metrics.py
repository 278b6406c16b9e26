"""Metrics to the console, out_dir/metrics.jsonl and TensorBoard (main rank only), and the loss plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled, self.tb = enabled, None
        self.path = Path(out_dir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Rows logged after the checkpoint we resume from belong to a run that died: drop them, and
            # a last row that its death cut short.
            rows = [r for r in self.path.read_text().splitlines() if _step(r) is not None and _step(r) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed: logging to metrics.jsonl only "
                      "(pip install 'samba-lm[train]')", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, step: int, **values):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_losses(metrics_path: Path, png_path: Path, title: str = "training loss") -> Path | None:
    """Train loss (raw and smoothed) and validation loss against step. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
        ax.plot(steps, _ema(losses, 0.9), color="tab:blue", lw=2, label="train (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _ema(values, beta):
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _step(row: str) -> int | None:
    """A metrics.jsonl row's step, or None for a row that is not whole JSON (a write cut short)."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
