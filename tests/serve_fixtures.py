"""Fixtures the serving tests share: a smoke run with a random, non-zero adapter, and its export;
the forms a server is tested with (merged, and the GGUF through llama.cpp with the [gguf] extra)."""

import os
import shutil

import pytest

API_KEY = "test-key-must-not-leak-4242"
KEY_ENV = "QLORA_TEST_API_KEY"
# The server forms the API tests run against; the GGUF needs the [gguf] extra (require_gguf).
SERVER_FORMS = ["merged", pytest.param("gguf", marks=pytest.mark.gguf)]


def require_gguf() -> None:
    """Skip (saying what to install) without the [gguf] extra; under .ci/run (QLORA_REQUIRE_GGUF=1) fail."""
    from qlora_helpers.serve.gguf import INSTALL_HINT, gguf_available

    if gguf_available():
        return
    message = f"needs the [gguf] extra (llama-cpp-python): {INSTALL_HINT}"
    if os.environ.get("QLORA_REQUIRE_GGUF") == "1":
        pytest.fail(f"QLORA_REQUIRE_GGUF=1 but this test {message}")
    pytest.skip(message)


def serve_form(request) -> list[str]:
    """The override that serves `request.param`'s form (after checking the extra for the GGUF)."""
    if request.param == "gguf":
        require_gguf()
    return [f"serve.form={request.param}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """A smoke run (01's files) with a LoRA adapter whose B matrices are random, so merging matters."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.models import load_model
    from qlora_helpers.opening import setup_run
    from qlora_helpers.serve import open_run_folder

    outputs = tmp_path_factory.mktemp("serve-outputs")
    setup = setup_run("smoke", "serve", [f"serve.api_key_env={KEY_ENV}"], outputs_dir=str(outputs))
    base = load_model(setup.cfg.model, setup.cfg.quant, setup.compute_dtype, setup.device)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(setup.path / "adapter")
    return open_run_folder(setup.path)


@pytest.fixture(scope="module")
def export(run):
    from qlora_helpers.serve import merge_and_export

    return merge_and_export(run)


def write_adapter(run, folder, seed: int) -> None:
    """A LoRA adapter with random, non-zero B matrices (another training, as far as merging can tell)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.models import load_model

    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(folder)


def copy_run(run, tmp_path, overrides=()):
    from qlora_helpers.serve import open_run_folder

    shutil.copytree(run.path, tmp_path / run.path.name)  # copy2: the files keep their times
    return open_run_folder(tmp_path / run.path.name, list(overrides))
