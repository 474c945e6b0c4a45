"""Training on the smoke profile for real: CPU QLoRA, resume after SIGKILL, guards, atomic saves."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_helpers.config import load_config
from qlora_helpers.data import prepare_run_data
from qlora_helpers.errors import QLoraError
from qlora_helpers.opening import setup_run
from qlora_helpers.runs import RunFolder, Runtime
from qlora_helpers.train import (
    COMPLETE_MARKER,
    NonFiniteLoss,
    last_complete_checkpoint,
    load_trainable_model,
    save_adapter,
    train_adapter,
    training_arguments,
)

QUIET = ["train.wandb=disabled", "train.eval_samples=8"]


def _train_cmd(outputs: Path, run_name: str, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "qlora_helpers", "train", "--config", "smoke", "--run-name", run_name,
           "--outputs-dir", str(outputs)]
    for o in (*QUIET, *overrides):
        cmd += ["--set", o]
    return cmd


def test_trainer_config_mapping():
    cfg = load_config("qlora-paper", ["quant.compute_dtype=float32"])
    runtime = Runtime(device="cpu", compute_dtype="float32", optimizer="adamw_torch", load_in_4bit=True)
    folder = RunFolder(Path("/tmp/run-x"))
    args = training_arguments(cfg, folder, runtime, report_to=[])
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "constant"
    assert args.max_grad_norm == 0.3 and args.warmup_steps == 30  # 3% of 1,000 steps
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert args.train_sampling_strategy == "group_by_length"
    assert args.save_steps == cfg.train.save_steps and args.save_total_limit == cfg.train.save_total_limit
    assert args.seed == cfg.train.seed and args.output_dir == str(folder.checkpoints_dir)
    assert not args.bf16 and not args.fp16 and args.logging_nan_inf_filter is False
    packed_cfg = load_config("qlora-paper", ["data.packing=true"])
    packed = training_arguments(packed_cfg, RunFolder(Path("/tmp/y")), runtime, [])
    assert packed.train_sampling_strategy == "random"  # rows are already packed


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    outputs = tmp_path_factory.mktemp("train-outputs")
    run = setup_run("smoke", "cpu-train", [*QUIET, "train.max_steps=12", "train.learning_rate=5e-3",
                                           "train.logging_steps=2", "lora.dropout=0.0"], str(outputs))
    result = train_adapter(run, prepare_run_data(run))
    return run, result


def test_cpu_training_learns_and_saves_a_complete_adapter(trained):
    run, result = trained
    summary = result["summary"]
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert summary["steps"] == 12 and len(losses) == 6
    assert losses[-1] < losses[0]
    assert summary["heldout_loss_tuned"] < summary["heldout_loss_base"]
    assert summary["parameters"]["trainable"] == 2 * 2 * 16 * (64 + 64) - 2 * 16 * (64 - 32)  # q,v in 2 layers
    adapter = run.path / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "qlora_config.json",
            "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    card = (adapter / "README.md").read_text()
    assert "base_model: random:tiny" in card and "held-out, with this adapter" in card
    log = json.loads((run.path / "train_log.json").read_text())
    assert log["summary"]["steps"] == 12


def test_checkpoints_are_marked_complete_and_hold_no_argument_pickle(trained):
    run, _ = trained
    ckpts = sorted((run.path / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / COMPLETE_MARKER).is_file() for c in ckpts)
    assert not any((c / "training_args.bin").exists() for c in ckpts)
    assert last_complete_checkpoint(run.path / "checkpoints") == max(ckpts, key=lambda p: int(p.name.split("-")[1]))


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # crashed mid-save: no marker
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"


def test_eval_samples_zero_trains_without_the_held_out_loss(tmp_path, tiny_dir):
    run = setup_run("smoke", "no-eval", ["train.wandb=disabled", "train.eval_samples=0", "train.max_steps=2"],
                    str(tmp_path))
    summary = train_adapter(run, prepare_run_data(run))["summary"]
    assert summary["steps"] == 2 and summary["heldout_loss_base"] is None and summary["heldout_loss_tuned"] is None
    assert summary["eval_examples"] == 0 and summary["final_logged_loss"] is not None
    assert "not measured during training" in (run.path / "adapter" / "README.md").read_text()


def test_fresh_adapters_follow_train_seed_not_earlier_random_draws(tmp_path, tiny_dir):
    import torch

    def lora_a(seed_before: int, *overrides: str) -> dict:
        run = setup_run("smoke", "seeded", ["train.wandb=disabled", *overrides], str(tmp_path))
        torch.manual_seed(seed_before)  # what a notebook may have drawn before building the model
        model = load_trainable_model(run.cfg, run.device, run.compute_dtype)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}

    first, second, other = lora_a(1), lora_a(2), lora_a(1, "train.seed=7")
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # the same adapters in every run
    assert not any(torch.equal(first[k], other[k]) for k in first)  # another train.seed, other adapters


def test_failed_adapter_save_keeps_the_previous_adapter(trained):
    run, result = trained
    before = (run.path / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(KeyError):
        save_adapter(run, result["trainer"].model, result["trainer"].processing_class or _tok(run), {})
    assert (run.path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not list(run.path.glob(".adapter.*"))


def _tok(run):
    from qlora_helpers.models import load_tokenizer

    return load_tokenizer(run.cfg.model)


def test_nan_loss_stops_with_a_clear_message_and_keeps_good_checkpoints(tmp_path, tiny_dir):
    # a finite learning rate (the config refuses inf) that overflows the weights at the first step
    run = setup_run("smoke", "nan", [*QUIET, "train.max_steps=30", "train.save_steps=1",
                                     "train.learning_rate=1e37", "train.max_grad_norm=0"], str(tmp_path))
    with pytest.raises(NonFiniteLoss, match=r"became (nan|inf|NaN or infinite) at step \d+.*Lower train.learning_rate"):
        train_adapter(run, prepare_run_data(run))
    assert not (run.path / "adapter").exists()
    for ckpt in (run.path / "checkpoints").glob("checkpoint-*"):
        weights = load_file(ckpt / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt


# A training child that stops itself right after a checkpoint is complete: it prints the step and
# then waits for the signal the test sends, so what the test kills or interrupts is a known state
# (no poll racing the trainer). The freeze is a TrainerCallback passed through train_adapter's
# extra_callbacks, after the callback that marks checkpoints complete.
FREEZE_AT_CHECKPOINT = """
import signal, sys
from transformers import TrainerCallback
from qlora_helpers.runs import stage
from qlora_helpers.opening import setup_run
from qlora_helpers.prepared import load_prepared
from qlora_helpers.train import train_adapter

outputs, name, at, *overrides = sys.argv[1:]

class FreezeAfterSave(TrainerCallback):
    frozen = False

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(at) and not self.frozen:  # once: Ctrl-C's own save calls on_save too
            FreezeAfterSave.frozen = True
            print(f"checkpoint {state.global_step} complete", flush=True)
            signal.pause()  # until the test's signal

run = setup_run("smoke", name, overrides, outputs)
stage("03").run(run)
train_adapter(run, load_prepared(run), extra_callbacks=[FreezeAfterSave()])
"""


def _frozen_at_checkpoint(outputs: Path, run_name: str, step: int, *overrides: str) -> subprocess.Popen:
    """Start training (the smoke profile) in a child that freezes after checkpoint `step`; return once
    it has said so on its stdout."""
    proc = subprocess.Popen([sys.executable, "-c", FREEZE_AT_CHECKPOINT, str(outputs), run_name, str(step),
                             *QUIET, *overrides],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # the default SIGINT disposition, as a terminal's Ctrl-C finds it (a suite started
                            # in the background by a non-interactive shell inherits SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # blocks until the child writes: no timing involved
        if line.strip() == f"checkpoint {step} complete":
            return proc
    proc.wait()
    pytest.fail(f"training ended (exit {proc.returncode}) without reaching checkpoint {step}: "
                f"{proc.stderr.read()[-2000:]}")


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path, tiny_dir):
    steps = ["train.max_steps=60", "train.save_steps=5", "train.learning_rate=5e-3", "lora.dropout=0.1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight = subprocess.run(_train_cmd(tmp_path / "a", "run", *steps), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # run again on the finished run: it resumes from checkpoint-60, trains nothing (transformers would train
    # a step 61) and saves that checkpoint's adapter
    first = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    again = subprocess.run(_train_cmd(tmp_path / "a", "run", *steps), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already reached step 60 of 60: nothing is left to train" in again.stdout
    assert json.loads(RunFolder(tmp_path / "a" / "run").train_log.read_text())["summary"]["steps"] == 60
    assert not (tmp_path / "a" / "run" / "checkpoints" / "checkpoint-61").exists()
    assert load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors").keys() == first.keys()
    for key, value in load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors").items():
        assert torch.equal(value, first[key]), key

    proc = _frozen_at_checkpoint(tmp_path / "b", "run", 15, *steps)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.communicate()
    folder = RunFolder(tmp_path / "b" / "run")
    assert last_complete_checkpoint(folder.checkpoints_dir).name == "checkpoint-15"
    assert not folder.adapter_dir.exists()

    resumed = subprocess.run(_train_cmd(tmp_path / "b", "run", *steps), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(folder.train_log.read_text())["summary"]
    assert summary["resumed_from"].endswith("checkpoint-15") and summary["steps"] == 60
    assert f"Training resumes from {summary['resumed_from']} at step 15 of 60 (train.resume=auto)." in resumed.stdout
    a = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(folder.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_interrupt_saves_a_checkpoint(tmp_path, tiny_dir):
    proc = _frozen_at_checkpoint(tmp_path, "run", 5, "train.max_steps=400", "train.save_steps=5")
    proc.send_signal(signal.SIGINT)  # Ctrl-C, at a known point: just after checkpoint 5
    try:  # a generous limit: on a loaded 2-core machine the checkpoint save after Ctrl-C is slow
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training did not stop within 600 s of SIGINT; its stderr ends: {err[-2000:]}")
    assert proc.returncode == 1
    assert "Training interrupted at step 5; a checkpoint was saved. Run again with train.resume=auto" in err
    assert last_complete_checkpoint(RunFolder(tmp_path / "run").checkpoints_dir).name == "checkpoint-5"


def test_fsdp_needs_the_weights_stored_in_the_compute_dtype(monkeypatch):
    import torch

    from qlora_helpers.train import check_fsdp_storage, fsdp_active

    cfg = load_config("fsdp-qlora")
    check_fsdp_storage(cfg, torch.bfloat16)  # the profile is consistent
    bad = load_config("fsdp-qlora", ["quant.quant_storage=uint8"])
    with pytest.raises(QLoraError, match="quant.quant_storage=bfloat16"):
        check_fsdp_storage(bad, torch.bfloat16)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not fsdp_active(cfg)  # one process: nothing to shard, the ordinary path runs
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp_active(cfg) and not fsdp_active(load_config("llama2-7b"))


# --- training that cannot silently learn nothing ----------------------------------------------------


def _dequantized(model) -> list[torch.Tensor]:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    return [dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
            for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _pack_for_cpu_inference(model) -> int:
    """What an eval pass on an AVX512-BF16 CPU does to every 4-bit layer (bitsandbytes' own function)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    return len(layers)


def test_training_after_bitsandbytes_cpu_repacking_still_learns(tmp_path, tiny_dir):
    """On AVX512-BF16 CPUs, bitsandbytes repacks 4-bit layers for a gradient-free bf16 kernel after an
    eval pass; training must restore the ordinary layout, whatever CPU runs this test."""
    from qlora_helpers.models import four_bit_kernel, load_model

    run = setup_run("smoke", "repacked", [*QUIET, "train.max_steps=8", "train.learning_rate=5e-3",
                                          "train.logging_steps=1", "lora.dropout=0.0"], str(tmp_path))
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    assert all(not m.support_avx512bf16_for_cpu for m in base.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    original = _dequantized(base)
    assert _pack_for_cpu_inference(base) == 14
    assert four_bit_kernel(base).startswith("cpu: bf16 packed")
    model = load_trainable_model(run.cfg, run.device, run.compute_dtype, base=base)
    assert four_bit_kernel(model) == "cpu: dequantize + matmul in float32"
    restored = _dequantized(base)
    # the packing casts the (double-quantized) scales to bf16, so the round trip is close, not exact
    assert len(restored) == len(original) == 14
    assert all(torch.allclose(a, b, rtol=0, atol=2e-2 * a.abs().max()) for a, b in zip(original, restored))
    result = train_adapter(run, prepare_run_data(run), model=model)
    norms = [h["grad_norm"] for h in result["log_history"] if "grad_norm" in h]
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(norms) == 8 and min(norms) > 0
    assert losses[-1] < losses[0]
    assert result["summary"]["heldout_loss_tuned"] < result["summary"]["heldout_loss_base"]


def test_zero_gradient_stops_training_with_what_to_check(tmp_path, tiny_dir):
    from qlora_helpers.train import NotLearning

    run = setup_run("smoke", "no-grad", ["train.wandb=disabled", "train.eval_samples=0", "train.max_steps=3"],
                    str(tmp_path))
    model = load_trainable_model(run.cfg, run.device, run.compute_dtype)
    # a model whose adapters cannot learn: the final norm's output keeps its value, loses its gradient
    model.get_base_model().model.norm.register_forward_hook(lambda module, args, out: out * 0 + out.detach())
    with pytest.raises(NotLearning, match=r"zero gradient at optimizer step 1.*bitsandbytes' version and CPU kernel"
                                          r".*lora.target_modules.*learning_rate"):
        train_adapter(run, prepare_run_data(run), model=model)
    assert not (run.path / "adapter").exists()


def test_adapters_that_do_not_move_stop_training(tmp_path, tiny_dir):
    from qlora_helpers.train import NotLearning

    run = setup_run("smoke", "no-move", ["train.wandb=disabled", "train.eval_samples=0", "train.max_steps=3",
                                         "train.learning_rate=1e-30"], str(tmp_path))
    with pytest.raises(NotLearning, match=r"have not moved after \d optimizer step\(s\) at learning rate 1e-30"):
        train_adapter(run, prepare_run_data(run))
