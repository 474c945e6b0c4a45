"""Serving and exporting a run whose adapter changed after merged/ was made, and a server whose port is
taken: real runs (the smoke model with random, non-zero adapters), copied so the shared fixture stays
as it was."""

import os
import socket
import subprocess
import sys
import time

from tests.serve_fixtures import API_KEY, KEY_ENV, export, run  # noqa: F401 - fixtures


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
