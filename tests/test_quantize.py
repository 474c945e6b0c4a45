import math

import pytest
import torch

from qlora_helpers.config import load_config
from qlora_helpers.models import load_model, load_tokenizer
from qlora_helpers.quantize import layer_errors, memory_footprint, summarize_errors
from qlora_helpers.scoring import heldout_loss


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    cfg = load_config("smoke")
    full = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=False)
    quant = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=True)
    return cfg, load_tokenizer(cfg.model), full, quant


def test_nf4_beats_fp4_on_every_layer(tiny_pair):
    cfg, _, full, quant = tiny_pair
    errors = layer_errors(full, quant, double_quant=True)
    assert len(errors) == 2 * 7
    for row in errors:
        assert row["nf4"] < row["fp4"], row
        assert row["nf4_loaded"] == pytest.approx(row["nf4"], rel=1e-6)  # what from_pretrained stored
    # recorded on the smoke model (random normal weights): ~9% relative error for NF4, ~12% for FP4
    assert summarize_errors(errors) == pytest.approx({"nf4_mean": 0.092089, "nf4_max": 0.093221,
                                                      "fp4_mean": 0.121550, "fp4_max": 0.123322}, rel=1e-3)


def test_footprint_counts_packed_weights_and_scales(tiny_pair):
    _, _, full, quant = tiny_pair
    fp = memory_footprint(full, quant)
    linear_params = fp["linear_weight_bytes"]["fp16_reference"] // 2
    # 4 bits per weight plus double-quantized block scales, and the small codebooks
    # recorded: 4 bits + the double-quantized scales, and the codebooks, which weigh on matrices this small
    assert fp["linear_bits_per_param"] == pytest.approx(5.783854, rel=1e-6)
    assert fp["linear_weight_bytes"]["full"] == linear_params * 4  # fp32 on CPU


def test_heldout_loss_matches_a_direct_computation(tiny_pair):
    cfg, tok, full, _ = tiny_pair
    pairs = [("Say a colour:", " blue"), ("Two plus two is", " four, of course")]
    got = heldout_loss(full, tok, pairs, batch_size=2, max_length=64, template="alpaca")
    nll, count = 0.0, 0
    for prompt, response in pairs:
        p = tok(prompt)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = full(input_ids=ids).logits[0, :-1].log_softmax(-1)
        for pos in range(len(p) - 1, len(p) + len(r) - 1):
            nll -= logp[pos, ids[0, pos + 1]].item()
            count += 1
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_too_long_examples_are_counted_not_cut(tiny_pair):
    _, tok, full, _ = tiny_pair
    got = heldout_loss(full, tok, [("short", " yes"), ("long " * 100, " no")], batch_size=2, max_length=32,
                       template="alpaca")
    assert (got["examples"], got["skipped_too_long"]) == (1, 1)


def test_nf4_levels_split_normal_weights_evenly_fp4_does_not():
    from qlora_helpers.plots import plot_4bit_levels
    from qlora_helpers.quantize import NF4_SIGMA, normal_mass_per_level, quantization_levels

    levels = quantization_levels()
    assert len(levels["nf4"]) == len(levels["fp4"]) == 16
    assert levels["nf4"][0] == -1.0 and levels["nf4"][-1] == 1.0 and 0.0 in levels["nf4"]
    assert pytest.approx(0.541, abs=1e-3) == NF4_SIGMA
    nf4, fp4 = normal_mass_per_level(levels["nf4"]), normal_mass_per_level(levels["fp4"])
    assert sum(nf4) == pytest.approx(1.0) and sum(fp4) == pytest.approx(1.0)
    assert max(nf4) / min(nf4) < 1.3  # about 1/16 each: every code carries information
    assert min(fp4) < 0.01  # FP4: codes around its duplicate zero almost never used
    bits = {qt: -sum(p * math.log2(p) for p in mass) for qt, mass in (("nf4", nf4), ("fp4", fp4))}
    assert bits["nf4"] > 3.99 > bits["fp4"]
    fig = plot_4bit_levels(levels, NF4_SIGMA)
    markers = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 16]
    assert [list(m.get_xdata()) for m in markers] == [levels["nf4"], levels["fp4"]]
