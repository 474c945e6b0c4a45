"""Stage 03: turn messy data files into correct, inspected training examples, or say what is wrong.

This module only orchestrates and shows; the steps live in the core below the stages, where 02, 04,
04b and 05 use them too. Flow (`prepared.prepare_data`): read each source (`sources`: hub id, or a
JSON / JSONL / CSV / Parquet file in the data directory) -> map columns -> detect the format (Alpaca,
chat messages, ShareGPT, prompt/completion) -> validate every row (`formats`; dropped rows are counted
by reason, with examples) -> render the prompt and tokenize it (`prompts`, the rule every stage
shares), labels -100 on the prompt -> length check (drop or truncate, counted) -> dedupe -> subsample
per source -> deterministic train/eval split -> repeat up-weighted sources in train -> save the
tokenized sets with a fingerprint, so an unchanged rerun reuses them. The report's padding and
packing efficiency come from `batching`.

Here: the stage's entry point for a run (`prepare_run_data`, `run_stage`) and what notebook 03 shows
(the dropped rows, one table row per source, an example with its trained tokens highlighted).
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

from .models import load_tokenizer
from .prepared import PreparedData, prepare_data


def iter_dropped(report: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for reason, rows in report["dropped_examples"].items():
        for row in rows:
            yield {"reason": reason, **row}




def prepare_run_data(run) -> PreparedData:
    """Stage 03 for a run: tokenizer from the run's model, sets saved under the run's data folder."""
    cfg = run.cfg
    return prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.model.max_seq_length,
                        cfg.train.micro_batch_size, folder=run)


def run_stage(run) -> dict[str, Any]:
    """Stage 03's entry point (CLI, sweep, the notebook's steps): prepare or reuse the sets; the
    report (`data_report.json`, written last) says what was kept and dropped and why."""
    return prepare_run_data(run).report


def dropped_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per source: where it came from, the sample drawn, rows read, kept, truncated, and
    dropped by reason."""
    reasons = sorted(report["dropped"])
    sampled = lambda s: (f"{s['sample']['rows']:,} of {s['sample']['of']:,} (seed {s['sample']['seed']})"  # noqa: E731
                         if "sample" in s else "all")
    return [{"source": name, "from": s["origin"], "sampled": sampled(s), "format": s["format"],
             "rows": s["rows"], "kept": s["kept"],
             "truncated": s["truncated"], **{f"dropped: {r}": s["dropped"].get(r, 0) for r in reasons}}
            for name, s in report["sources"].items()]


def render_example_html(tokenizer, example: dict[str, Any]) -> str:
    """An example as HTML: tokens without loss (label -100) greyed and struck through."""
    spans, run_ids, run_masked = [], [], None

    def flush():
        if run_ids:
            text = html.escape(tokenizer.decode(run_ids))
            style = ("color:#999;background:#f2f2f2;text-decoration:line-through" if run_masked
                     else "color:#063;background:#e3f6e3")
            spans.append(f'<span style="{style}">{text}</span>')

    for token, label in zip(example["input_ids"], example["labels"]):
        masked = label == -100
        if masked != run_masked:
            flush()
            run_ids, run_masked = [], masked
        run_ids.append(token)
    flush()
    head = (f'<div style="font:12px sans-serif;color:#555">{html.escape(str(example.get("source")))} '
            f'row {example.get("row")}: {len(example["input_ids"])} tokens, '
            f'{sum(1 for x in example["labels"] if x != -100)} trained</div>')
    body = "".join(spans).replace("\n", "<br>")
    return f'{head}<div style="font:13px monospace;border:1px solid #ddd;padding:6px;margin-bottom:10px">{body}</div>'
