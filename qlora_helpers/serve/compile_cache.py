"""Restarts without recompiling: the static decoder's compile artefacts, kept on disk.

Compiling the decode step (static.py) takes minutes on a 7B model: Dynamo traces the model, Inductor
generates and tunes Triton kernels, CUDA graphs are captured per bucket. Only the tracing and the
capture must happen again at each start; the rest is what torch's own caches hold (Inductor's FX
graph cache, AOTAutograd's cache, the tuning results, the compiled kernels), in a folder under /tmp
that a new machine or container does not have. So after a cold warm-up the decoder saves them as one
file (`torch.compiler.save_cache_artifacts`) in the model cache, and the next start loads that file
(`load_cache_artifacts`) before it compiles. The file does not carry Inductor's coordinate-descent tuning
results, so Inductor's own cache folder is also kept beside it (`use_inductor_dir`, unless the user set
TORCHINDUCTOR_CACHE_DIR): without it a cached start re-tuned for 30 of its 38 s on the H200.

The file's name is a digest of everything that changes the compiled code: torch, Triton,
transformers and bitsandbytes versions, the GPU and its compute capability, the model's config and
module classes (a 4-bit base, a LoRA adapter and its settings), the compute dtype, the slots, the
cache columns, the buckets and the step's Inductor options. Anything else gives another file, never a
wrong kernel; a file torch cannot read is reported and the decoder compiles from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..paths import write_json_atomic

log = logging.getLogger("qlora_helpers.serve")


def _version(name: str) -> str | None:
    module = __import__("sys").modules.get(name)
    return getattr(module, "__version__", None) if module is not None else None


def retune_note(torch_version: str) -> str | None:
    """What a cached start cannot skip on this torch: 2.9-2.11 take a kernel's tuned config back only from
    a bundle of several (pytorch#172819, fixed in 2.12 by #173391), so coordinate-descent tuning runs again
    at every start: 18.8 of a cached start's 41.7 s at buckets 1, 2, 4, 8 on the H200 (torch 2.11)."""
    major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) >= (2, 12):
        return None
    return (f"torch {torch_version} re-runs Inductor's kernel tuning at every start (pytorch#172819, fixed in "
            "torch 2.12; requirements.txt pins 2.13.0): a cached start takes about twice as long")


def cache_key(model, dtype: torch.dtype, slots: int, max_len: int, buckets: tuple[int, ...],
              options: dict) -> dict[str, Any]:
    """What the compiled step depends on (the weights' values are inputs, not part of the code)."""
    config = getattr(model.config, "to_dict", lambda: vars(model.config))()
    peft = getattr(model, "peft_config", None) or {}
    cuda = torch.cuda.is_available()
    gpu = (torch.cuda.get_device_name(), list(torch.cuda.get_device_capability())) if cuda else None
    return {"torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "bitsandbytes": _version("bitsandbytes"), "python": platform.python_version(), "gpu": gpu,
            "model_config": config, "modules": sorted({type(m).__name__ for m in model.modules()}),
            "adapters": {name: c.to_dict() for name, c in peft.items()}, "dtype": str(dtype), "slots": slots,
            "max_len": max_len, "buckets": list(buckets), "options": options}


class CompileCache:
    """One decoder's artefact file `<root>/step-<digest>.bin`, with its key beside it as JSON."""

    def __init__(self, root: Path, key: dict[str, Any]):
        text = json.dumps(key, sort_keys=True, default=str)
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.key = json.loads(text)
        self.file = Path(root) / f"step-{self.digest}.bin"
        self.inductor_dir = Path(root) / f"inductor-{self.digest}"

    def use_inductor_dir(self) -> str:
        """Inductor's (and Triton's) own cache folder beside the file, unless TORCHINDUCTOR_CACHE_DIR is set:
        the file does not carry the coordinate-descent tuning results, and re-tuning was 30.3 of a cached
        start's 38.2 s on the H200 (BENCHMARKS.md); in this folder the tuned configs and compiled kernels
        survive a restart with the model cache. Returns the folder in use."""
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # torch writes its default into the variable the first time it looks: that is not a user's choice
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", os.path.abspath(default_cache_dir())):
            self.inductor_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.inductor_dir)
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]

    def load(self) -> dict[str, Any]:
        """Load the artefacts into torch's caches before compiling: {'state': 'hit'|'miss'|'unreadable', ...},
        with a 'note' where this torch re-tunes anyway (retune_note)."""
        inductor = {"inductor_dir": self.use_inductor_dir()}
        if note := retune_note(torch.__version__):
            inductor["note"] = note
        if not self.file.is_file():
            return {"state": "miss", "file": str(self.file), **inductor}
        try:  # torch logs a file it cannot read and returns None; other versions may raise
            info = torch.compiler.load_cache_artifacts(self.file.read_bytes())
            error = None if info is not None else "torch could not read it (a corrupt or foreign file)"
        except Exception as exc:  # noqa: BLE001 - a stale or broken file costs a cold compile, not the server
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            log.warning("compile cache %s unreadable (%s); compiling from scratch", self.file, error)
            return {"state": "unreadable", "file": str(self.file), "error": error, **inductor}
        entries = sum(len(v) for v in getattr(info, "artifacts", {}).values())
        return {"state": "hit", "file": str(self.file), "entries": entries, **inductor}

    def save(self) -> dict[str, Any]:
        """Write the artefacts of the compiles this process made (after a cold warm-up)."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return {"saved": False}
        data, _ = saved
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file.name}.", suffix=".tmp", dir=self.file.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server in another account
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(self.file.with_suffix(".json"), self.key)
        return {"saved": True, "bytes": len(data)}
