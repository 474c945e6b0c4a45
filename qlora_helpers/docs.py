"""The tutorial as a static site: the executed notebooks of a run rendered to HTML, plus an index.

`make docs` runs 01-06 on the default profile, then `python -m qlora_helpers.docs` renders
`outputs/default/notebooks/` into `docs/site/`. nbconvert does the rendering (it is what JupyterLab's
own "Export as HTML" uses, so the pages look like the notebooks, and it comes with JupyterLab);
this module only makes the executed copies readable as static pages:

- tqdm's notebook bars are ipywidgets, saved as a reference to widget state that a static page
  cannot run (GitHub showed them frozen at `0%`): a bar still open at the end becomes the line of
  text it last showed; a closed one (`leave=False`) is dropped, as JupyterLab hides it.
- other widgets (06's chat box) become a one-line note: they need a live kernel.
- text progress bars in streams keep only what the last carriage return left on each line.
- the project folder of the machine that ran them (`/home/you/qlora-notebooks/`) is cut from paths in
  sources and outputs, leaving `outputs/default/...` as a reader's own clone would print it (and
  `../shared/data/...` for a folder beside it).
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

from .errors import QLoraError

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


def make_static(nb: dict, root: Path | None = None) -> dict:
    """The notebook with its widget outputs turned into text and its widget state removed; with
    `root`, that folder's absolute path is cut from sources and text outputs (paths become relative)."""
    state = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    folder = Path(root).resolve() if root else None

    def relative(text: str) -> str:
        if folder is None:
            return text
        # inside the project: relative; the project itself: "."; beside it (../shared/data): "../"
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


def _summary(nb: dict) -> tuple[str, str]:
    """The notebook's title (first heading) and first paragraph, from its first markdown cell."""
    first = next(("".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                  for c in nb["cells"] if c["cell_type"] == "markdown"), "")
    blocks = re.split(r"\n\s*\n", first.strip())
    return blocks[0].lstrip("# ").strip(), (blocks[1] if len(blocks) > 1 else "")


INDEX = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>QLoRA in six notebooks</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#222}}
li{{margin-bottom:1rem}} a{{font-weight:600}} .meta{{color:#666;font-size:.9rem}}</style></head><body>
<h1>QLoRA in six notebooks</h1>
<p>Fine-tuning a causal language model with QLoRA (4-bit NF4 base weights + LoRA adapters), one
notebook per step, shown here with the outputs of one real run on the <code>{config}</code> profile
(SmolLM2-135M-Instruct on an Alpaca sample, on a CPU). Read them in order; each step reads what the
earlier ones wrote to the run folder. To run them yourself, see the project's README.</p>
<ol>
{items}
</ol>
<p class="meta">Built by <code>make docs</code> with nbconvert from <code>{source}</code>.</p>
</body></html>
"""


def build_site(notebooks_dir: Path, site_dir: Path) -> list[Path]:
    """Render every executed notebook in `notebooks_dir` to `site_dir` as HTML, with index.html;
    return the files written. (No notebook copies: committed notebooks stay without outputs.)"""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.filters import markdown2html

    notebooks = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise QLoraError(f"No executed notebooks in {notebooks_dir}: run them first "
                         f"(`make run`, or `make docs`, which runs and renders).")
    site_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    pages, items, config = [], [], "default"
    for path in notebooks:
        # sources as strings, as nbconvert wants; paths relative to the run's project folder
        # (<project>/outputs/<run>/notebooks/)
        nb = make_static(nbformat.read(path, as_version=4), root=Path(notebooks_dir).resolve().parents[2])
        papermill = nb.get("metadata", {}).get("papermill", {})
        if papermill and (not papermill.get("end_time") or papermill.get("exception")):
            print(f"skipped {path}: its execution did not finish (still running, or failed)", file=sys.stderr)
            continue
        config = Path(nb.get("metadata", {}).get("papermill", {}).get("parameters", {}).get("config", config)).stem
        node = nbformat.from_dict(nb)  # the new outputs as NotebookNodes too
        body, _ = exporter.from_notebook_node(node)
        page = site_dir / f"{path.stem}.html"
        page.write_text(body)
        pages.append(page)
        title, paragraph = _summary(nb)
        items.append(f'<li><a href="{page.name}">{html.escape(title)}</a>{markdown2html(paragraph)}</li>')
    index = site_dir / "index.html"
    source = Path(notebooks_dir).resolve()
    source = source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source
    index.write_text(INDEX.format(config=html.escape(config), items="\n".join(items), source=html.escape(str(source))))
    return [index, *pages]


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/default/notebooks")
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/site")
    for page in build_site(source, target):
        print(f"{page} ({page.stat().st_size // 1024} KiB)")
