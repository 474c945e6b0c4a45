"""The run as serving sees it: reopened from its folder, its model name, context and API key."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import QLoraError
from ..opening import open_run_folder  # noqa: F401 -- re-exported: serve's way to open a run is opening's
from ..runs import Run


def model_name(run: Run) -> str:
    return run.cfg.serve.model_name or run.name


def context_length(run: Run, model=None) -> int:
    """Prompt + answer tokens a request may use: serve.context_length or model.max_seq_length."""
    n = run.cfg.serve.context_length or run.cfg.model.max_seq_length
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and n > limit:
        raise QLoraError(f"serve.context_length={n} exceeds the model's max_position_embeddings={limit}; "
                         f"lower it.")
    return n


def adapter_dir(run: Run) -> Path:
    return run.require_adapter()


def say(text: str) -> None:
    """A progress line of the long steps (merging, converting, the gate): printed at once, so a command
    that runs for minutes says what it is doing (and notebook 06's cells show it too)."""
    print(text, flush=True)


def api_key_from_env(run: Run) -> str | None:
    """The API key from the environment variable serve.api_key_env names (None when no key is asked)."""
    env = run.cfg.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise QLoraError(f"serve.api_key_env names ${env}, which is not set (or empty). Export the key "
                         f"in that variable before starting the server, or set serve.api_key_env=null.")
    return key
