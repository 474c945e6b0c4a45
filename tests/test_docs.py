"""The static tutorial's notebook clean-up (qlora_helpers/docs.py) on a small executed notebook."""

import pytest

from qlora_helpers.docs import WIDGET_STATE, WIDGET_VIEW, make_static
from qlora_helpers.errors import QLoraError


def _bar(state: dict, key: str, left: str, value: float, total: float, right: str, hidden=False) -> None:
    state[f"{key}-layout"] = {"state": {"_model_name": "LayoutModel", "visibility": "hidden" if hidden else None}}
    state[f"{key}-l"] = {"state": {"_model_name": "HTMLModel", "value": left}}
    state[f"{key}-p"] = {"state": {"_model_name": "FloatProgressModel", "value": value, "max": total}}
    state[f"{key}-r"] = {"state": {"_model_name": "HTMLModel", "value": right}}
    state[key] = {"state": {"_model_name": "HBoxModel", "layout": f"IPY_MODEL_{key}-layout",
                            "children": [f"IPY_MODEL_{key}-l", f"IPY_MODEL_{key}-p", f"IPY_MODEL_{key}-r"]}}


def _view(model_id: str) -> dict:
    return {"output_type": "display_data", "metadata": {},
            "data": {WIDGET_VIEW: {"model_id": model_id, "version_major": 2}, "text/plain": "HBox(...)"}}


def test_widget_bars_become_their_final_text_and_state_is_dropped():
    state: dict = {}
    _bar(state, "done", "Loading\u2007weights:\u2007100%", 272.0, 272.0, "\u2007272/272\u2007[00:03&lt;00:00]")
    _bar(state, "half", "eval:\u200750%", 2.0, 4.0, "\u20072/4")
    _bar(state, "left-false", "per-layer\u2007error:\u200799%", 207.0, 210.0, "\u2007207/210", hidden=True)
    state["chat"] = {"state": {"_model_name": "VBoxModel", "children": []}}
    nb = {"metadata": {"widgets": {WIDGET_STATE: {"state": state}}}, "cells": [
        {"cell_type": "code", "source": "", "outputs": [
            _view("done"), _view("half"), _view("left-false"), _view("chat"), _view("closed-and-gone"),
            {"output_type": "stream", "name": "stderr", "text": "step 1/4\rstep 4/4\nok\n"}]}]}
    outputs = make_static(nb)["cells"][0]["outputs"]
    assert "widgets" not in nb["metadata"]
    assert [o.get("text") for o in outputs[:2]] == ["Loading weights: 100%|██████████| 272/272 [00:03<00:00]\n",
                                                   "eval: 50%|█████     | 2/4\n"]
    assert "interactive widget" in outputs[2]["data"]["text/plain"]
    assert outputs[3] == {"output_type": "stream", "name": "stderr", "text": "step 4/4\nok\n"}
    assert len(outputs) == 4  # the hidden bar (leave=False) and the widget with no saved state are gone


def test_long_floats_are_rounded_for_people():
    from qlora_helpers.docs import scrub

    assert scrub("loss 2.30987654, lr 0.000500, weight decay 0.000000, steps 1234.500000") == (
        "loss 2.31, lr 5.00e-04, weight decay 0, steps 1,234")  # 4 digits; small in powers of ten; 0 as 0


def test_the_machines_project_folder_is_cut_from_sources_and_outputs(tmp_path):
    root = tmp_path / "qlora-notebooks"
    nb = {"metadata": {}, "cells": [
        {"cell_type": "code", "source": [f"config = '{root}/configs/default.yaml'\n", "x = 1"], "outputs": [
            {"output_type": "stream", "name": "stdout", "text": f"wrote {root}/outputs/default/merged\n"},
            {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
             "data": {"text/plain": [f"PosixPath('{root}/outputs/default/gguf')"],
                      "text/html": f"<code>{root}/outputs/default/eval.json</code>"}}]},
        {"cell_type": "code", "source": "", "outputs": [
            {"output_type": "stream", "name": "stdout",
             "text": f"qlora_helpers from {root} (not Colab)\n"
                     f"using the offline copy {tmp_path}/data/a.json\n"}]},
        {"cell_type": "markdown", "source": f"elsewhere: /opt/{root.name}/x and {root}-other/y"}]}
    cells = make_static(nb, root=root)["cells"]
    assert cells[0]["source"] == "config = 'configs/default.yaml'\nx = 1"
    stream, result = cells[0]["outputs"]
    assert stream["text"] == "wrote outputs/default/merged\n"
    assert result["data"] == {"text/plain": "PosixPath('outputs/default/gguf')",
                              "text/html": "<code>outputs/default/eval.json</code>"}
    assert cells[1]["outputs"][0]["text"] == ("qlora_helpers from . (not Colab)\n"
                                              "using the offline copy ../data/a.json\n")
    assert cells[2]["source"] == f"elsewhere: /opt/{root.name}/x and ../{root.name}-other/y"


def test_the_offline_data_folder_reads_as_its_setting_and_styler_ids_as_page_order(tmp_path):
    from qlora_helpers.docs import tidy

    root, data = tmp_path / "qlora-notebooks", tmp_path / "datasets" / "offline"
    table = '<style>#T_81dfa_row0_col0 {color: red}</style><table id="T_81dfa"><td id="T_81dfa_row0_col0">'
    nb = {"metadata": {}, "cells": [{"cell_type": "code", "source": "", "outputs": [
        {"output_type": "stream", "name": "stdout",
         "text": f"using the offline copy {data}/alpaca/a.json (data folder {data}); not {data}-old/b\n"},
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": table.replace("81dfa", "0c9e2")}},
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": table + " T_81dfa"}}]}]}
    stream, first, second = tidy(make_static(nb, root=root, data_dir=str(data)))["cells"][0]["outputs"]
    assert stream["text"] == ("using the offline copy $QLORA_DATA_DIR/alpaca/a.json (data folder $QLORA_DATA_DIR); "
                              "not ../datasets/offline-old/b\n")
    assert first["data"]["text/html"] == table.replace("81dfa", "1")  # the first table of the page: T_1
    assert second["data"]["text/html"] == table.replace("81dfa", "2") + " T_2"
    unset = make_static({"metadata": {}, "cells": [{"cell_type": "markdown", "source": f"{data}/x"}]}, root=root)
    assert unset["cells"][0]["source"] == "../datasets/offline/x"  # no data_dir given: a folder beside the project


# --- pages from a small executed notebook ---------------------------------------------------------

_CELLS = [
    ("markdown", "# 01 · First page\n\nWhat the first page is about."),
    ("code", "run_name = 'default'", ["parameters"]),
    # (the noise is made at run time, so that only the outputs hold it)
    ("code", "home, tmp = '/' + 'root', '/' + 'tmp'\n"
             "print(f'cache: {home}/.cache/qlora-notebooks/models/x and {tmp}/pytest-7/run/eval.json')\n"
             "print('hub: unreachable ([Err' + 'no -2] Name or service not known)')\n"
             "print(f'trained in {402594642 / 1e6} s, efficiency {2.905 / 3}, version 2.13.0')"),
    ("markdown", "## Streaming"),
    ("code", "for piece in ['The', ' answer', ' is', ' one', ' line.']:\n    print(piece, end='', flush=True)"),
    ("markdown", "## The picture"),
    ("code", "from qlora_helpers.plots import plot_lora_shapes\n\nfig = plot_lora_shapes(64, 64, 8, 16)"),
    ("markdown", "## Curves"),
    ("code", "import tempfile\nfrom pathlib import Path\nfrom qlora_helpers.plots import plot_training, save\n\n"
             "history = [{'step': 1, 'loss': 2.0, 'learning_rate': 1e-4, 'grad_norm': 1.0}]\n"
             "_ = save(plot_training(history), Path(tempfile.mkdtemp()) / 'curves.png')"),
    ("markdown", "## Any other plot"),
    ("code", "import matplotlib.pyplot as plt\n\nplt.plot([1, 2, 3])\nplt.show()"),
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Two small notebooks executed by papermill with a parameter (so it injects its cell), in a
    run folder's notebooks/ as the runner leaves them."""
    import nbformat
    import papermill

    from qlora_helpers.paths import PROJECT_ROOT

    run = tmp_path_factory.mktemp("project") / "outputs" / "demo"
    (run / "notebooks").mkdir(parents=True)
    src = tmp_path_factory.mktemp("src")
    for name, title in (("01_first.ipynb", "01 · First page"), ("02_second.ipynb", "02 · Second page")):
        cells = []
        for kind, text, *tags in _CELLS:
            text = text.replace("01 · First page", title)
            cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
            if tags:
                cell.metadata["tags"] = tags[0]
            cells.append(cell)
        nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                       "display_name": "Python 3"}})
        nbformat.write(nb, src / name)
        papermill.execute_notebook(str(src / name), str(run / "notebooks" / name), parameters={"run_name": "demo"},
                                   kernel_name="python3", cwd=str(PROJECT_ROOT), progress_bar=False)
    return run


def test_pages_github_renders_are_clean_titled_linked_and_illustrated(executed, tmp_path):
    from qlora_helpers.docs import ALT_TEXT, build_site

    written = build_site(executed / "notebooks", tmp_path / "site", tmp_path / "tutorial")
    first = (tmp_path / "tutorial" / "01_first.md").read_text()
    second = (tmp_path / "tutorial" / "02_second.md").read_text()
    assert first.startswith("[Contents](README.md) · [02 · Second page →](02_second.md)")
    assert second.rstrip().endswith("[← 01 · First page](01_first.md) · [Contents](README.md)")
    assert "# 01 · First page" in first and "injected" not in first.lower()
    assert first.count("run_name") == 1  # the notebook's own parameters cell, not papermill's copy
    for bad in ("/root/", "/work/", "/tmp/", "Errno", "402.594642", "0.9683333"):
        assert bad not in first, bad
    assert "~/.cache/qlora-notebooks/models/x" in first and "<tmp>/eval.json" in first
    assert "hub: unreachable (offline)" in first and "trained in 402.6 s, efficiency 0.9683, version 2.13.0" in first
    assert "```text\nThe answer is one line.\n```" in first  # the streamed pieces, one block, one line
    assert f"![{ALT_TEXT['plot_lora_shapes']}](img/01_first-1.png)" in first
    assert f"![{ALT_TEXT['plot_training']}](img/01_first-2.png)" in first
    assert "![Figure: Any other plot](img/01_first-3.png)" in first
    featured = tmp_path / "tutorial" / "img" / "training-curves.png"  # the README's picture
    assert featured.read_bytes() == (tmp_path / "tutorial" / "img" / "02_second-2.png").read_bytes()
    assert (tmp_path / "tutorial" / "img" / "01_first-1.png").read_bytes()[:4] == b"\x89PNG"
    index = (tmp_path / "tutorial" / "README.md").read_text()
    assert "- [01 · First page](01_first.md): What the first page is about." in index
    page = (tmp_path / "site" / "01_first.html").read_text()
    assert "<title>01 · First page</title>" in page and "No description has been provided" not in page
    assert 'href="02_second.html"' in page and "Errno" not in page and "/root/" not in page
    assert tmp_path / "site" / "index.html" in written
    # pages from a run whose training resumed would show no base loss and the last piece's minutes: refused
    (executed / "train_log.json").write_text('{"summary": {"resumed_from": "checkpoints/checkpoint-40"}}')
    with pytest.raises(QLoraError, match="training resumed from checkpoints/checkpoint-40: the pages"):
        build_site(executed / "notebooks", tmp_path / "site2", tmp_path / "tutorial2")
    assert not (tmp_path / "site2").exists()  # refused before anything was written
    (executed / "train_log.json").unlink()  # the module's fixture, as the other tests find it


def test_a_number_the_run_did_not_measure_is_refused_not_printed_as_n_a():
    from qlora_helpers.readme import fill_readme

    results = {"heldout_loss_base": {"value": None, "text": "n/a", "file": "train_log.json",  # a resumed run's
                                     "key": "summary.heldout_loss_base"},
               "train_steps": {"value": 40, "text": "40", "file": "train_log.json", "key": "summary.steps"}}
    with pytest.raises(QLoraError, match=r"did not measure: heldout_loss_base \(train_log.json "
                                         r"summary.heldout_loss_base is null\)"):
        fill_readme("from <!-- r:heldout_loss_base -->2.3<!-- /r --> in <!-- r:train_steps -->1<!-- /r -->", results)
    assert fill_readme("in <!-- r:train_steps -->1<!-- /r -->", results) == "in <!-- r:train_steps -->40<!-- /r -->"


def test_readme_results_come_from_the_reports_and_disagreements_are_found(tmp_path):
    import json

    from qlora_helpers.readme import fill_readme, readme_disagreements, results_digest
    from qlora_helpers.runs import RunFolder

    folder = RunFolder(tmp_path)
    folder.train_log.write_text(json.dumps({"summary": {
        "train_seconds": 402.5, "steps": 120, "parameters": {"trainable_percent": 0.34567},
        "heldout_loss_base": 1.98765, "heldout_loss_tuned": 1.5, "eval_examples": 32},
        "log_history": [{"loss": 2.0, "grad_norm": 0.4}, {"eval_loss": 1.9}, {"loss": 1.8, "grad_norm": 1.756}]}))
    results = results_digest(folder)
    assert results["train_minutes"]["text"] == "7 min" and results["heldout_loss_base"]["text"] == "1.988"
    # every logged step's grad_norm (the eval rows have none)
    assert results["grad_norms"]["text"] == "between 0.40 and 1.76 at all 2"
    assert "rouge_tuned" not in results  # no eval.json in this run
    readme = "Trained <!-- r:train_steps -->?<!-- /r --> steps, loss <!-- r:heldout_loss_tuned -->x<!-- /r -->."
    filled = fill_readme(readme, results)
    assert filled == ("Trained <!-- r:train_steps -->120<!-- /r --> steps, "
                      "loss <!-- r:heldout_loss_tuned -->1.500<!-- /r -->.")
    assert readme_disagreements(filled, results) == []
    edited = filled.replace(">1.500<", ">1.400<")
    assert readme_disagreements(edited, results) == [
        "heldout_loss_tuned: README says '1.400', train_log.json says '1.500'"]
    with pytest.raises(QLoraError, match="quotes rouge_tuned"):
        fill_readme("<!-- r:rouge_tuned -->0<!-- /r -->", results)
    # after 04b, 05's "tuned" is SFT+DPO: the README's SFT ROUGE-L comes from its three-way table
    metrics = ("ROUGE-L F1", "clean stop", "repetition", "length gap")
    summary = {"summary": {m: {"base": 0.2, "tuned": 0.25} for m in metrics},
               "differences": [{"metric": m, "low": -0.2, "high": -0.1} for m in metrics]}
    folder.eval_report.write_text(json.dumps(summary))
    assert results_digest(folder)["rouge_tuned"]["text"] == "0.250"
    folder.eval_report.write_text(json.dumps({**summary, "three_way": {"answers": {"means": {
        "sft": {"ROUGE-L F1": 0.274}, "sft+dpo": {"ROUGE-L F1": 0.25}}}}}))
    tuned = results_digest(folder)["rouge_tuned"]
    assert tuned["text"] == "0.274" and tuned["key"] == "three_way.answers.means.sft.ROUGE-L F1"
    # the answer metrics' intervals: a row of a list, picked by its fields; base -> SFT before base -> tuned
    row = {"metric": "clean stop", "low": 0.15625, "high": 0.3516}
    plain = {"summary": {m: {"base": 0.5, "tuned": 0.8} for m in metrics},
             "differences": summary["differences"][:1] + [{**row, "low": 0.01}] + summary["differences"][2:]}
    folder.eval_report.write_text(json.dumps(plain))
    digest = results_digest(folder)
    assert digest["clean_stop_interval"]["text"] == "[+0.010, +0.352]"
    assert digest["clean_stop_interval"]["key"] == "differences[metric=clean stop]"
    assert digest["repetition_tuned"]["text"] == "0.800" and digest["rouge_interval"]["text"] == "[-0.200, -0.100]"
    three = {"answers": {"means": {"sft": {"clean stop": 0.82}}, "differences": [
        {**row, "step": "sft -> sft+dpo", "low": -0.5}, {**row, "step": "base -> sft"}]}}
    folder.eval_report.write_text(json.dumps({**plain, "three_way": three}))
    digest = results_digest(folder)
    assert digest["clean_stop_interval"]["text"] == "[+0.156, +0.352]"
    assert digest["clean_stop_tuned"]["text"] == "0.820" and digest["repetition_tuned"]["text"] == "0.800"
    plain["differences"] = [r for r in plain["differences"] if r["metric"] != "ROUGE-L F1"]
    folder.eval_report.write_text(json.dumps({**plain, "three_way": three}))
    with pytest.raises(QLoraError, match=r"eval.json has no 'three_way.answers.differences\[step=base -> sft\]"
                                         r"\[metric=ROUGE-L F1\]' or 'differences\[metric=ROUGE-L F1\]'"):
        results_digest(folder)  # no ROUGE-L row in either list
    folder.eval_report.write_text(json.dumps({"summary": {}}))
    with pytest.raises(QLoraError, match="eval.json has no 'summary.ROUGE-L F1.base'"):
        results_digest(folder)


@pytest.mark.parametrize("page", ["README.md", "docs/serving.md"])
def test_the_committed_pages_agree_with_the_committed_results(page):
    """README.md's and docs/serving.md's quoted numbers are the docs build's (docs/results.json, from
    the run's reports: docs/serving.md's export gate numbers from export.json)."""
    import json

    from qlora_helpers.paths import PROJECT_ROOT
    from qlora_helpers.readme import QUOTING, readme_disagreements

    results = json.loads((PROJECT_ROOT / "docs" / "results.json").read_text())
    text = (PROJECT_ROOT / page).read_text()
    assert page in QUOTING and "<!-- r:" in text and not readme_disagreements(text, results)


def test_colab_links_are_generated_from_the_one_repository_url():
    from qlora_helpers.bootstrap import repository_url
    from qlora_helpers.paths import PROJECT_ROOT
    from qlora_helpers.readme import colab_links

    links = colab_links(repository_url(PROJECT_ROOT))
    assert links in (PROJECT_ROOT / "README.md").read_text(), "run python -m qlora_helpers.docs --sync-links"
    notebooks = "colab.research.google.com/github/qlora-notebooks/qlora-notebooks/blob/main/notebooks/"
    assert links.count(notebooks) == 7 and f"[04b](https://{notebooks}04b_preference.ipynb)" in links
