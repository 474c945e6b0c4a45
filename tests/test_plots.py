"""Figures whose numbers a reader takes from the picture: the bars must carry the values given."""

import pytest

from qlora_helpers.plots import plot_latency


def test_latency_charts_answer_one_question_each_with_every_form_and_batch():
    forms = [{"form": "adapter", "batch": 1, "ttft_s": 0.5, "tokens_per_s": 20.0},
             {"form": "merged", "batch": 1, "ttft_s": 0.2, "tokens_per_s": 50.0},
             {"form": "merged", "batch": 4, "ttft_s": 0.3, "tokens_per_s": 150.0}]
    fig = plot_latency(forms)
    first, speed = fig.axes
    assert first.get_title().startswith("Which form answers first?") and "batch 1" in first.get_title()
    assert speed.get_title().startswith("Which form generates fastest?")
    assert [b.get_width() for b in first.patches] == [0.5, 0.2]  # one bar per form, at the smallest batch
    assert [t.get_text() for t in first.get_yticklabels()] == ["adapter", "merged"]
    widths = [b.get_width() for b in speed.patches]
    assert widths[:2] == [20.0, 50.0] and widths[3] == 150.0  # batch 1 per form, then batch 4 (adapter: none)
    assert widths[2] != widths[2]  # NaN: the adapter was not measured at batch 4, and no bar pretends it was
    assert [t.get_text() for t in speed.get_legend().get_texts()] == ["batch 1", "batch 4"]


def test_answer_metric_bars_carry_the_means_and_the_paired_interval_around_the_tuned_bar():
    from qlora_helpers.answers import compare
    from qlora_helpers.plots import plot_answer_metrics

    base = {"clean stop": [0.0, 0.0, 1.0, 0.0], "repetition": [0.5, 0.4, 0.0, 0.6]}
    tuned = {"clean stop": [1.0, 1.0, 1.0, 0.0], "repetition": [0.1, 0.0, 0.0, 0.2]}
    rows = compare(base, tuned)
    fig = plot_answer_metrics(rows)
    assert [ax.get_title() for ax in fig.axes] == ["clean stop\n(higher is better)", "repetition\n(lower is better)"]
    for ax, row in zip(fig.axes, rows):
        assert [b.get_height() for b in ax.patches] == [row["base"], row["tuned"]]
        (segments,) = [c for c in ax.collections if c.get_segments()]
        (low, high), = [sorted(p[1] for p in s) for s in segments.get_segments()]
        assert low == pytest.approx(row["base"] + row["low"]) and high == pytest.approx(row["base"] + row["high"])
        # the means under the bars, where no interval crosses them
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == [f"base\n{row['base']:.3f}", f"tuned\n{row['tuned']:.3f}"]


def test_three_way_bars_carry_each_steps_interval_from_the_bar_before():
    from qlora_helpers.answers import compare
    from qlora_helpers.plots import plot_answer_steps

    values = {"base": {"clean stop": [0.0, 0.0, 1.0, 0.0]}, "sft": {"clean stop": [1.0, 0.0, 1.0, 0.0]},
              "sft+dpo": {"clean stop": [1.0, 1.0, 1.0, 1.0]}}
    steps = [{"step": f"{a} -> {b}", **row} for a, b in (("sft", "sft+dpo"), ("base", "sft"), ("base", "sft+dpo"))
             for row in compare(values[a], values[b])]
    means = {label: {"clean stop": sum(v["clean stop"]) / 4} for label, v in values.items()}
    (ax,) = plot_answer_steps(means, steps, ("base", "sft", "sft+dpo")).axes
    assert [b.get_height() for b in ax.patches] == [0.25, 0.5, 1.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base\n0.250", "sft\n0.500", "sft+dpo\n1.000"]
    segments = [sorted(p[1] for p in s) for c in ax.collections for s in c.get_segments()]
    first, second = ({r["step"]: r for r in steps}[k] for k in ("base -> sft", "sft -> sft+dpo"))
    assert segments == [pytest.approx([0.25 + first["low"], 0.25 + first["high"]]),
                        pytest.approx([0.5 + second["low"], 0.5 + second["high"]])]
