import copy

from qlora_helpers.config import load_config
from qlora_helpers.environment import (collect_environment, environment_summary, hf_auth_status,
                                       plan_runtime, wandb_mode)


def test_collect_environment_on_this_machine():
    env = collect_environment()
    assert env["cpu_cores"] >= 1 and env["ram_gib"] > 0
    assert env["packages"]["torch"] and env["packages"]["bitsandbytes"]
    assert env["bitsandbytes"]["available"]
    rows = {r["what"]: r["value"] for r in environment_summary(env)}
    assert "bitsandbytes" in rows and "Python" in rows
    in_cpuinfo = " avx512_bf16" in open("/proc/cpuinfo").read() or "\tavx512_bf16" in open("/proc/cpuinfo").read()
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
