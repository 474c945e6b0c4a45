"""CUDA-only checks: run on the GPU machine (`pytest -m gpu`); skipped where there is no GPU."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_plan_is_bf16_and_paged_adamw():
    from qlora_helpers.config import load_config
    from qlora_helpers.environment import collect_environment, plan_runtime

    env = collect_environment()
    plan = plan_runtime(load_config("default"), env)
    assert plan["device"] == "cuda" and plan["optimizer"] == "paged_adamw_32bit"
    assert plan["compute_dtype"] == ("bfloat16" if env["bf16_supported"] else "float16")
    assert env["bitsandbytes"]["available"] and env["gpus"]


def test_nf4_on_cuda_beats_fp4(tiny_dir):
    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model
    from qlora_helpers.quantize import layer_errors, memory_footprint

    cfg = load_config("smoke")
    full = load_model(cfg.model, cfg.quant, torch.bfloat16, "cuda", quantized=False)
    quant = load_model(cfg.model, cfg.quant, torch.bfloat16, "cuda", quantized=True)
    errors = layer_errors(full, quant, double_quant=True)
    assert all(r["nf4"] < r["fp4"] for r in errors)
    assert memory_footprint(full, quant)["linear_4bit_vs_fp16"] < 0.5


def test_packed_logits_equal_separate_on_cuda(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_helpers.data import collate_packed, pack_examples, tokenize_pair

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").cuda()
    exs = [tokenize_pair(tok, p, r) for p, r in [("Hello there", " general kenobi"), ("2+2?", " four"),
                                                  ("A longer prompt here", " with an answer")]]
    rows = pack_examples(exs, 64)
    batch = {k: v.cuda() for k, v in collate_packed(rows, tok.pad_token_id).items()}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
        start = 0
        for length in rows[0]["seq_lens"]:
            ids = batch["input_ids"][0, start:start + length][None]
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[start:start + length], alone, rtol=1e-4, atol=1e-4)
            start += length


def test_qlora_training_on_cuda(tmp_path, tiny_dir, data_dir):
    from qlora_helpers.data import prepare_run_data
    from qlora_helpers.runs import setup_run
    from qlora_helpers.train import train_adapter

    run = setup_run("smoke", "gpu", ["train.max_steps=8", "train.learning_rate=5e-3", "train.wandb=disabled",
                                     "train.eval_samples=16"], str(tmp_path))
    assert run.runtime["optimizer"] == "paged_adamw_32bit"
    summary = train_adapter(run, prepare_run_data(run))["summary"]
    assert summary["heldout_loss_tuned"] < summary["heldout_loss_base"]
    assert summary["peak_gpu_memory_gib"] > 0
