"""Loss-curve PNG of the digits demo (matplotlib's object API, no pyplot or global backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_losses(path: Path, pretrain: Sequence[float], adapt: Mapping[str, Sequence[float]]) -> Path:
    """Write per-step training losses to ``path`` (PNG): pretraining on 0–4 left, adaptation to 5–9 right."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_pre, ax_adapt = fig.subplots(1, 2)
    ax_pre.plot(pretrain, color="tab:gray")
    ax_pre.set_title("Pretraining on digits 0–4")
    for name, losses in adapt.items():
        ax_adapt.plot(losses, label=name, alpha=0.85)
    ax_adapt.set_title("Adaptation to digits 5–9")
    ax_adapt.legend()
    for ax in (ax_pre, ax_adapt):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path
