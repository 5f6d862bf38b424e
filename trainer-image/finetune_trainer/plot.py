"""The loss plot written with the final outputs: training loss (raw and smoothed) and eval loss against the step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    # Exponential moving average with bias correction, so the first points are not pulled towards zero.
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(log_history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Write a PNG of train and eval loss from a Trainer's log history; None when nothing was logged."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display in a container
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.35, label="train loss")
        if len(losses) > 3:
            ax.plot(steps, _smooth(losses), color="#1f77b4", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, color="#d62728", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
