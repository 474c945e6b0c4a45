"""Known noise is silenced by message, and nothing else is."""

import logging
import warnings

import qlora_helpers  # noqa: F401  (installs the filters)


def test_bitsandbytes_kernel_fetch_warning_is_dropped_and_other_records_pass(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                       "you already `pip install kernels`", "offline")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_only_the_named_future_warning_is_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        qlora_helpers.noise.silence_known_noise()
        known = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        warnings.warn(known, FutureWarning, stacklevel=1)
        warnings.warn("`other_thing` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`other_thing` is deprecated"]


def test_llama_cpp_log_keeps_warnings_less_the_per_tensor_fallbacks_it_sums_up():
    from qlora_helpers.serve.gguf import log_line_shown

    fallback = ("warning: blk.0.attn_k.weight - ncols    576 not divisible by 256 (required for type    q4_K) "
                "-> falling back to    q5_0\n")
    assert not log_line_shown(3, fallback)
    fallback = "llama_model_quantize_impl: WARNING: 180 of 272 tensor(s) required fallback quantization\n"
    assert log_line_shown(3, fallback)
    assert log_line_shown(4, "llama_model_load: error loading model: tensor 'x' has wrong shape\n")
    assert not log_line_shown(2, "llama_model_loader: - kv   0: general.architecture str = llama\n")  # info
