"""What the README quotes from a run, and its Colab links: the numbers between `<!-- r:KEY -->`
markers (README.md and docs/serving.md: `QUOTING`) come from the run's report files through
`docs/results.json` (written with the tutorial's pages by `docs.build_site`; tests/test_docs.py checks
the committed pages agree), and the line of
"Open in Colab" links between `<!-- colab -->` markers, like every notebook's setup cell, from the
one repository URL in pyproject.toml (`python -m qlora_helpers.docs --sync-links` after a fork).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .bootstrap import repository_url, setup_cell
from .errors import QLoraError
from .paths import PROJECT_ROOT, read_json, write_text_atomic
from .runs import NOTEBOOK_DIR, RunFolder

# key: (report, path inside it, format). The README quotes these between <!-- r:key --> markers. A path may
# be a tuple of alternatives, the first the report has wins: `rouge_tuned` is the SFT adapter's ROUGE-L,
# from 05's three-way table when 04b ran (05's "tuned" is then SFT+DPO), from its summary when not.
ANSWER_METRICS = (("clean_stop", "clean stop"), ("repetition", "repetition"), ("length_gap", "length gap"),
                  ("rouge", "ROUGE-L F1"))  # (README key, 05's metric name)
RESULTS = {
    "perplexity_ratio": ("quantization_report", "perplexity_ratio_4bit_vs_full", "x{:.2f}"),
    "train_minutes": ("train_log", "summary.train_seconds", "minutes"),
    "train_steps": ("train_log", "summary.steps", "{:,}"),
    "trainable_percent": ("train_log", "summary.parameters.trainable_percent", "{:.2f}%"),
    "heldout_examples": ("train_log", "summary.eval_examples", "{:,}"),
    "grad_norms": ("train_log", "log_history[].grad_norm", "range"),
    "heldout_loss_base": ("train_log", "summary.heldout_loss_base", "{:.3f}"),
    "heldout_loss_tuned": ("train_log", "summary.heldout_loss_tuned", "{:.3f}"),
    "rouge_base": ("eval_report", "summary.ROUGE-L F1.base", "{:.3f}"),
    "rouge_tuned": ("eval_report", ("three_way.answers.means.sft.ROUGE-L F1", "summary.ROUGE-L F1.tuned"), "{:.3f}"),
    # 05's answer metrics, base -> SFT (after 04b, 05's "tuned" is SFT+DPO: SFT is in its three-way table),
    # each mean (ROUGE-L's above) and its paired 95% interval (a row of a list, picked by [field=value])
    **{f"{slug}_{side}": ("eval_report", ((f"three_way.answers.means.sft.{metric}",) if side == "tuned" else ())
                          + (f"summary.{metric}.{side}",), "{:.3f}")
       for slug, metric in ANSWER_METRICS if slug != "rouge" for side in ("base", "tuned")},
    **{f"{slug}_interval": ("eval_report", (f"three_way.answers.differences[step=base -> sft][metric={metric}]",
                                            f"differences[metric={metric}]"), "interval")
       for slug, metric in ANSWER_METRICS},
    "dpo_pairs": ("preference_report", "accuracy.difference.n", "{:,}"),
    "dpo_accuracy_sft": ("preference_report", "accuracy.before", "{:.3f}"),
    "dpo_accuracy_dpo": ("preference_report", "accuracy.after", "{:.3f}"),
    # 06's export gate, quoted by docs/serving.md: probes of 4 each form answers as the adapter model does
    "gate_merged_equal": ("export_report", "forms[form=merged].greedy_equal", "{}"),
    **{f"gate_{gguf_type}_equal": ("export_report", f"forms[form=gguf-{gguf_type}].greedy_equal", "{}")
       for gguf_type in ("f16", "q8_0", "q4_k_m")},
    "gate_f16_kl": ("export_report", "forms[form=gguf-f16].mean_kl", "{:.2g}"),
    "gate_q4_k_m_kl": ("export_report", "forms[form=gguf-q4_k_m].mean_kl", "{:.2g}"),
    "gate_q4_k_m_bits": ("export_report", "export.gguf.q4_k_m.bits_per_weight", "{:g}"),
}
QUOTING = ("README.md", "docs/serving.md")  # the pages whose <!-- r:key --> markers hold these numbers
NOTEBOOKS = "0[1-6]*_*.ipynb"  # the stage notebooks, 04b_preference included
_MARKER = re.compile(r"<!-- r:([\w-]+) -->(.*?)<!-- /r -->", re.S)
_COLAB = re.compile(r"<!-- colab -->.*?<!-- /colab -->", re.S)


def _format(value: Any, fmt: str) -> str:
    if fmt == "interval":  # a compare row: its paired 95% interval
        return f"[{value['low']:+.3f}, {value['high']:+.3f}]"
    if fmt == "range":  # the values of a list's rows
        return f"between {min(value):.2f} and {max(value):.2f} at all {len(value)}"
    return f"{value / 60:.0f} min" if fmt == "minutes" else fmt.format(value)


def results_digest(folder: RunFolder) -> dict[str, dict[str, Any]]:
    """The numbers the README quotes, each with the report file and key it comes from. Reports a run
    has not written are left out; a report without the key is an error naming both."""
    out, reports = {}, {}
    for key, (report, paths, fmt) in RESULTS.items():
        path = getattr(folder, report)
        if not path.is_file():
            continue
        if report not in reports:  # each report read once (eval.json holds every answer: hundreds of KB)
            reports[report] = read_json(path)
        data, paths = reports[report], (paths,) if isinstance(paths, str) else paths
        found = next(((dotted, value) for dotted in paths if (value := _lookup(data, dotted)) is not _MISSING), None)
        if found is None:
            raise QLoraError(f"{path.name} has no {' or '.join(map(repr, paths))} (wanted for the README's {key!r}): "
                             f"update readme.RESULTS to the report's layout.")
        dotted, value = found
        out[key] = {"value": value, "text": _format(value, fmt) if value is not None else "n/a",
                    "file": path.name, "key": dotted}
    return out


_MISSING = object()
_SELECTOR = re.compile(r"\[([^=\]]+)=([^\]]*)\]")


def _lookup(data: Any, dotted: str) -> Any:
    """`a.b[field=value][other=value].c`: keys, and in a list the first row whose fields hold those values;
    `a[].c`: the `c` of every row of list `a` that has one (missing if none has)."""
    if "[]." in dotted:
        head, rest = dotted.split("[].", 1)
        rows = _lookup(data, head)
        values = [v for row in rows if (v := _lookup(row, rest)) is not _MISSING] if isinstance(rows, list) else []
        return values or _MISSING
    for part in dotted.split("."):
        name, selectors = part.split("[", 1)[0], _SELECTOR.findall(part)
        if not isinstance(data, dict) or name not in data:
            return _MISSING
        data = data[name]
        if selectors:
            rows = [r for r in data if isinstance(r, dict) and all(str(r.get(f)) == v for f, v in selectors)] \
                if isinstance(data, list) else []
            if not rows:
                return _MISSING
            data = rows[0]
    return data


def fill_readme(text: str, results: dict[str, dict[str, Any]]) -> str:
    """The README with every <!-- r:key --> marker holding the run's value."""
    unknown = [m.group(1) for m in _MARKER.finditer(text) if m.group(1) not in results]
    if unknown:
        raise QLoraError(f"README.md quotes {', '.join(unknown)}, which docs/results.json does not have "
                         f"(known: {', '.join(results)}). Fix the marker or readme.RESULTS.")
    missing = [f"{key} ({results[key]['file']} {results[key]['key']} is null)" for key in
               dict.fromkeys(m.group(1) for m in _MARKER.finditer(text)) if results[key]["value"] is None]
    if missing:
        raise QLoraError(f"The page quotes numbers the run did not measure: {'; '.join(missing)}. Build the pages "
                         f"from a run that measured them (a fresh `make docs`).")
    return _MARKER.sub(lambda m: f"<!-- r:{m.group(1)} -->{results[m.group(1)]['text']}<!-- /r -->", text)


def readme_disagreements(text: str, results: dict[str, dict[str, Any]]) -> list[str]:
    """'key: README says X, the run's report says Y' for every quoted number that differs."""
    return [f"{m.group(1)}: README says {m.group(2)!r}, {results.get(m.group(1), {}).get('file')} says "
            f"{results.get(m.group(1), {}).get('text')!r}"
            for m in _MARKER.finditer(text) if results.get(m.group(1), {}).get("text") != m.group(2)]


def colab_links(url: str) -> str:
    """The README's line of "Open in Colab" links, one per notebook, from the repository URL."""
    slug = url.rstrip("/").removesuffix(".git").split("github.com/", 1)[-1]
    links = [f"[{nb.name.split('_')[0]}](https://colab.research.google.com/github/{slug}/blob/main/notebooks/{nb.name})"
             for nb in sorted(NOTEBOOK_DIR.glob(NOTEBOOKS))]
    return f"<!-- colab -->Open in Colab: {' · '.join(links)}<!-- /colab -->"


def sync_links(root: Path = PROJECT_ROOT) -> list[Path]:
    """After the repository URL in pyproject.toml changes (a fork): rewrite the README's Colab links
    and every notebook's setup cell from it. Returns the files changed."""
    url, changed = repository_url(root), []
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = _COLAB.sub(colab_links(url), text)
    if new != text:
        changed.append(write_text_atomic(readme, new))
    for path in sorted((root / NOTEBOOK_DIR.relative_to(PROJECT_ROOT)).glob(NOTEBOOKS)):
        nb = json.loads(path.read_text(encoding="utf-8"))
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        lines = setup_cell(url).splitlines(keepends=True)
        if first["source"] != lines:
            first["source"] = lines
            changed.append(write_text_atomic(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n"))
    return changed
