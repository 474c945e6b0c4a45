import copy
import types
from pathlib import Path

import pytest

from qlora_helpers import environment
from qlora_helpers.config import load_config
from qlora_helpers.environment import (
    collect_environment,
    environment_summary,
    hf_auth_status,
    is_interactive,
    needs_hub_token,
    offer_hf_login,
    plan_runtime,
    wandb_mode,
)


def test_collect_environment_on_this_machine():
    env = collect_environment()
    assert env["cpu_cores"] >= 1 and env["ram_gib"] > 0
    assert env["packages"]["torch"] and env["packages"]["bitsandbytes"]
    assert env["bitsandbytes"]["available"]
    rows = {r["what"]: r["value"] for r in environment_summary(env)}
    assert "bitsandbytes" in rows and "Python" in rows
    cpuinfo = Path("/proc/cpuinfo").read_text()
    in_cpuinfo = " avx512_bf16" in cpuinfo or "\tavx512_bf16" in cpuinfo
    assert env["cpu_flags"]["avx512_bf16"] == in_cpuinfo
    assert f"avx512_bf16 {'yes' if in_cpuinfo else 'no'}" in rows["CPU features"]


def _env(cuda: bool, bf16: bool):
    env = copy.deepcopy(collect_environment())
    env.update(cuda_available=cuda, bf16_supported=bf16)
    return env


def test_cpu_plan_is_fp32_and_torch_adamw():
    plan = plan_runtime(load_config("default"), _env(False, False))
    assert (plan["device"], plan["compute_dtype"], plan["optimizer"]) == ("cpu", "float32", "adamw_torch")


def test_cuda_plans():
    cfg = load_config("default")
    plan = plan_runtime(cfg, _env(True, True))
    assert (plan["compute_dtype"], plan["optimizer"]) == ("bfloat16", "paged_adamw_32bit")
    plan = plan_runtime(cfg, _env(True, False))
    assert plan["compute_dtype"] == "float16" and any("fp16" in n for n in plan["notes"])


def test_paged_optimizer_on_cpu_falls_back_with_a_note():
    plan = plan_runtime(load_config("llama2-7b", ["quant.compute_dtype=float32"]), _env(False, False))
    assert plan["optimizer"] == "adamw_torch" and any("falls back" in n for n in plan["notes"])


def test_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_hf_status_never_returns_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_leak_me")
    status = hf_auth_status()
    assert status["token_found"] and "hf_do_not_leak_me" not in repr(status)


def test_only_hub_ids_need_a_token(tmp_path):
    assert needs_hub_token("meta-llama/Llama-2-7b-hf") and needs_hub_token("gpt2")
    assert not needs_hub_token("embedded") and not needs_hub_token("random:tiny")
    assert not needs_hub_token(str(tmp_path))  # a local folder


class _Kernel:
    def __init__(self, allow_stdin):
        self._allow_stdin = allow_stdin


def _fake_shell(monkeypatch, allow_stdin):
    shell = type("ZMQInteractiveShell", (), {"kernel": _Kernel(allow_stdin)})()
    monkeypatch.setattr("IPython.get_ipython", lambda: shell)


def test_interactive_only_where_a_person_can_answer(monkeypatch):
    monkeypatch.delenv("QLORA_HEADLESS", raising=False)
    assert not is_interactive()  # plain Python (pytest)
    _fake_shell(monkeypatch, allow_stdin=False)  # papermill / nbconvert: cells sent without stdin
    assert not is_interactive()
    _fake_shell(monkeypatch, allow_stdin=True)  # JupyterLab, Colab
    assert is_interactive()
    monkeypatch.setenv("QLORA_HEADLESS", "1")
    assert not is_interactive()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QLORA_HEADLESS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached login either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    logins = []
    hub = types.ModuleType("huggingface_hub")
    hub.notebook_login = lambda: logins.append(1)
    hub.get_token = lambda: None
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", hub)
    return logins


def test_login_box_only_for_a_hub_model_online_with_a_person(monkeypatch, no_token):
    monkeypatch.setattr(environment, "hub_reachable", lambda timeout=3.0: True)
    _fake_shell(monkeypatch, allow_stdin=True)
    assert "without a Hugging Face token" in offer_hf_login("embedded") and not no_token
    assert "without a Hugging Face token" in offer_hf_login("random:tiny") and not no_token
    assert "Log in above" in offer_hf_login("meta-llama/Llama-2-7b-hf") and no_token == [1]


def test_no_login_box_in_batch_runs_or_offline(monkeypatch, no_token):
    real_check = environment.hub_reachable
    monkeypatch.setattr(environment, "hub_reachable", lambda timeout=3.0: True)
    _fake_shell(monkeypatch, allow_stdin=False)  # papermill run directly
    line = offer_hf_login("meta-llama/Llama-2-7b-hf")
    assert "batch run" in line and "set HF_TOKEN" in line and "\n" not in line
    _fake_shell(monkeypatch, allow_stdin=True)
    monkeypatch.setattr(environment, "hub_reachable", real_check)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = offer_hf_login("meta-llama/Llama-2-7b-hf")
    assert "out of reach" in line and "set HF_TOKEN" in line
    assert no_token == []
