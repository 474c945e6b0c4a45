"""One implementation of each QLoRA step: the cells of notebooks 02, 04 and 06 that make the core
calls in sight (BitsAndBytesConfig, prepare_model_for_kbit_training, LoraConfig + get_peft_model,
TrainingArguments, the de-quantize-then-merge) run here as they are in the notebook, on the smoke
run, and must build the same objects as the helpers the CLI and the sweeps call."""

import json

import pytest
import torch

from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.runs import setup_run
from tests.serve_fixtures import run as serve_run  # noqa: F401 - a fixture (a run with a random adapter)


def run_cells(notebook: str, ids: list[str], namespace: dict) -> dict:
    """Execute the code cells `ids` of notebooks/`notebook` as they are committed, in `namespace`."""
    cells = {c.get("id"): c for c in json.loads((PROJECT_ROOT / "notebooks" / notebook).read_text())["cells"]}
    for cid in ids:
        assert cells[cid]["cell_type"] == "code", (notebook, cid)
        exec(compile("".join(cells[cid]["source"]), f"{notebook}:{cid}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_dir):
    return setup_run("smoke", "core-calls", ["train.wandb=disabled", "lora.dropout=0.0"],
                     str(tmp_path_factory.mktemp("core-calls")))


def test_02_quantization_config_is_the_helpers(smoke):
    from qlora_helpers.models import bnb_config, four_bit_kernel

    ns = run_cells("02_quantize.ipynb", ["s02-05"], {"run": smoke})
    cell_config = ns["quantization_config"]
    assert cell_config.to_dict() == bnb_config(smoke.cfg.quant, smoke.compute_dtype).to_dict()
    quantized = ns["loaded"]["quantized"]
    assert quantized.config.quantization_config.to_dict() == cell_config.to_dict()
    assert four_bit_kernel(quantized).startswith("cpu: dequantize + matmul")  # the guard ran (any CPU)


def test_04_model_lora_config_and_arguments_are_the_helpers(smoke):
    from qlora_helpers.train import configure_wandb, load_trainable_model, lora_config, training_arguments

    ns = run_cells("04_train.ipynb", ["s04-07", "s04-07d", "s04-07f", "s04-08a"], {"run": smoke})
    assert ns["lora_config"].to_dict() | {"base_model_name_or_path": None} == lora_config(smoke.cfg.lora).to_dict()
    helper = load_trainable_model(smoke.cfg, smoke.device, smoke.compute_dtype)
    assert ns["model"].peft_config["default"] == helper.peft_config["default"]
    cell_params = dict(ns["model"].named_parameters())
    helper_params = dict(helper.named_parameters())
    assert cell_params.keys() == helper_params.keys()
    for attribute in ("requires_grad", "dtype", "shape"):
        assert ({n: getattr(p, attribute) for n, p in cell_params.items()}
                == {n: getattr(p, attribute) for n, p in helper_params.items()}), attribute
    lora = [n for n in cell_params if "lora_" in n]
    assert lora and all(torch.equal(cell_params[n], helper_params[n]) for n in lora)  # the same seeded init
    checkpointing = [m.base_model.model.is_activation_checkpointing for m in (ns["model"], helper)]
    assert checkpointing == [smoke.cfg.train.gradient_checkpointing] * 2
    args = training_arguments(smoke.cfg, smoke, smoke.runtime, configure_wandb(smoke.cfg, smoke), fast=False)
    assert ns["args"].to_dict() == args.to_dict()


def test_04_arguments_differ_when_the_config_does(smoke):
    """The comparison above can fail: another learning rate in the helper's config is seen."""
    from dataclasses import replace

    from qlora_helpers.train import training_arguments

    ns = run_cells("04_train.ipynb", ["s04-07", "s04-07d", "s04-08a"], {"run": smoke})
    other = replace(smoke.cfg, train=replace(smoke.cfg.train, learning_rate=smoke.cfg.train.learning_rate * 2))
    assert ns["args"].to_dict() != training_arguments(other, smoke, smoke.runtime, [], fast=False).to_dict()


def test_06_merge_cell_is_merge_adapter(serve_run):  # noqa: F811 - the fixture
    from qlora_helpers.serve import merge_adapter

    ns = {"run": serve_run}
    cells = {c.get("id"): c for c in json.loads((PROJECT_ROOT / "notebooks" / "06_serve.ipynb").read_text())["cells"]}
    source = "".join(cells["837a6fbe"]["source"])
    head = source.split("merge = merge_and_export")[0]  # the merge itself; the export is test_serve's
    assert "dequantize(" in head and "merge_and_unload()" in head
    exec(compile(head, "06_serve.ipynb:837a6fbe", "exec"), ns)
    helper, _ = merge_adapter(serve_run)
    cell_state, helper_state = ns["merged"].state_dict(), helper.state_dict()
    assert cell_state.keys() == helper_state.keys()
    assert all(torch.equal(cell_state[k], helper_state[k]) for k in cell_state)
