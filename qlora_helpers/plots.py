"""Figures the notebooks show and save next to the run's reports (PNG)."""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Any

import matplotlib.pyplot as plt

from .tasks import metric

MiB = 2**20


def save(fig, path: Path) -> None:
    """Write the figure to `path`. Returns nothing, so a notebook cell ending in it shows only the picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


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


def plot_4bit_levels(levels: dict[str, list[float]], sigma: float):
    """NF4's and FP4's 16 levels over the normal distribution of weights scaled by their block's
    absmax (standard deviation `sigma`): NF4 spends its levels where the weights are."""
    xs = [i / 200 - 1 for i in range(401)]
    pdf = [NormalDist(0, sigma).pdf(x) for x in xs]
    top = max(pdf)
    fig, ax = plt.subplots(figsize=(9.5, 3.4))
    ax.fill_between(xs, pdf, color="#dddddd", label="normal weights / block absmax")
    for i, (qt, color) in enumerate((("nf4", "#dd8452"), ("fp4", "#4c72b0"))):
        y = top * (1.12 + 0.14 * i)
        ax.vlines(levels[qt], 0, y, colors=color, alpha=0.35, linewidth=1)
        ax.plot(levels[qt], [y] * len(levels[qt]), "o", color=color, label=f"{qt.upper()} levels")
    ax.set_xlabel("weight / absmax of its block")
    ax.set_yticks([])
    ax.set_title("The 16 values a 4-bit code can stand for")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the levels span the axes
    fig.tight_layout()
    return fig


def plot_latency(forms: list[dict[str, Any]]):
    """06's speed table as two charts, one question each: which form answers first (time to first token
    at the smallest batch), and which generates fastest (tokens/s, one bar per batch size). Horizontal
    bars, so form names stay readable however many forms there are."""
    names = list(dict.fromkeys(r["form"] for r in forms))
    batches = sorted({r["batch"] for r in forms})
    cell = {(r["form"], r["batch"]): r for r in forms}
    fig, (first, speed) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.45 * len(names) * max(1, len(batches) / 1.5)))
    smallest = [cell.get((n, batches[0]), {}).get("ttft_s", float("nan")) for n in names]
    first.barh(names, smallest, color="#4c72b0")
    first.bar_label(first.containers[0], fmt="%.2f s", padding=2)
    first.set_title(f"Which form answers first? Time to first token, batch {batches[0]}")
    height = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        ys = [j + (i - (len(batches) - 1) / 2) * height for j in range(len(names))]
        bars = speed.barh(ys, [cell.get((n, batch), {}).get("tokens_per_s", float("nan")) for n in names],
                          height=height, label=f"batch {batch}")
        speed.bar_label(bars, fmt="%.0f", padding=2)
    speed.set_yticks(range(len(names)), names)
    speed.set_title("Which form generates fastest? Tokens/s, all rows")
    speed.legend(loc="upper right")  # the first forms (4-bit, merged) are the slow ones: room there
    for ax in (first, speed):
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.margins(x=0.2)  # room for the labels
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


def plot_lengths(examples: list[dict[str, Any]], max_length: int):
    """Token-length histograms: prompt vs response, and whole examples against the length limit."""
    prompt = [e["prompt_len"] for e in examples]
    response = [len(e["input_ids"]) - e["prompt_len"] for e in examples]
    total = [len(e["input_ids"]) for e in examples]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    axes[0].hist(prompt, bins=50, alpha=0.6, label="prompt (masked)", color="#999999")
    axes[0].hist(response, bins=50, alpha=0.6, label="response (trained)", color="#2a9d55")
    axes[0].set_xlabel("tokens")
    axes[0].set_ylabel("examples")
    axes[0].legend()
    axes[0].set_title("prompt vs response length")
    axes[1].hist(total, bins=50, color="#4c72b0")
    axes[1].axvline(max_length, color="#c44e52", linestyle="--", label=f"max_seq_length {max_length}")
    axes[1].set_xlabel("tokens per example")
    axes[1].legend()
    axes[1].set_title(f"{len(total)} training examples")
    fig.tight_layout()
    return fig


def plot_padding_efficiency(efficiency: dict[str, Any]):
    """Share of computed tokens that are real tokens: padded micro-batches against packed rows."""
    labels = [k.replace("_by_length", "\ngrouped by length").replace("_", " ") for k in efficiency]
    values = [v["efficiency"] for v in efficiency.values()]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(labels, [100 * v for v in values], color=["#dd8452", "#e0b050", "#2a9d55"][:len(values)])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylim(0, 110)
    ax.set_ylabel("real tokens / computed tokens (%)")
    ax.set_title("Padding efficiency")
    fig.tight_layout()
    return fig


def plot_training(log_history: list[dict[str, Any]], only_loss: bool = False):
    """Loss (with held-out points), learning rate and gradient norm against the optimizer step."""
    train = [h for h in log_history if "loss" in h and "step" in h]
    held = [h for h in log_history if "heldout_loss" in h]
    panels = [("loss", "training loss")] + ([] if only_loss else [("learning_rate", "learning rate"),
                                                                   ("grad_norm", "gradient norm")])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(h["step"], h[key]) for h in train if key in h]
        if points:
            ax.plot(*zip(*points), marker=".", color="#4c72b0", label="train")
        if key == "loss" and held:
            ax.scatter([h["step"] for h in held], [h["heldout_loss"] for h in held], color="#c44e52",
                       zorder=3, label="held-out")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_lora_shapes(d_in: int, d_out: int, r: int, alpha: float):
    """LoRA's shapes to scale: the frozen W (d_out x d_in) beside the trainable B (d_out x r) and
    A (r x d_in), with each one's parameter count: the update (alpha/r)*B*A has W's shape."""
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(9, 3.4))
    scale = 2.6 / max(d_in, d_out)
    w, h, rr = d_in * scale, d_out * scale, max(r * scale, 0.04)  # r is drawn at least as a visible strip
    bx, ax_ = w + 1.2, w + 1.2 + rr + 0.6  # where B and A start
    boxes = [(0, "W (frozen, 4-bit)", d_out, d_in, w, h, "#bbbbbb"),
             (bx, "B (trained)", d_out, r, rr, h, "#dd8452"),
             (ax_, "A (trained)", r, d_in, w, rr, "#4c72b0")]
    for x, name, rows, cols, bw, bh, color in boxes:
        ax.add_patch(Rectangle((x, h - bh), bw, bh, color=color))
        ax.text(x + bw / 2, h + 0.12, f"{name}\n{rows:,} x {cols:,} = {rows * cols:,}", ha="center", va="bottom")
    ax.text(w + 0.3, h / 2, "+", fontsize=18, ha="center", va="center")
    ax.text(w + 0.75, h / 2, f"{alpha / r:g} x", fontsize=12, ha="center", va="center")
    ax.text(bx + rr + 0.3, h / 2, "·", fontsize=24, ha="center", va="center")
    share = r * (d_in + d_out) / (d_in * d_out)
    ax.set_title(f"W + (alpha/r)·B·A with r={r}, alpha={alpha:g}: the adapter trains {share:.1%} of W's weights")
    ax.set_xlim(-0.1, ax_ + w + 0.1)
    ax.set_ylim(-0.1, h + 0.8)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def plot_heldout_by_key(rows: list[dict[str, Any]], keys: list[str]):
    """A sweep: held-out loss against each swept key (one panel per key); runs that share the
    other keys' values are joined by a line, and the base model's loss is the dashed line."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    base = [v for r in rows if isinstance(v := r.get("heldout_loss_base"), float) and v == v]  # v == v: not NaN
    for ax, key in zip(axes[0], keys):
        positions = {v: i for i, v in enumerate(dict.fromkeys(str(r[key]) for r in rows))}
        others = [k for k in keys if k != key]
        groups: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            label = ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in others) or "runs"
            groups.setdefault(label, []).append((positions[str(r[key])], r["heldout_loss"]))
        for label, points in groups.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=label)
        if base:
            ax.axhline(sum(base) / len(base), color="#999999", linestyle="--", label="base model")
        ax.set_xticks(list(positions.values()), list(positions), rotation=10)
        ax.set_xlabel(key)
        ax.set_ylabel("held-out loss (lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle("Held-out loss by swept setting")
    fig.tight_layout()
    return fig


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], same_batches: bool = True):
    """A sweep: every run's training loss against the step, overlaid, with its held-out points.

    One batch's loss swings more than the runs differ, so when every run saw the same batches
    (`same_batches`: the sweep changes no data setting or seed) a second panel shows each run's
    loss minus the first run's at the same step: the gap the settings make, batch noise removed."""
    first_name, first = next(iter(histories.items()), (None, []))
    reference = {h["step"]: h["loss"] for h in first if "loss" in h and "step" in h}
    gaps = same_batches and len(histories) > 1 and bool(reference)
    fig, axes = plt.subplots(1, 2 if gaps else 1, figsize=(13 if gaps else 8, 4.2), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    for i, (name, history) in enumerate(histories.items()):
        look = {"color": f"C{i % 10}", "linestyle": styles[i % len(styles)], "alpha": 0.9}
        train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        held = [(h["step"], h["heldout_loss"]) for h in history if "heldout_loss" in h]
        if train:
            axes[0][0].plot(*zip(*train), label=name, **look)
        if held:
            axes[0][0].scatter(*zip(*held), color=look["color"], marker="D", zorder=3)
        if gaps and i:
            gap = [(step, loss - reference[step]) for step, loss in train if step in reference]
            if gap:
                axes[0][1].plot(*zip(*gap), marker="o", markersize=3, label=name, **look)
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].set_title("Training loss per run (diamonds: held-out loss before and after)", fontsize=10)
    axes[0][0].legend(fontsize=7)
    if gaps:
        ax = axes[0][1]
        ax.axhline(0, color="C0", linestyle="-", label=f"{first_name} (reference)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss minus the reference run's")
        ax.set_title("Same batches, difference from the first run (below 0: lower loss)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_metrics(summary: dict[str, dict[str, float]]):
    """Base vs tuned, one panel per metric of eval.json's summary (which way is better: its task's
    registry entry, tasks.py)."""
    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [summary[name]["base"], summary[name]["tuned"]]
        bars = ax.bar(["base", "tuned"], values, color=["#999999", "#2a9d55"])
        ax.bar_label(bars, fmt="%.3g")
        better = "lower" if metric(name).lower_is_better else "higher"
        ax.set_title(f"{name}\n({better} is better)", fontsize=9)
        ax.set_ylim(0, max(values) * 1.25 or 1)
    fig.tight_layout()
    return fig


def plot_answer_metrics(rows: list[dict[str, Any]], labels: tuple[str, str] = ("base", "tuned")):
    """One panel per answer metric (answers.compare's rows: base, tuned, the paired interval of tuned -
    base): the two means as bars, and on the second bar the paired 95% interval of the difference
    placed around it (base + low to base + high): when it reaches the first bar's height, the
    difference cannot be told from zero."""
    means = {labels[0]: {r["metric"]: r["base"] for r in rows}, labels[1]: {r["metric"]: r["tuned"] for r in rows}}
    steps = [{**r, "step": f"{labels[0]} -> {labels[1]}"} for r in rows]
    return plot_answer_steps(means, steps, labels)


STEP_COLOURS = ("#999999", "#2a9d55", "#3b6fb6")


def plot_answer_steps(means: dict[str, dict[str, float]], steps: list[dict[str, Any]], labels: tuple[str, ...]):
    """One panel per answer metric, one bar per model in `labels` order (`means[label][metric]`), each
    bar after the first with the paired 95% interval of its step from the bar before it (the row of
    `steps` whose 'step' is "previous -> label": answers.compare's keys, base = the step's first model)
    placed around it: when the interval reaches the previous bar's height, that step cannot be told
    from zero. The means are printed under the bars, clear of the intervals."""
    metrics = [r["metric"] for r in steps if r["step"] == f"{labels[0]} -> {labels[1]}"]
    by_step = {(r["step"], r["metric"]): r for r in steps}
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 * len(metrics) * max(1.0, len(labels) / 2.5), 3.3),
                             squeeze=False)
    for ax, name in zip(axes[0], metrics):
        values = [means[label][name] for label in labels]
        ax.bar(range(len(labels)), values, color=STEP_COLOURS[:len(labels)])
        tops = list(values)
        for i in range(1, len(labels)):
            row = by_step.get((f"{labels[i - 1]} -> {labels[i]}", name))
            if row is None:
                continue
            low, high = values[i - 1] + row["low"], values[i - 1] + row["high"]
            ax.errorbar([i], [values[i]], yerr=[[values[i] - low], [high - values[i]]], fmt="none",
                        ecolor="black", capsize=5)
            tops.append(high)
        ax.set_xticks(range(len(labels)), [f"{label}\n{v:.3f}" for label, v in zip(labels, values)], fontsize=8.5)
        better = "lower" if by_step[(f"{labels[0]} -> {labels[1]}", name)]["lower_is_better"] else "higher"
        ax.set_title(f"{name}\n({better} is better)", fontsize=9)
        ax.set_ylim(0, max(tops) * 1.15 or 1)
    fig.tight_layout()
    return fig


def plot_preference_margins(rows: list[dict[str, Any]], sft_weight: float = 0.0):
    """DPO per logged step: the implicit rewards of chosen and rejected answers (beta x log-ratio to the
    reference), their margin, and the loss (DPO's is log 2 at the start, when the policy equals the
    reference; `sft_weight` > 0 adds that weight x the chosen answers' NLL: preference.sft_weight)."""
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.3))
    axes[0].plot(steps, [r["rewards/chosen"] for r in rows], marker=".", color="#55a868", label="chosen")
    axes[0].plot(steps, [r["rewards/rejected"] for r in rows], marker=".", color="#c44e52", label="rejected")
    axes[0].axhline(0, color="#999", lw=0.8)
    axes[0].legend()
    axes[0].set_title("rewards")
    axes[1].plot(steps, [r["rewards/margins"] for r in rows], marker=".", color="#4c72b0")
    axes[1].axhline(0, color="#999", lw=0.8)
    axes[1].set_title("reward margin (chosen - rejected)")
    axes[2].plot(steps, [r["loss"] for r in rows], marker=".", color="#4c72b0")
    axes[2].axhline(0.6931, color="#999", lw=0.8, ls="--")
    axes[2].set_title(f"loss: DPO + {sft_weight:g} x NLL(chosen) (dashed: log 2)" if sft_weight
                      else "DPO loss (dashed: log 2)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig
