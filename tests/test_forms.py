"""The serving-form registry (qlora_helpers/serve/forms.py) and what iterates over it."""

import typing
from types import SimpleNamespace

import pytest

from qlora_helpers.config import GGUF_TYPES, ServeConfig, load_config
from qlora_helpers.errors import QLoraError
from qlora_helpers.serve import forms
from qlora_helpers.serve.gate import gate_table


def test_the_registry_covers_every_form_and_gguf_type_once():
    gguf = [f.gguf_type for f in forms.FORMS.values() if f.gguf_type]
    assert gguf == list(GGUF_TYPES)  # one GGUF form per type of the one list
    serve_as = typing.get_args(typing.get_type_hints(ServeConfig)["form"])
    assert set(serve_as) == {f.serve_as for f in forms.FORMS.values()} | {"auto"} == set(forms.AUTO_ORDER) | {"auto"}
    assert all(0 < f.kl_bound < 1 for f in forms.FORMS.values())
    assert [f.name for f in forms.FORMS.values() if f.quantized] == ["gguf-q8_0", "gguf-q5_k_m", "gguf-q4_k_m"]
    with pytest.raises(QLoraError, match="valid: f16, q8_0, q5_k_m, q4_k_m"):
        forms.gguf_form("q2_k")


def test_checked_forms_keep_serve_gguf_order():
    assert [f.name for f in forms.checked_forms(["q8_0", "f16"])] == ["adapter", "merged", "gguf-q8_0", "gguf-f16"]
    assert [f.name for f in forms.checked_forms()] == ["adapter", "merged"]


def _run(device, **serve):
    cfg = load_config("smoke", [f"serve.{k}={v}" for k, v in serve.items()])
    return SimpleNamespace(cfg=cfg, device=device)


def test_auto_rules():
    assert forms.choose_form(_run("cpu", form="adapter")) == {"form": "adapter", "reason": "serve.form=adapter"}
    assert forms._auto_gguf(_run("cuda")) == (False, "no GGUF: not on a CPU")
    assert forms._auto_gguf(_run("cpu", gguf="[]")) == (False, "no GGUF: serve.gguf is empty")
    with pytest.raises(QLoraError, match="serve.gguf is empty"):
        forms.served_form(_run("cpu", gguf="[]"), "gguf")
    assert forms.served_form(_run("cpu", gguf="[f16]"), "gguf").name == "gguf-f16"


def test_gate_table_reads_the_registry():
    report = {"probes": [{}], "tokenization": {"q8_0": {"equal": True}},
              "forms": [{"form": name, "greedy_equal": 1, "greedy": [{"equal": True}], "mean_kl": 0.0,
                         "kl_bound": forms.FORMS[name].kl_bound, "passed": True, "problems": []}
                        for name in ("adapter", "gguf-q8_0")]}
    assert [(r["form"], r["tokenization"], r["KL bound"]) for r in gate_table(report)] == [
        ("adapter", "-", 1e-3), ("gguf-q8_0", "same ids", 2e-2)]
