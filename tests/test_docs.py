"""The static tutorial's notebook clean-up (qlora_helpers/docs.py) on a small executed notebook."""

from qlora_helpers.docs import WIDGET_STATE, WIDGET_VIEW, make_static


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
             "text": f"qlora_helpers from {root} (not Colab)\nusing the offline copy {tmp_path}/shared/data/a.json\n"}]},
        {"cell_type": "markdown", "source": f"elsewhere: /opt/{root.name}/x and {root}-other/y"}]}
    cells = make_static(nb, root=root)["cells"]
    assert cells[0]["source"] == "config = 'configs/default.yaml'\nx = 1"
    stream, result = cells[0]["outputs"]
    assert stream["text"] == "wrote outputs/default/merged\n"
    assert result["data"] == {"text/plain": "PosixPath('outputs/default/gguf')",
                              "text/html": "<code>outputs/default/eval.json</code>"}
    assert cells[1]["outputs"][0]["text"] == ("qlora_helpers from . (not Colab)\n"
                                              "using the offline copy ../shared/data/a.json\n")
    assert cells[2]["source"] == f"elsewhere: /opt/{root.name}/x and ../{root.name}-other/y"
