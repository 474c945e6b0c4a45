"""The serving forms: what a trained run can be served as, one registry entry each.

Everything that lists forms iterates over `FORMS`, in its order: `serve.form=auto` (`choose_form`:
the first form, in `AUTO_ORDER`, whose `auto` accepts the run), the loading for serving
(`load_serving_model`), the latency table (`checks.compare_forms`) and the export gate
(`gate.run_export_gate`, its KL bounds, `gate_table`). A GGUF form is one llama.cpp file type
(config.GGUF_TYPES, the one list of their names); `serve.form=gguf` serves serve.gguf's first.
Adding a form is one entry here plus its loader (and a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import GGUF_TYPES
from ..errors import QLoraError
from ..models import load_tokenizer, load_tuned_model
from ..runs import Run
from .export import ensure_merged, estimate_merged_bytes, free_memory_bytes, load_merged
from .gguf import gguf_available, gguf_form_name, gguf_path, llama_cpp_version
from .llamacpp import LlamaCppModel, load_gguf_serving
from .run import context_length


@dataclass(frozen=True)
class Form:
    name: str                 # the gate's and the latency table's name for it
    serve_as: str             # its serve.form value
    kl_bound: float           # the export gate's bound on mean KL(adapter model || form), nats per token
    describe: Callable[[Run], str]  # what it is, for the gate's report
    # the model: for checking (gate, latency: `context` tokens, `rows` sequences; exported before) or,
    # with `serving`, for the server (exported first when missing, the run's own context and rows)
    load: Callable[..., Any]
    auto: Callable[[Run], tuple[bool, str]]  # serve.form=auto: (picks it?, why); tried in AUTO_ORDER
    gguf_type: str | None = None  # the llama.cpp file type of a GGUF form
    quantized: bool = False   # rounds the weights below 16 bits (the gate may explain a failure by it)


def _load_adapter(run: Run, context: int | None = None, rows: int = 1, serving: bool = False):
    return load_tuned_model(run)[0]


def _load_merged(run: Run, context: int | None = None, rows: int = 1, serving: bool = False):
    if serving:  # merged when missing, or stale for the adapter served (the GGUF forms are made from it too)
        ensure_merged(run)
    return load_merged(run)


def _gguf_loader(gguf_type: str) -> Callable[..., Any]:
    def load(run: Run, context: int | None = None, rows: int = 1, serving: bool = False):
        if serving:
            ensure_merged(run)
            return load_gguf_serving(run)
        return LlamaCppModel(gguf_path(run, gguf_type), context or context_length(run), rows)
    return load


def _auto_gguf(run: Run) -> tuple[bool, str]:
    gguf = run.cfg.serve.gguf
    if run.device == "cpu" and gguf and gguf_available():
        return True, (f"on a CPU llama.cpp serves the GGUF ({gguf[0]}), several times faster than merged "
                      f"(benchmarks/BENCHMARKS.md)")
    return False, "no GGUF: " + ("not on a CPU" if run.device != "cpu" else "serve.gguf is empty" if not gguf
                                 else "the [gguf] extra is not installed")


def _auto_merged(run: Run) -> tuple[bool, str]:
    need, free = estimate_merged_bytes(run), free_memory_bytes(run.device)
    fits = need < 0.8 * free
    return fits, f"merged needs {need / 2**30:.2f} GiB, {free / 2**30:.1f} GiB free on {run.device}" + (
        "" if fits else " (too little: serving the 4-bit base + adapter)")


def _gguf_form(gguf_type: str, kl_bound: float) -> Form:
    return Form(gguf_form_name(gguf_type), "gguf", kl_bound,
                lambda run: f"{gguf_path(run, gguf_type).name} through llama.cpp "
                            f"(llama-cpp-python {llama_cpp_version()})",
                _gguf_loader(gguf_type), _auto_gguf, gguf_type=gguf_type, quantized=gguf_type != "f16")


# Mean KL bounds (nats per token). 16-bit rounding of the merged weights moves a well-trained model's
# next-token distributions by ~1e-4 nats; q8_0 by ~1e-3; 4-bit k-quants on a 135M model by a few
# 1e-2 (llama.cpp's own perplexity tables: q4_k_m costs a 7B ~0.05 in log-perplexity). The bounds
# sit an order of magnitude above what each should cost, and far below a broken export (a wrong
# tokenizer, tensor layout or template costs whole nats).
FORMS: dict[str, Form] = {f.name: f for f in (
    Form("adapter", "adapter", 1e-3, lambda run: "4-bit base + adapter, through the serving engine",
         _load_adapter, lambda run: (True, "")),
    Form("merged", "merged", 1e-2,
         lambda run: f"merged/ ({run.cfg.serve.export_dtype}), through the serving engine", _load_merged,
         _auto_merged),
    _gguf_form("f16", 1e-2),
    _gguf_form("q8_0", 2e-2),
    _gguf_form("q5_k_m", 0.1),  # between q8_0 and q4_k_m: ~5.7 bits per weight where rows split into k-blocks
    _gguf_form("q4_k_m", 0.25),
)}
AUTO_ORDER = ("gguf", "merged", "adapter")  # serve.form values, tried in this order by serve.form=auto


def gguf_form(gguf_type: str) -> Form:
    """The form of one GGUF type."""
    name = f"gguf-{gguf_type}"
    if name not in FORMS:
        raise QLoraError(f"Unknown GGUF type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}.")
    return FORMS[name]


def served_form(run: Run, serve_as: str) -> Form:
    """The form a serve.form value serves (gguf: serve.gguf's first type)."""
    if serve_as == "gguf":
        if not run.cfg.serve.gguf:
            raise QLoraError("serve.form=gguf but serve.gguf is empty: name the GGUF type to serve, "
                             "e.g. --set 'serve.gguf=[q8_0]'.")
        return gguf_form(run.cfg.serve.gguf[0])
    return FORMS[serve_as]


def checked_forms(gguf_types: list[str] | tuple[str, ...] = ()) -> list[Form]:
    """The forms a check covers: every non-GGUF form in registry order, then the GGUF forms of
    `gguf_types` in their order (serve.gguf's: the served one first)."""
    return [f for f in FORMS.values() if f.gguf_type is None] + [gguf_form(t) for t in gguf_types]


def choose_form(run: Run) -> dict[str, Any]:
    """serve.form, or for `auto` the first serve.form value of AUTO_ORDER whose form accepts the run:
    on a CPU with the [gguf] extra the GGUF through llama.cpp; else the merged model when it fits in
    80% of free memory (it generates faster on CPU and GPU, benchmarks/BENCHMARKS.md), else the 4-bit
    base + adapter."""
    form = run.cfg.serve.form
    if form != "auto":
        return {"form": form, "reason": f"serve.form={form}"}
    why = []
    for serve_as in AUTO_ORDER:
        ok, reason = next(f for f in FORMS.values() if f.serve_as == serve_as).auto(run)  # GGUF forms share one rule
        if ok:  # the adapter form always accepts, and why merged did not is its reason
            return {"form": serve_as, "reason": f"auto: {reason or why[-1]}"}
        why.append(reason)
    raise AssertionError("the adapter form always accepts")


def load_serving_model(run: Run, form: str):
    """(model, tokenizer) for serving a serve.form value: 'merged',
    'adapter' (4-bit + peft) or 'gguf' (llama.cpp, serve/llamacpp.py); merged/ and the GGUF are
    exported first when missing or older than the adapter served (ensure_merged, load_gguf_serving)."""
    return served_form(run, form).load(run, serving=True), load_tokenizer(run.cfg.model)
