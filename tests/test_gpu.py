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

    from qlora_helpers.batching import collate_packed, pack_examples
    from qlora_helpers.prompts import encode_pairs

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").cuda()
    exs = encode_pairs("alpaca", tok, [("Hello there", " general kenobi"), ("2+2?", " four"),
                                        ("A longer prompt here", " with an answer")])
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


@pytest.mark.parametrize("fast_path", ["auto", "never"])
def test_qlora_training_on_cuda(tmp_path, tiny_dir, fast_path):
    from qlora_helpers.data import prepare_run_data
    from qlora_helpers.opening import setup_run
    from qlora_helpers.train import train_adapter

    run = setup_run("smoke", f"gpu-{fast_path}", [
        "train.max_steps=8", "train.learning_rate=5e-3", "train.wandb=disabled", "train.eval_samples=16",
        f"train.fast_path={fast_path}", "train.packed_tokens=2048"], str(tmp_path))
    assert run.runtime.optimizer == "paged_adamw_32bit"
    summary = train_adapter(run, prepare_run_data(run))["summary"]
    assert summary["heldout_loss_tuned"] < summary["heldout_loss_base"]
    assert summary["peak_gpu_memory_gib"] > 0
    if fast_path == "auto":  # the default on CUDA
        assert summary["fast_path"]["attention"] == "qlora_varlen"
        assert "fused_linear_cross_entropy" in summary["fast_path"]["fused_kernels"]
    else:
        assert summary["fast_path"] is None


def _random_examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def test_varlen_kernel_packed_equals_separate(tiny_dir):
    """The real varlen FlashAttention kernel: packed logits equal per-example logits (bf16), also
    with grouped-query attention (the tiny model has 4 query heads over 2 key/value heads)."""
    from transformers import AutoModelForCausalLM

    from qlora_helpers import fastpath
    from qlora_helpers.batching import pack_examples

    assert fastpath.varlen_available()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).cuda().eval()
    fastpath.use_varlen_attention(model)
    examples = _random_examples([37, 5, 120, 64, 17], model.config.vocab_size)
    rows = pack_examples(examples, budget=4096)
    batch = fastpath.collate_flat(rows)
    with torch.no_grad():
        packed = model(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()
                          if k != "labels"}).logits[0].float()
        cu = batch["cu_seq_lens_q"].tolist()
        for j in range(len(cu) - 1):
            ids = batch["input_ids"][:, cu[j]:cu[j + 1]].cuda()
            model.set_attn_implementation("sdpa")
            alone = model(input_ids=ids).logits[0].float()
            model.set_attn_implementation(fastpath.VARLEN)
            torch.testing.assert_close(packed[cu[j]:cu[j + 1]], alone, rtol=2e-2, atol=2e-2)


def test_fast_path_loss_matches_padded_loss(tiny_dir):
    """Same weights, same tokens: the fast path's loss (flat row, varlen, fused kernels and loss)
    is within 1% of the plain padded loss (sdpa, ordinary logits and cross-entropy)."""
    from qlora_helpers.batching import pack_examples
    from qlora_helpers.config import load_config
    from qlora_helpers.fastpath import collate_flat
    from qlora_helpers.scoring import collate
    from qlora_helpers.train import load_trainable_model

    cfg = load_config("smoke", ["train.fast_path=always", "lora.dropout=0.0", "train.packed_tokens=4096"])
    model = load_trainable_model(cfg, "cuda", torch.bfloat16)
    assert model.qlora_fast_path["fused_kernels"]
    examples = _random_examples([90, 33, 250, 71, 140, 12, 64, 200], model.config.vocab_size, seed=1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()
        flat = collate_flat(pack_examples(examples, budget=4096))
        fast = float(model(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in flat.items()}).loss)
        model.eval()
        plain = float(model(**{k: v.cuda() for k, v in collate(examples, 0).items()}).loss)
    assert abs(fast - plain) / plain < 0.01, (fast, plain)


def test_fused_kernels_stay_on_their_model(tiny_dir):
    """Liger's RMSNorm, RoPE and SwiGLU on one model give its own logits, and a model built afterwards
    in the same process is transformers' plain LLaMA (Liger patches the classes module-wide otherwise:
    a server compiled later in the process met its Triton kernels)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from qlora_helpers.fastpath import apply_fused_kernels

    plain_rope = modeling_llama.apply_rotary_pos_emb
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()  # noqa: E731
    reference, fused = load(), load()
    assert apply_fused_kernels(fused) == ["rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"]
    assert "forward" in vars(fused.model.layers[0].self_attn)
    ids = torch.randint(0, fused.config.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
    later = load()
    layer = later.model.layers[0]
    assert type(layer.input_layernorm) is modeling_llama.LlamaRMSNorm
    assert type(layer.input_layernorm).__module__ == "transformers.models.llama.modeling_llama"
    assert type(layer.mlp).__module__ == "transformers.models.llama.modeling_llama"
    assert "forward" not in vars(layer.self_attn) and modeling_llama.apply_rotary_pos_emb is plain_rope
