"""The run as serving sees it: reopened from its folder, its model name, context and API key."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import apply_overrides, config_from_dict
from ..errors import QLoraError
from ..paths import read_json
from ..runs import Run


def open_run_folder(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """A run from its folder (`outputs/<run>`), as 01 set it up; overrides may change `serve.*` only."""
    path = Path(path).expanduser().resolve()
    data = read_json(path / "config.json")
    bad = [o for o in overrides if not o.strip().startswith("serve.")]
    if bad:
        raise QLoraError(f"Only serve.* settings can change when serving a finished run; got {bad[0]!r}. "
                         f"Other settings belong to the run (set them in 01 and retrain).")
    cfg = config_from_dict(apply_overrides(data, overrides))
    return Run(path.name, path, cfg, read_json(path / "env.json"))


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
    adapter = run.path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise QLoraError(f"No adapter in {adapter}. Run notebooks/04_train.ipynb for run {run.name!r} first.")
    return adapter



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
