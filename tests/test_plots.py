"""Figures whose numbers a reader takes from the picture: the bars must carry the values given."""

from qlora_helpers.plots import plot_latency


def test_latency_bars_show_each_form_and_batch():
    forms = [{"form": "adapter", "batch": 1, "ttft_s": 0.5, "tokens_per_s": 20.0},
             {"form": "merged", "batch": 1, "ttft_s": 0.2, "tokens_per_s": 50.0},
             {"form": "merged", "batch": 4, "ttft_s": 0.3, "tokens_per_s": 150.0}]
    fig = plot_latency(forms)
    ttft, speed = fig.axes
    assert [b.get_height() for b in ttft.patches] == [0.5, 0.2, 0.3]
    assert [b.get_height() for b in speed.patches] == [20.0, 50.0, 150.0]
    assert [t.get_text() for t in ttft.get_xticklabels()] == ["adapter\nbatch 1", "merged\nbatch 1", "merged\nbatch 4"]
