import json
import subprocess
import sys

import huggingface_hub.constants as hub_constants
import pytest
import torch

from qlora_helpers.config import ModelConfig, load_config
from qlora_helpers.errors import ModelSourceError
from qlora_helpers.models import convert_gguf, load_model, load_tokenizer, resolve_model


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="does not exist.*hub id.*embedded"):
        resolve_model(ModelConfig(source="./models/nowhere"))


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(ModelConfig(source=str(tmp_path)))


def test_hub_id_is_left_for_from_pretrained():
    resolved = resolve_model(ModelConfig(source="meta-llama/Llama-2-7b-hf"))
    assert (resolved.kind, resolved.location) == ("hub", "meta-llama/Llama-2-7b-hf")


def test_unknown_random_shape():
    with pytest.raises(ModelSourceError, match="valid: tiny"):
        resolve_model(ModelConfig(source="random:huge"))


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (an earlier test imported it): without this
    # the load tries the network and retries for ~45 s before the same error
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    cfg = ModelConfig(source="nobody-here/no-such-model-qlora")
    with pytest.raises(ModelSourceError) as err:
        load_tokenizer(cfg)
    assert "HF_TOKEN is set" in str(err.value) and "embedded" in str(err.value)
    assert "hf_secret_token_value" not in str(err.value)


def test_embedded_conversion_is_cached_and_reused(embedded_timing):
    folder = embedded_timing["folder"]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickles
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # the second call reuses the cached folder (observed, not timed: ~30 s to convert, milliseconds to
    # reuse on an idle machine, but a wall-clock ratio flakes on a busy one)
    assert not embedded_timing["rewritten"], embedded_timing


def test_embedded_model_generates_sensibly(embedded_dir):
    cfg = load_config("default")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=False)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == cfg.model.max_seq_length
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_real_nf4_load_on_cpu(embedded_dir):
    import bitsandbytes as bnb

    from qlora_helpers.quantize import memory_footprint

    cfg = load_config("default")
    full = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=False)
    quant = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=True)
    layer = quant.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantization
    fp = memory_footprint(full, quant)
    assert fp["quantized_layers"] == 30 * 7
    assert fp["linear_4bit_vs_full"] < 0.40
    assert 4.0 < fp["linear_bits_per_param"] < 4.6


def test_unloadable_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), "alienformer")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="transformers cannot load alien.gguf.*architectures"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_4bit_without_bitsandbytes_is_explained():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from qlora_helpers.models import check_bitsandbytes\n"
            "check_bitsandbytes('cpu')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "QLoraError: 4-bit loading needs bitsandbytes" in proc.stderr
    assert "quant.load_in_4bit=false" in proc.stderr
