"""The server process: `serve_run` serves a run under uvicorn; `ServerProcess` starts and stops
`python -m qlora_helpers serve --run <folder>` from Python (the notebook, the tests)."""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import QLoraError
from ..paths import cache_dir, read_json
from ..runs import Run
from .api import create_app
from .engine import BatchEngine
from .forms import choose_form, load_serving_model, served_form
from .gate import gate_warning
from .run import api_key_from_env, context_length, model_name
from .static import start_decoder


def serve_run(run: Run) -> None:
    """Load the model (serve.form), then serve the API with uvicorn until Ctrl-C or SIGTERM."""
    import uvicorn

    log = logging.getLogger("qlora_helpers.serve")  # the request log, next to uvicorn's lines
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    api_key = api_key_from_env(run)
    host, port = run.cfg.serve.host, run.cfg.serve.port
    if not port_is_free(host, port):  # before minutes of loading, not after (uvicorn's raw Errno 98)
        raise PortTaken(f"Port {port} on {host} is taken (address already in use): pick another with "
                        f"--port N (or --set serve.port=N), or stop what uses it.")
    choice = choose_form(run)
    print(f"loading {choice['form']} ({choice['reason']})", flush=True)
    model, tokenizer = load_serving_model(run, choice["form"])
    warning = gate_warning(run, served_form(run, choice["form"]))  # after loading: it may have exported
    if warning:
        print(f"WARNING: {warning}", flush=True)
    serve = run.cfg.serve
    decoder = start_decoder(model, serve.compile, serve.max_concurrent, context_length(run, model),
                            cache_dir(run.cfg.model.cache_dir) / "compile")
    engine = BatchEngine(model, tokenizer, serve.max_concurrent, serve.max_queue, serve.batch_wait_ms,
                         decoder).start()
    app = create_app(engine, tokenizer, run, api_key, choice["form"])
    print(f"serving '{model_name(run)}' on http://{host}:{port}/v1 (auth: "
          f"{'Bearer key from $' + run.cfg.serve.api_key_env if api_key else 'none'})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=10)
    finally:
        engine.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class PortTaken(QLoraError):
    """The server's port was in use (before the start, or by the time the child bound it)."""


class ServerProcess:
    """`python -m qlora_helpers serve --run <folder>` in a child process; `start()` waits for /health.

    The API key reaches the child through its environment only (serve.api_key_env), never argv or logs."""

    def __init__(self, run: Run, overrides: list[str] | tuple[str, ...] = (), port: int | None = None,
                 api_key: str | None = None):
        saved = read_json(run.config_file).get("serve", {})
        changed = [f"serve.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(run.cfg.serve).items()
                   if saved.get(k) != v and k != "port"]  # what open_run_folder changed travels along
        self.run, self.overrides = run, changed + list(overrides)
        host = run.cfg.serve.host
        self.port_given = port is not None
        self.port = port or (run.cfg.serve.port if port_is_free(host, run.cfg.serve.port) else free_port(host))
        self.api_key = api_key or (api_key_from_env(run) if run.cfg.serve.api_key_env else None)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = self.run.cfg.serve.host
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.run.server_logs_dir / f"server-{self.port}.log"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 300) -> ServerProcess:
        """Start the child and wait for its /health. A port this launcher picked itself (serve.port, or
        a free one) can be taken by another process between the check and the child's bind; then the
        child exits saying so, and a free port is tried, up to three times in all."""
        for attempt in (1, 2, 3):
            try:
                return self._start_once(timeout)
            except PortTaken:
                if self.port_given or attempt == 3:
                    raise
                self.port = free_port(self.run.cfg.serve.host)  # url and log_path follow it
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> ServerProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise QLoraError(f"This server is already running (pid {self.proc.pid}, {self.url}).")
        if not port_is_free(self.run.cfg.serve.host, self.port):
            raise PortTaken(f"Port {self.port} is taken; pick another (serve.port) or stop what uses it.")
        env = dict(os.environ)
        key_env = self.run.cfg.serve.api_key_env
        if key_env and self.api_key:
            env[key_env] = self.api_key
        cmd = [sys.executable, "-m", "qlora_helpers", "serve", "--run", str(self.run.path),
               "--port", str(self.port)] + [x for o in self.overrides for x in ("--set", o)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self.stop)  # never leave a server behind when Python exits
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                error = PortTaken if "address already in use" in tail.lower() else QLoraError
                raise error(f"The server exited with code {self.proc.returncode} before it was ready:\n{tail}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise QLoraError(f"The server was not ready after {timeout:.0f} s; its log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        """Our child answers /health (not merely something on the port: another server that bound it
        first answers too, with its own pid)."""
        import httpx

        try:
            answer = httpx.get(f"{self.url}/health", timeout=2)
            return answer.status_code == 200 and answer.json().get("pid") == self.proc.pid
        except (httpx.HTTPError, ValueError):
            return False

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5).json()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM (uvicorn finishes the requests in flight, then re-raises the signal), SIGKILL after
        `timeout`. True when the server shut down cleanly."""
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode in (0, -15) and "Finished server process" in self.log_tail(10)

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(run: Run, api_key: str | None = None, **kw) -> ServerProcess:
    """Start the server for `run` (a free port if serve.port is taken); `.stop()` it when done."""
    return ServerProcess(run, api_key=api_key, **kw).start()


