"""Figures the notebooks show and save next to the run's reports (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

MiB = 2**20


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_footprint(footprint: dict[str, Any]):
    """Bars: whole model and linear weights, 16-bit reference vs loaded full precision vs 4-bit."""
    labels = ["fp16 (reference)", f"loaded ({footprint['full_dtype']})", "4-bit"]
    keys = ["fp16_reference", "full", "4bit"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, part, title in zip(axes, ["model_bytes", "linear_weight_bytes"],
                               ["whole model", "quantized linear layers"]):
        values = [footprint[part][k] / MiB for k in keys]
        bars = ax.bar(labels, values, color=["#bbbbbb", "#4c72b0", "#dd8452"])
        ax.bar_label(bars, fmt="%.0f MiB")
        ax.set_title(title)
        ax.set_ylabel("MiB")
        ax.tick_params(axis="x", labelrotation=10)
    fig.suptitle("Memory footprint")
    fig.tight_layout()
    return fig


def plot_layer_errors(errors: list[dict[str, Any]]):
    """Histogram of per-layer relative weight error, NF4 against FP4 on the same weights."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for qt, color in (("nf4", "#dd8452"), ("fp4", "#4c72b0")):
        ax.hist([r[qt] for r in errors], bins=30, alpha=0.6, color=color, label=qt.upper())
    ax.set_xlabel("relative error ||W - deq(q(W))|| / ||W||")
    ax.set_ylabel("layers")
    ax.set_title(f"Per-layer 4-bit quantization error ({len(errors)} layers)")
    ax.legend()
    fig.tight_layout()
    return fig
