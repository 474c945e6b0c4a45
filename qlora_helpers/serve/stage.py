"""Stage 06's entry point without the notebook: merge and export, the GGUF files and the export gate
(export.json), compare the forms, then start the
server, check it with the official client and load it, and stop it. The notebook runs the same steps
one per cell (plus the pipeline, streaming and chat demos); both end in `save_serve_results`, which
writes the stage's reports, `serve_load.json` last."""

from __future__ import annotations

from typing import Any

from ..runs import Run
from .checks import compare_forms, load_test, save_serve_results, smoke_test
from .export import merge_and_export
from .gate import export_and_check
from .process import start_server
from .run import model_name


def run_stage(run: Run) -> dict[str, Any]:
    """Merge, export (GGUF too, with the [gguf] extra), gate, time the forms, serve, check, load-test; returns the smoke report."""
    merge_and_export(run)
    export_and_check(run)
    compare_forms(run)
    server = start_server(run)
    try:
        checks = smoke_test(server, model_name(run))
        load = load_test(server, model_name(run), run.cfg.serve.load_requests, run.cfg.serve.load_tokens)
        return save_serve_results(run, server, checks, load)
    finally:
        server.stop()
