"""Serving and exporting a run whose adapter changed after merged/ was made, and a server whose port is
taken: real runs (the smoke model with random, non-zero adapters), copied so the shared fixture stays
as it was."""

import json
import os
import socket
import subprocess
import sys
import time

from tests.serve_fixtures import API_KEY, KEY_ENV, copy_run, export, run, write_adapter  # noqa: F401 - fixtures


def test_a_changed_adapter_is_merged_again_before_serving_and_the_reason_is_said(run, export, tmp_path, capsys):
    """04b writing adapter_preference after merged/ was made, then a retrained adapter_preference: merged/
    is made again from the adapter served (stage 06 merges anyway), each time saying why."""
    from qlora_helpers.paths import read_json
    from qlora_helpers.serve import load_serving_model
    from qlora_helpers.serve.export import merged_staleness

    copy = copy_run(run, tmp_path)
    assert merged_staleness(copy) is None
    load_serving_model(copy, "merged")
    assert f"reusing {copy.merged_dir} (merged from adapter/" in capsys.readouterr().out
    before = (copy.merged_dir / "model.safetensors").read_bytes()

    write_adapter(copy, copy.preference_adapter_dir, seed=1)  # 04b: the final adapter is now this one
    assert copy.final_adapter_dir == copy.preference_adapter_dir
    load_serving_model(copy, "merged")
    out = capsys.readouterr().out
    assert ("merged/ is stale: merged/ was made from adapter/, but the run serves adapter_preference/ "
            "(04b wrote it after the SFT adapter)") in out
    report = read_json(copy.merge_report)
    assert report["adapter_dir"] == str(copy.preference_adapter_dir)
    assert (copy.merged_dir / "model.safetensors").read_bytes() != before
    assert merged_staleness(copy) is None

    write_adapter(copy, copy.preference_adapter_dir, seed=2)  # 04b retrained: same folder, other weights
    assert merged_staleness(copy) == "adapter_preference/ changed since merged/ was made from it (retrained)"
    # a merge.json from before the hashes were recorded: the adapter's files are newer than merged/
    legacy = {k: v for k, v in report.items() if k != "adapter_sha256"}
    copy.merge_report.write_text(json.dumps(legacy))
    assert merged_staleness(copy) == "adapter_preference/ is newer than merged/ (retrained after the merge)"


def test_export_redoes_a_stale_merge_and_writes_the_report_stage_06_writes(run, export, tmp_path):
    """`export --run R` without --gguf: merged/ made again for the newer adapter (said), serve.gguf's
    types (none without the [gguf] extra; noted), and export.json with the `export` and `note` keys."""
    from qlora_helpers.paths import read_json
    from qlora_helpers.serve.gguf import gguf_available

    copy = copy_run(run, tmp_path)
    write_adapter(copy, copy.adapter_dir, seed=3)  # retrained by 04
    cmd = [sys.executable, "-m", "qlora_helpers", "export", "--run", str(copy.path), "--set", "serve.gguf=[]"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "merged/ is stale: adapter/ changed since merged/ was made from it (retrained)" in done.stdout
    assert "export gate: checking merged" in done.stdout and "GGUF left out: serve.gguf is empty." in done.stdout
    report = read_json(copy.export_report)
    assert {"export", "note", "forms", "merge_id"} <= set(report) and report["export"] is None
    assert [f["form"] for f in report["forms"]] == ["adapter", "merged"]
    if not gguf_available():  # without the extra, serve.gguf's default types are noted, not an error
        done = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and "GGUF left out: install the [gguf] extra" in done.stdout


def test_a_taken_port_is_said_before_the_model_loads(run, export):
    """uvicorn used to fail on the taken port after the model had loaded and 'serving ... on' had
    printed, with its raw '[Errno 98] address already in use' and exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "qlora_helpers", "serve", "--run", str(run.path), "--port", str(port)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, KEY_ENV: API_KEY})
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: Port {port} on 127.0.0.1 is taken (address already in use): pick another with --port N "
        f"(or --set serve.port=N), or stop what uses it.")
    assert "loading" not in done.stdout and "serving" not in done.stdout and "Errno" not in done.stderr
    assert time.perf_counter() - start < 120
