"""The GPU fast path's pieces that run anywhere: flat batches, the varlen attention plumbing (with
its per-example CPU stand-in for the kernel), and recomputation by memory budget. The kernels
themselves are checked on CUDA in tests/test_gpu.py."""

import pytest
import torch

from qlora_helpers import fastpath
from qlora_helpers.batching import pack_examples
from qlora_helpers.config import load_config
from qlora_helpers.errors import ConfigError


def _examples(lengths, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]  # loss on the second half, like a response
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_collate_flat_marks_every_boundary():
    rows = pack_examples(_examples([7, 3, 5, 9]), budget=12, seed=1)
    batch = fastpath.collate_flat(rows)
    lens = [n for r in rows for n in r["seq_lens"]]
    assert batch["input_ids"].shape == (1, 24) and "attention_mask" not in batch  # no padding at all
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert batch["max_length_q"] == 9
    starts = batch["cu_seq_lens_q"][:-1].tolist()
    assert all(batch["position_ids"][0, s] == 0 for s in starts)
    assert all(batch["labels"][0, s] == -100 for s in starts)  # no example learns to follow another


@pytest.mark.parametrize("attention", [fastpath.VARLEN, fastpath.MASKED])
def test_packed_attention_equals_separate(tiny_dir, attention):
    """The flat packed row through the varlen attention (or, for cards below compute capability 8.0,
    the block-diagonal mask) gives each example exactly the logits it gets alone: attention never
    crosses examples."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = _examples([11, 4, 17, 8, 13])
    rows = pack_examples(examples, budget=64, seed=0)
    batch = fastpath.collate_flat(rows)
    fastpath.use_varlen_attention(model, attention)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        order = [i for r in rows for i in _members(r, examples)]
        cu = batch["cu_seq_lens_q"].tolist()
        for j, i in enumerate(order):
            alone = model(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[cu[j]:cu[j + 1]], alone, rtol=1e-4, atol=1e-4)
        # padded batches (evaluation) still go through sdpa with their padding mask
        pad = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
        mask = (pad != 0).long()
        out = model(input_ids=pad, attention_mask=mask).logits
        torch.testing.assert_close(out[0, :3], model(input_ids=pad[:1, :3]).logits[0], rtol=1e-4, atol=1e-4)


def _members(row, examples):
    """Indices of the examples in a packed row, in order (matched by their tokens)."""
    out, at = [], 0
    for n in row["seq_lens"]:
        ids = row["input_ids"][at:at + n]
        out.append(next(i for i, e in enumerate(examples) if e["input_ids"] == ids))
        at += n
    return out


@pytest.mark.parametrize("attention", [fastpath.VARLEN, fastpath.MASKED])
def test_flat_loss_equals_padded_loss(tiny_dir, attention):
    """Same weights, same tokens: the fast path's loss equals the padded batch's token-weighted loss."""
    from transformers import AutoModelForCausalLM

    from qlora_helpers.scoring import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = _examples([21, 9, 30, 14], seed=3)
    with torch.no_grad():
        padded = model(**collate(examples, pad_token_id=0)).loss
        fastpath.use_varlen_attention(model, attention)
        flat = model(**fastpath.collate_flat(pack_examples(examples, budget=128))).loss
    torch.testing.assert_close(flat, padded, rtol=1e-5, atol=1e-6)


def test_recompute_plan_follows_the_budget():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    gib = fastpath.GIB
    roomy = fastpath.plan_recompute(cfg, 8192, 75 * gib, 5 * gib)
    tight = fastpath.plan_recompute(cfg, 8192, 20 * gib, 5 * gib)
    hopeless = fastpath.plan_recompute(cfg, 8192, 5 * gib, 5 * gib)
    assert roomy["recompute_layers"] < tight["recompute_layers"] <= 32
    assert roomy["fits"] and tight["fits"] and not hopeless["fits"]
    assert tight["activations_gib"] <= 15
    full, kept = fastpath.activation_bytes(cfg, 1000)
    assert kept == 1000 * 2 * 4096 and full > 10 * kept


def test_without_fused_kernels_the_plan_reserves_the_whole_logits():
    """No Liger (a T4): the loss holds tokens x vocab x 14 bytes at its peak, which the budget must hold
    beside the kept activations (on the H200, reserving only 1 GiB peaked 0.8 GiB above a 10.8 GiB budget)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=49152)
    gib = fastpath.GIB
    assert fastpath.loss_bytes(cfg, 4096, fused=False) == 4096 * 49152 * 14
    assert fastpath.loss_bytes(cfg, 4096, fused=True) < fastpath.LOSS_RESERVE  # Liger's chunks: the 1 GiB covers them
    plan = fastpath.plan_recompute(cfg, 4096, int(10.8 * gib), int(3.9 * gib), ["q_proj", "v_proj"], fused=False)
    full, kept = fastpath.activation_bytes(cfg, 4096, ["q_proj", "v_proj"], fused=False)
    r = plan["recompute_layers"]
    # the model, the kept activations and the logits at the forward's end (a recomputed layer's activations
    # in backward come after the stored layers freed theirs)
    assert 0 < r < 32
    peak = 3.9 * gib + (32 - r) * full + r * kept + fastpath.loss_bytes(cfg, 4096, fused=False)
    assert plan["fits"] and peak <= 10.8 * gib
    assert peak + full - kept > 10.8 * gib  # one layer fewer recomputed would not fit


def test_fast_path_switch(tiny_dir):
    cfg = load_config("smoke")
    assert fastpath.fast_path_active(cfg.train, "cuda") and not fastpath.fast_path_active(cfg.train, "cpu")
    off = load_config("smoke", ["train.fast_path=never"])
    assert not fastpath.fast_path_active(off.train, "cuda")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        fastpath.fast_path_active(load_config("smoke", ["train.fast_path=always"]).train, "cpu")


def test_block_diagonal_mask():
    mask = fastpath.block_diagonal_mask(torch.tensor([0, 2, 5]), 5)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.fixture
def card(monkeypatch):
    """Replace the GPU's identity: (capability, bf16, name), and whether liger-kernel is installed."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def set_card(capability, bf16, name, liger=True):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(fastpath, "varlen_available", lambda: True)
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: (object() if liger else None)
                            if n == "liger_kernel" else real_find_spec(n, *a))
    return set_card


def test_auto_on_a_t4_packs_with_the_mask_in_fp16(card):
    card((7, 5), False, "Tesla T4")
    choice = fastpath.choose_fast_path(load_config("smoke").train, "cuda")
    assert choice["attention"] == fastpath.MASKED and not choice["fused"]
    assert fastpath.describe_choice(choice, torch.float16) == (
        "fast path on Tesla T4 (compute capability 7.5): packed rows, SDPA with a block-diagonal mask "
        "(varlen FlashAttention needs 8.0+), fused kernels off (Triton supports compute capability 8.0+), "
        "fp16 with loss scaling (no bf16 on this card)")


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (12, 0)])
def test_auto_on_ampere_and_newer_uses_varlen_and_liger(card, capability):
    card(capability, True, "NVIDIA H100 80GB HBM3")
    choice = fastpath.choose_fast_path(load_config("smoke").train, "cuda")
    assert choice["attention"] == fastpath.VARLEN and choice["fused"]
    line = fastpath.describe_choice(choice, torch.bfloat16)
    assert "varlen FlashAttention, fused kernels Liger, bf16" in line
    card(capability, True, "NVIDIA H100 80GB HBM3", liger=False)
    assert not fastpath.choose_fast_path(load_config("smoke").train, "cuda")["fused"]
    masked = fastpath.choose_fast_path(load_config("smoke", ["train.fast_attention=masked"]).train, "cuda")
    assert masked["attention"] == fastpath.MASKED


@pytest.mark.parametrize("setting", ["train.fast_path=always", "train.fast_attention=varlen"])
def test_varlen_demanded_on_a_t4_is_a_clear_error(card, setting):
    card((7, 5), False, "Tesla T4")
    with pytest.raises(ConfigError, match=r"8\.0\+.*Tesla T4 \(compute capability 7\.5\).*fast_path=auto"):
        fastpath.choose_fast_path(load_config("smoke", [setting]).train, "cuda")


def test_fast_rows_need_room_for_the_longest_example():
    from qlora_helpers.errors import QLoraError
    from qlora_helpers.prepared import PreparedData
    from qlora_helpers.train import training_rows

    cfg = load_config("smoke", ["train.packed_tokens=64", "model.max_seq_length=128"])
    data = PreparedData(_examples([10, 20]), [], {}, path=None)
    with pytest.raises(QLoraError, match="train.packed_tokens=64"):
        training_rows(cfg, data, fast=True)
    ok = load_config("smoke", ["train.packed_tokens=128", "model.max_seq_length=128"])
    rows = training_rows(ok, data, fast=True)
    assert len(rows) == 1 and rows[0]["seq_lens"] in ([20, 10], [10, 20])


def test_describe_fast_path_never_says_none():
    assert fastpath.describe_fast_path(None, "cpu").startswith("plain path (CPU)")
    assert "fast_path=never" in fastpath.describe_fast_path(None, "cuda:0")
    fast = {"attention": fastpath.MASKED, "card": "Tesla T4 (compute capability 7.5)", "fused_kernels": [],
            "recompute": {"tokens": 4096, "recompute_layers": 3, "layers": 30, "budget_gib": 13.5}}
    assert fastpath.describe_fast_path(fast, "cuda") == (
        "fast path on Tesla T4 (compute capability 7.5): packed rows of 4096 tokens, SDPA with a "
        "block-diagonal mask, fused kernels: none; 3 of 30 layers recomputed to fit 13.5 GiB")
