"""The tutorial as pages: the executed notebooks of a run as Markdown + PNG pages GitHub shows
(`docs/tutorial/`), as an HTML site (`docs/site/`), and the README's quoted results from that run.

`make docs` runs 01-06 on the default profile with the optional stage 04b on, then
`python -m qlora_helpers.docs` renders `outputs/default/notebooks/`. Markdown + PNG rather than
executed .ipynb files under docs/: GitHub renders Markdown with relative images and links everywhere
(prev/next, alt text, no 1-MB JSON with base64 images in every diff), and the text diffs review like
code. nbconvert renders the HTML site
(what JupyterLab's own "Export as HTML" uses). This module makes the executed copies readable:

- tqdm's notebook bars are ipywidgets, saved as a reference to widget state that a static page
  cannot run (GitHub showed them frozen at `0%`): a bar still open at the end becomes the line of
  text it last showed; a closed one (`leave=False`) is dropped, as JupyterLab hides it.
- other widgets (06's chat box) become a one-line note: they need a live kernel.
- text progress bars in streams keep only what the last carriage return left on each line.
- the project folder of the machine that ran them (`/home/you/qlora-notebooks/`) is cut from paths in
  sources and outputs, leaving `outputs/default/...` as a reader's own clone would print it (and
  `../data/...` for a data folder beside it; the offline data folder of `QLORA_DATA_DIR`, wherever it is,
  as `$QLORA_DATA_DIR/...`); other absolute paths (caches under the home folder,
  temporary folders) become `~/...` and `<tmp>/...`.
- papermill's injected parameters cell is dropped; an offline machine's hub-probe errors
  (`[Errno -2] ...`) read "offline"; long floats in outputs are rounded for people; consecutive
  stream outputs (06's streamed tokens) become one block; every image gets alt text saying what the
  plot shows, and every page a real title and prev/next links.
- beside the pages it writes `docs/results.json`, the run's numbers that the README and docs/serving.md
  quote, and fills them from it (`readme.py`, which also generates the README's Colab links).
"""

from __future__ import annotations

import base64
import html
import os
import re
import sys
from pathlib import Path

from .errors import QLoraError
from .paths import PROJECT_ROOT, read_json, write_json_atomic, write_text_atomic
from .readme import QUOTING, fill_readme, results_digest, sync_links
from .runs import RunFolder

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _text_of(value: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", value or "")).replace("\xa0", " ").replace("\u2007", " ")


def widget_as_text(model_id: str, state: dict) -> str | None:
    """The final text of a tqdm bar (HBox of HTML, FloatProgress, HTML); "" for a bar that closed
    hidden (tqdm's `leave=False`: JupyterLab no longer shows it); None for any other widget."""
    box = state.get(model_id, {}).get("state", {})
    if box.get("_model_name") != "HBoxModel":
        return None
    layout = state.get(str(box.get("layout", "")).removeprefix("IPY_MODEL_"), {}).get("state", {})
    parts = [state.get(c.removeprefix("IPY_MODEL_"), {}).get("state", {}) for c in box.get("children", [])]
    names = [p.get("_model_name") for p in parts]
    if names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    if layout.get("visibility") == "hidden":
        return ""
    left, bar, right = parts
    filled = round(10 * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
    return f"{_text_of(left.get('value'))}|{'█' * filled}{' ' * (10 - filled)}|{_text_of(right.get('value'))}"


def _final_lines(text: str) -> str:
    """What a terminal shows after carriage returns: the last segment of each line."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def make_static(nb: dict, root: Path | None = None, data_dir: str | None = None) -> dict:
    """The notebook with its widget outputs turned into text and its widget state removed; with
    `root`, that folder's absolute path is cut from sources and text outputs (paths become relative);
    with `data_dir` (the offline data folder the run read), its path reads `$QLORA_DATA_DIR`, the
    setting a reader gives their own copy (the machine's folder means nothing in their clone)."""
    state = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    folder = Path(root).resolve() if root else None
    data = sorted({str(Path(data_dir)), str(Path(data_dir).resolve())}, key=len, reverse=True) \
        if data_dir and Path(data_dir).is_absolute() else []

    def relative(text: str) -> str:
        for path in data:
            text = re.sub(re.escape(path) + r"(?=/|(?![\w.-]))", "$QLORA_DATA_DIR", text)
        if folder is None:
            return text
        # inside the project: relative; the project itself: "."; a folder beside it: "../"
        text = re.sub(re.escape(str(folder)) + r"(/|(?![\w.-]))", lambda m: "" if m.group(1) else ".", text)
        return text.replace(f"{folder.parent}/", "../") if folder.parent != folder else text

    for cell in nb["cells"]:
        cell["source"] = relative(_joined(cell["source"]))
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = relative(_final_lines(_joined(out["text"])))
            for kind in ("text/plain", "text/html", "text/markdown"):
                if kind in out.get("data", {}):
                    out["data"][kind] = relative(_joined(out["data"][kind]))
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(out)
                continue
            model = view.get("model_id", "")
            text = widget_as_text(model, state) if model in state else ""
            if text:  # stdout: the bar is progress, not a warning (stderr pages show it red)
                outputs.append({"output_type": "stream", "name": "stdout", "text": text + "\n"})
            elif text is None:  # an open widget that is not a bar, e.g. 06's chat box
                outputs.append({"output_type": "display_data", "metadata": {}, "data": {
                    "text/html": "<p><i>[An interactive widget: it runs when the notebook runs in a live kernel "
                                 "(JupyterLab or Colab).]</i></p>",
                    "text/plain": "[interactive widget]"}})
            # a hidden bar, or a widget whose state was not saved, is dropped
        if "outputs" in cell:
            cell["outputs"] = outputs
    return nb


# --- pages a person reads: no machine noise ---------------------------------------------------------

# What each figure of the notebooks shows, by the plotting call in its cell (the alt text of its image).
ALT_TEXT = {
    "plot_footprint": "Bar charts of memory: the whole model and its quantized linear layers, 16-bit reference "
                      "against the loaded full-precision model against 4-bit",
    "plot_4bit_levels": "The 16 levels of NF4 and of FP4 over the normal distribution of block-scaled weights: "
                        "NF4's levels follow the distribution",
    "plot_layer_errors": "Relative weight error of every quantized layer after a 4-bit round trip, NF4 against FP4",
    "plot_lengths": "Histogram of training example lengths in tokens, with the model.max_seq_length limit",
    "plot_padding_efficiency": "Share of computed tokens that are real tokens: padded micro-batches (shuffled, "
                               "and grouped by length) against packed rows",
    "plot_lora_shapes": "LoRA's matrices to scale: the frozen weight W beside the trainable B and A, with the "
                        "number of weights in each",
    "plot_training": "Training curves per optimizer step: loss, learning-rate schedule and gradient norm",
    "plot_answer_metrics": "Answer metrics of base and tuned model on the same held-out instructions, each "
                           "with the paired 95% interval of the difference",
    "plot_answer_steps": "Answer metrics of the base, SFT and SFT+DPO models on the same held-out instructions, "
                         "each step with the paired 95% interval of its difference",
    "plot_preference_margins": "DPO per step: the implicit rewards of chosen and rejected answers, their margin, "
                               "and the loss",
    "plot_metrics": "Base model against tuned model on every evaluation metric",
    "plot_latency": "Two charts of the serving forms: time to the first token, and tokens per second at each "
                    "batch size",
}
# Figures also written under a fixed name, for the README to show (its picture).
FEATURED = {"plot_training": "training-curves.png"}
_ERRNO = re.compile(r"\[Errno -?\d+\][^\n<)\]'\"]*")
_STYLER = re.compile(r"(?<![\w-])T_([0-9a-f]{5})(?=[_\"\s{,]|$)")  # Styler's id: T_ + 5 hex digits of a uuid4
_FLOAT = re.compile(r"(?<![\w.])(-?\d+\.\d{5,})(?![\w.])")
_HOME = re.compile(r"(?<![\w.~])/(?:root|home/[^/\s'\"<]+)(?=/)")
_TMP = re.compile(r"(?<![\w.])/(?:tmp|work|var/folders)/[^\s'\"<>)]*?([^/\s'\"<>)]+)(?=[\s'\"<>)]|$)")


def human_number(value: float) -> str:
    """A float as a person reads it: four significant digits, thousands separated; zero as 0 (pandas and
    Styler print it as 0.000000, which is no small number to write in powers of ten)."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"


def scrub(text: str) -> str:
    """Output text for a page: home and temporary paths shortened, hub-probe errors as 'offline',
    long floats rounded."""
    text = _HOME.sub("~", text)
    text = _TMP.sub(lambda m: f"<tmp>/{m.group(1)}", text)
    text = _ERRNO.sub("offline", text)
    return _FLOAT.sub(lambda m: human_number(float(m.group(1))), text)


def _alt(source: str, heading: str) -> str:
    called = [alt for name, alt in ALT_TEXT.items() if f"{name}(" in source]
    return called[0] if called else f"Figure: {heading or 'output of the cell above'}"


def tidy(nb: dict) -> dict:
    """After `make_static`: no injected parameters cell, one block per run of stream output, scrubbed
    text, pandas Styler's random table ids numbered in page order (the same table, the same page text:
    a rebuilt page diffs only where its numbers changed), alt text on every image, the page title in
    the metadata (nbconvert's <title>)."""
    nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    heading, tables = "", {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            found = re.findall(r"^#+\s+(.+)$", _joined(cell["source"]), flags=re.M)
            heading = found[-1] if found else heading
            continue
        outputs: list[dict] = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                out["text"] = scrub(_joined(out["text"]))
                if outputs and outputs[-1].get("output_type") == "stream" and outputs[-1]["name"] == out["name"]:
                    outputs[-1]["text"] += out["text"]
                    continue
            for kind in ("text/plain", "text/html", "text/markdown"):
                if kind in out.get("data", {}):
                    out["data"][kind] = scrub(_joined(out["data"][kind]))
            if "text/html" in out.get("data", {}):
                out["data"]["text/html"] = _STYLER.sub(lambda m: f"T_{tables.setdefault(m.group(1), len(tables) + 1)}",
                                                       out["data"]["text/html"])
            if "image/png" in out.get("data", {}):
                alt = _alt(_joined(cell["source"]), heading)
                out.setdefault("metadata", {}).setdefault("image/png", {})["alt"] = alt
            outputs.append(out)
        cell["outputs"] = outputs
    nb.setdefault("metadata", {})["title"] = _summary(nb)[0]
    return nb


def _summary(nb: dict) -> tuple[str, str]:
    """The notebook's title (first heading) and first paragraph, from its first markdown cell."""
    first = next((_joined(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"), "")
    blocks = re.split(r"\n\s*\n", first.strip())
    return blocks[0].lstrip("# ").strip(), (blocks[1] if len(blocks) > 1 else "")


# --- Markdown + PNG pages -------------------------------------------------------------------------------


def _nav(prev: tuple[str, str] | None, nxt: tuple[str, str] | None, index: str) -> str:
    parts = [f"[← {html.escape(prev[1])}]({prev[0]})" if prev else "", f"[Contents]({index})",
             f"[{html.escape(nxt[1])} →]({nxt[0]})" if nxt else ""]
    return " · ".join(p for p in parts if p)


def _strip_styles(markup: str) -> str:
    return re.sub(r"<style[^>]*>.*?</style>", "", markup, flags=re.S).strip()


def _output_markdown(out: dict, image: Path | None) -> str:
    kind = out.get("output_type")
    if kind == "stream":
        return f"```text\n{out['text'].rstrip()}\n```"
    if kind == "error":
        return f"```text\n{out.get('ename')}: {out.get('evalue')}\n```"
    data = out.get("data", {})
    if image is not None:
        alt = out.get("metadata", {}).get("image/png", {}).get("alt", "figure")
        return f"![{alt}]({image.parent.name}/{image.name})"
    if "text/markdown" in data:
        return data["text/markdown"]
    if "text/html" in data:
        return _strip_styles(data["text/html"])
    return f"```text\n{data['text/plain'].rstrip()}\n```" if "text/plain" in data else ""


def markdown_page(nb: dict, stem: str, pages_dir: Path, nav: str) -> str:
    """One tidied notebook as Markdown, its images written as PNG files under `pages_dir/img/`."""
    blocks, count = [nav], 0
    for cell in nb["cells"]:
        source = _joined(cell["source"]).strip()
        if cell["cell_type"] == "markdown":
            blocks.append(source)
            continue
        if source:
            blocks.append(f"```python\n{source}\n```")
        for out in cell.get("outputs", []):
            image = None
            if "image/png" in out.get("data", {}):
                count += 1
                image = pages_dir / "img" / f"{stem}-{count}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                image.write_bytes(base64.b64decode(_joined(out["data"]["image/png"])))
                for name in (f for call, f in FEATURED.items() if f"{call}(" in source):
                    (image.parent / name).write_bytes(image.read_bytes())
            text = _output_markdown(out, image)
            if text:
                blocks.append(text)
    blocks.append(nav)
    return "\n\n".join(blocks) + "\n"


INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;
line-height:1.5;color:#222}}
li{{margin-bottom:1rem}} a{{font-weight:600}} .meta{{color:#666;font-size:.9rem}}</style></head><body>
<h1>{title}</h1>
<p>{intro}</p>
<ul>
{items}
</ul>
<p class="meta">Built by <code>make docs</code> with nbconvert from <code>{source}</code>.</p>
</body></html>
"""
INTRO = ("Fine-tuning a causal language model with QLoRA (4-bit NF4 base weights + LoRA adapters), one notebook "
         "per step, shown with the outputs of one real run on the `{config}` profile (SmolLM2-135M-Instruct on an "
         "Alpaca sample, on a CPU). Read them in order; each step reads what the earlier ones wrote to the run "
         "folder. A hub dataset the machine could not reach was read from its offline copy in the data folder that "
         "`QLORA_DATA_DIR` names, printed here as `$QLORA_DATA_DIR`. To run them yourself, see the project's "
         "README.")
INTRO_PREFERENCE = (" This run also switched on the optional stage 04b (`--set preference.enabled=true`: DPO on "
                    "preference pairs after 04's supervised fine-tuning), so 05 compares the base, SFT and SFT+DPO "
                    "models and 06 serves the DPO adapter; `make run` leaves 04b off.")


def _executed(notebooks_dir: Path) -> list[tuple[Path, dict]]:
    """The finished executed notebooks, made static and tidied."""
    import nbformat

    found = []
    root = Path(notebooks_dir).resolve().parents[2]  # <project>/outputs/<run>/notebooks/
    for path in sorted(Path(notebooks_dir).glob("[0-9][0-9]*_*.ipynb")):
        nb = make_static(nbformat.read(path, as_version=4), root=root, data_dir=os.environ.get("QLORA_DATA_DIR"))
        papermill = nb.get("metadata", {}).get("papermill", {})
        if papermill and (not papermill.get("end_time") or papermill.get("exception")):
            print(f"skipped {path}: its execution did not finish (still running, or failed)", file=sys.stderr)
            continue
        found.append((path, tidy(nb)))
    if not found:
        raise QLoraError(f"No executed notebooks in {notebooks_dir}: run them first "
                         f"(`make run`, or `make docs`, which runs and renders).")
    return found


def _html_page(nb: dict, nav: str):
    import nbformat
    from nbconvert import HTMLExporter

    cells = [{"cell_type": "markdown", "metadata": {}, "source": nav}, *nb["cells"],
             {"cell_type": "markdown", "metadata": {}, "source": nav}]
    node = nbformat.from_dict({**nb, "cells": cells})
    for i, cell in enumerate(node.cells):
        cell.setdefault("id", f"page-{i}")
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(node)
    # nbconvert's lab template writes no alt attribute (it fills in "No description has been
    # provided"): set each output image's own, in page order
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(body, features="html.parser")
    alts = [o["metadata"]["image/png"]["alt"] for c in nb["cells"] for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    for img, alt in zip(soup.select(".jp-OutputArea-output img"), alts):
        img["alt"] = alt
    return str(soup)


def build_site(notebooks_dir: Path, site_dir: Path, pages_dir: Path | None = None) -> list[Path]:
    """Render every executed notebook in `notebooks_dir` as HTML into `site_dir` and as Markdown + PNG
    into `pages_dir` (default: `site_dir`'s sibling `tutorial/`), each with an index; write the run's
    results digest beside them (`results.json`). Returns the files written."""
    from nbconvert.filters import markdown2html

    executed = _executed(Path(notebooks_dir))
    run_folder = RunFolder(Path(notebooks_dir).resolve().parent)
    resumed = read_json(run_folder.train_log)["summary"].get("resumed_from") if run_folder.train_log.is_file() else None
    if resumed:  # its pages would show no base held-out loss and the minutes of the last piece only
        raise QLoraError(f"{run_folder.path}'s training resumed from {resumed}: the pages and the README's numbers "
                         f"come from a run trained in one go. Delete {run_folder.path} and run `make docs` again.")
    site_dir, pages_dir = Path(site_dir), Path(pages_dir or Path(site_dir).parent / "tutorial")
    site_dir.mkdir(parents=True, exist_ok=True)
    pages_dir.mkdir(parents=True, exist_ok=True)
    titles = [(path.stem, _summary(nb)[0]) for path, nb in executed]
    written, items, md_items = [], [], []
    for i, (path, nb) in enumerate(executed):
        prev, nxt = (titles[i - 1] if i else None), (titles[i + 1] if i + 1 < len(titles) else None)
        page = site_dir / f"{path.stem}.html"
        page.write_text(_html_page(nb, _nav(*[(f"{t[0]}.html", t[1]) if t else None for t in (prev, nxt)],
                                            "index.html")))
        md = pages_dir / f"{path.stem}.md"
        md.write_text(markdown_page(nb, path.stem, pages_dir,
                                    _nav(*[(f"{t[0]}.md", t[1]) if t else None for t in (prev, nxt)], "README.md")))
        written += [page, md]
        title, paragraph = _summary(nb)
        items.append(f'<li><a href="{page.name}">{html.escape(title)}</a>{markdown2html(paragraph)}</li>')
        md_items.append(f"- [{title}]({md.name}): {' '.join(paragraph.split())}")  # titles carry the numbers
    config = Path(str(executed[0][1].get("metadata", {}).get("papermill", {}).get("parameters", {})
                      .get("config", "default"))).stem
    source = Path(notebooks_dir).resolve()
    source = source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source
    preference = any(path.stem.startswith("04b") for path, _ in executed)
    intro = INTRO.format(config=config) + (INTRO_PREFERENCE if preference else "")
    title = "QLoRA in six notebooks" + (" and an optional seventh" if preference else "")
    (site_dir / "index.html").write_text(INDEX.format(intro=html.escape(intro).replace("`", ""), title=title,
                                                      items="\n".join(items), source=html.escape(str(source))))
    (pages_dir / "README.md").write_text(f"# {title}\n\n{intro}\n\n" + "\n".join(md_items) + "\n")
    written += [site_dir / "index.html", pages_dir / "README.md"]
    if run_folder.train_log.is_file():
        written.append(write_json_atomic(pages_dir.parent / "results.json", results_digest(run_folder)))
    return written


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sync-links"]:
        for path in sync_links():
            print(f"updated {path}")
        return
    source = Path(argv[0] if argv else "outputs/default/notebooks")
    target = Path(argv[1] if len(argv) > 1 else "docs/site")
    for page in build_site(source, target):
        print(f"{page} ({page.stat().st_size // 1024} KiB)")
    results = target.parent / "results.json"
    if results.is_file() and target.resolve().parent == (PROJECT_ROOT / "docs").resolve():
        for page in (PROJECT_ROOT / name for name in QUOTING):  # README.md, docs/serving.md
            write_text_atomic(page, fill_readme(page.read_text(encoding="utf-8"), read_json(results)))
            print(f"{page}: results filled from {results}")


if __name__ == "__main__":
    main(sys.argv[1:])
