"""A memory plan before launch: the predicted peak GPU memory of training and of serving a profile,
from the model's shape alone (its config.json, or a known shape), with no download and no GPU.

    python -m qlora_helpers plan --config llama2-7b-fast --gpu-gib 24

Training, one process (a DDP process holds the same; FSDP is not planned here):
- the base weights: 4-bit linear layers (packed NF4/FP4, their absmax constants, and with double
  quantization the 8-bit absmax and its own fp32 constants), and the parts that stay in floating point
  (embeddings, lm_head, norms): in the compute dtype, or float32 where peft's
  `prepare_model_for_kbit_training` upcasts them (the plain path with a 4-bit base);
- the LoRA adapters (float32) with their gradients and AdamW's two states;
- activations: the fast path's recomputation plan (`fastpath.plan_recompute`, the same function and
  budget rule training uses) or, on the plain path, every layer's input under gradient checkpointing
  plus one layer recomputed at a time;
- the logits and the loss: chunked by Liger's fused linear + cross-entropy, or whole (the logits,
  their float32 copy and its gradient) without it.
Serving: the weights of the form served plus the static KV cache (serve.max_concurrent slots of the
context length) and one prefill of all slots.

The per-token activation factors are measurements (benchmarks/BENCHMARKS.md, "memory plan"); the
prediction is checked there against torch.cuda.max_memory_allocated on an H200.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import fastpath
from .config import RANDOM_SHAPES, Config
from .errors import ConfigError, ModelSourceError

GIB = 2**30
BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 8-bit absmax values
# What a CUDA process holds outside PyTorch's allocator (context, kernels, cuBLAS workspace): counted
# when deciding whether the plan fits a card, not in the peaks (which match max_memory_allocated).
CUDA_CONTEXT_GIB = 0.6
RESERVED_FACTOR = fastpath.RESERVED_FACTOR  # a card needs the peak x this (the allocator's reserve)
EMBEDDED_VOCAB = 49152  # the SmolLM2 tokenizer that the embedded and the random:<shape> models use

# Shapes of models a profile names, for users who have not downloaded them yet (config.json values).
LLAMA2 = dict(vocab_size=32000, num_attention_heads=32, max_position_embeddings=4096)
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32),
    "meta-llama/Llama-2-13b-hf": dict(LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40),
    "meta-llama/Llama-2-70b-hf": dict(LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                      num_attention_heads=64, num_key_value_heads=8),
    "embedded": dict(RANDOM_SHAPES["smollm2-135m"], vocab_size=EMBEDDED_VOCAB),
}
KNOWN_SHAPES["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]

# Activations per token and decoder layer, and the loss's bytes: fastpath's factors (fused and unfused), the
# ones training plans with.


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a decoder-only model's config.json (LLaMA family names)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_size: int | None = None  # config.json's head_dim where it differs from hidden / heads (Qwen3, Gemma)
    positions: int | None = None  # max_position_embeddings: the longest context the server accepts

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, m, kv, q = self.hidden, self.intermediate, self.kv_heads * self.head_dim, self.heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}

    def linear_weights(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    def float_weights(self) -> int:
        """Weights that stay in floating point: embeddings, lm_head (unless tied), norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def shape_from_config(config: dict[str, Any]) -> Shape:
    heads = config["num_attention_heads"]
    return Shape(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                 layers=config["num_hidden_layers"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads, vocab=config["vocab_size"],
                 tied=bool(config.get("tie_word_embeddings", False)), head_size=config.get("head_dim"),
                 positions=config.get("max_position_embeddings"))


def _read_shape(found: Path, source: str) -> Shape:
    """The shape in a config.json, or a ModelSourceError that says what is wrong with it (a traceback
    of KeyError or JSONDecodeError used to come out of a config.json of another model family)."""
    try:
        config = json.loads(found.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{found} (model.source={source!r}) is not valid JSON: {exc}.") from None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    missing = [k for k in SHAPE_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise ModelSourceError(
            f"{found} (model.source={source!r}) lacks {', '.join(missing)}: the plan knows decoder-only "
            f"models of the LLaMA family's config (LLaMA, Mistral, Qwen, SmolLM), not model_type="
            f"{config.get('model_type')!r}.")
    return shape_from_config(config)


def model_shape(source: str) -> Shape:
    """The shape of `model.source`: random:<shape>, embedded, a known hub id, or a local folder (or
    a hub id already in the Hugging Face cache) with config.json. Nothing is downloaded."""
    if source.startswith("random:"):
        name = source.split(":", 1)[1]
        if name not in RANDOM_SHAPES:
            raise ModelSourceError(f"Unknown random model shape {name!r}; valid: {', '.join(RANDOM_SHAPES)}.")
        return shape_from_config({"vocab_size": EMBEDDED_VOCAB, **RANDOM_SHAPES[name]})
    if source in KNOWN_SHAPES:
        return shape_from_config(KNOWN_SHAPES[source])
    path = Path(source).expanduser()
    found = path / "config.json" if path.is_dir() else _cached_config(source)
    if found is None or not found.is_file():
        raise ModelSourceError(
            f"No config.json for model.source={source!r}: the plan reads the model's shape without "
            f"downloading it. Pass a local folder holding config.json, download the model once, or use "
            f"one of: {', '.join(sorted(KNOWN_SHAPES))}, random:<{'|'.join(RANDOM_SHAPES)}>.")
    return _read_shape(found, source)


def _cached_config(repo_id: str) -> Path | None:
    """config.json of a hub model already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # HFValidationError: not a hub id at all (a path to a missing folder, say)
        return None
    return Path(found) if isinstance(found, str) else None


# --- the pieces ------------------------------------------------------------------------------------------


def quantized_bytes(weights: int, tensors: int, double_quant: bool) -> int:
    """Bytes of `weights` 4-bit weights in `tensors` layers: packed values (two per byte), one absmax per
    64 (float32, or 8-bit plus one float32 per 256 of them with double quantization) and per layer the
    code tables (16 values; 256 more for the nested code)."""
    blocks = math.ceil(weights / BLOCK)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + tensors * 4 * (16 + 256 + 1)
    else:
        scales = 4 * blocks + tensors * 4 * 16
    return weights // 2 + scales


def lora_targets(shape: Shape, targets: Any) -> list[str]:
    names = list(shape.linears())
    if targets == "all-linear":
        return names
    wanted = [targets] if isinstance(targets, str) else list(targets)
    return [n for n in names if n in wanted]


def lora_parameters(shape: Shape, r: int, targets: Any) -> int:
    linears = shape.linears()
    return shape.layers * sum(r * (linears[n][0] + linears[n][1]) for n in lora_targets(shape, targets))


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def compute_dtype(cfg: Config) -> str:
    """The compute dtype on a CUDA card: `auto` is bf16 (fp16 on cards without it, same size)."""
    return "bfloat16" if cfg.quant.compute_dtype == "auto" else cfg.quant.compute_dtype


def fast_path_runs(cfg: Config) -> bool:
    """On a CUDA card the fast path runs unless switched off (`auto` and `always` alike)."""
    return cfg.train.fast_path != "never" and cfg.train.distributed != "fsdp"


def weight_bytes(cfg: Config, shape: Shape, float_bytes: int) -> dict[str, int]:
    """The frozen base: 4-bit (or full-precision) linear layers and the floating-point rest."""
    tensors = shape.layers * len(shape.linears())
    dense = dtype_bytes(compute_dtype(cfg))
    linear = (quantized_bytes(shape.linear_weights(), tensors, cfg.quant.double_quant)
              if cfg.quant.load_in_4bit else shape.linear_weights() * dense)
    return {"base linear layers" + (" (4-bit)" if cfg.quant.load_in_4bit else ""): linear,
            "embeddings, lm_head, norms": shape.float_weights() * float_bytes}


def adapter_bytes(cfg: Config, shape: Shape) -> dict[str, int]:
    """LoRA weights in float32, their gradients, and the optimizer's two states (1 byte each in 8-bit)."""
    params = lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules)
    state = 2 if cfg.train.optimizer == "paged_adamw_8bit" else 8
    return {"LoRA adapters": 4 * params, "LoRA gradients": 4 * params, "optimizer states": state * params}


def _layer_bytes(cfg: Config, shape: Shape, tokens: int, fused: bool, hidden_bytes: int = 2) -> tuple[int, int]:
    """(bytes one decoder layer keeps for backward, bytes it keeps when recomputed: its input)."""
    return fastpath.activation_bytes(_as_config(shape), tokens, lora_targets(shape, cfg.lora.target_modules),
                                     fused, hidden_bytes, cfg.lora.dropout)


def _as_config(shape: Shape) -> SimpleNamespace:
    """The attributes of a transformers config that fastpath's planning reads."""
    return SimpleNamespace(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           num_hidden_layers=shape.layers, vocab_size=shape.vocab)


def loss_bytes(shape: Shape, tokens: int, fused: bool) -> int:
    """The logits and loss at their peak (fastpath.loss_bytes: what the fast path reserves for them)."""
    return fastpath.loss_bytes(_as_config(shape), tokens, fused)


def budget_bytes(cfg: Config, gpu_gib: float) -> int:
    """train.memory_budget_gib, or what fastpath.budget_bytes gives on an empty card of `gpu_gib`: a
    plan within it is one `fits` accepts."""
    if cfg.train.memory_budget_gib > 0:
        return int(cfg.train.memory_budget_gib * GIB)
    return card_budget(gpu_gib)


def card_budget(gpu_gib: float) -> int:
    """The tensors' peak an empty card of `gpu_gib` holds: less the CUDA context, over the allocator's reserve."""
    return int((gpu_gib - CUDA_CONTEXT_GIB) * GIB / RESERVED_FACTOR)


def activation_plan(cfg: Config, shape: Shape, in_use: int, gpu_gib: float,
                    recompute: int | None = None) -> dict[str, Any]:
    """Tokens per micro-batch, the layers recomputed (the fast path's own choice, unless `recompute`
    gives it: a measured run's), the bytes kept and the transient peak on top."""
    targets, fast = cfg.lora.target_modules, fast_path_runs(cfg)
    fused = fast and cfg.train.fused_kernels
    if fast:
        tokens = cfg.train.packed_tokens
        # the same call as training, with the factors of the kernels that run
        if recompute is None:
            recompute = fastpath.plan_recompute(_as_config(shape), tokens, budget_bytes(cfg, gpu_gib), in_use,
                                                lora_targets(shape, targets), fused,
                                                cfg.lora.dropout)["recompute_layers"]
        hidden_bytes = 2
    else:
        tokens = cfg.train.micro_batch_size * cfg.model.max_seq_length  # padded to the longest row
        recompute = shape.layers if cfg.train.gradient_checkpointing else 0
        # prepare_model_for_kbit_training upcasts the embeddings: the residual stream runs in float32
        hidden_bytes = 4 if cfg.quant.load_in_4bit else dtype_bytes(compute_dtype(cfg))
    full, kept = _layer_bytes(cfg, shape, tokens, fused, hidden_bytes)
    stored, transient = fastpath.activation_peak(shape.layers, recompute, full, kept, loss_bytes(shape, tokens, fused))
    return {"path": "fast" if fast else "plain", "fused": fused, "tokens": tokens, "recompute_layers": recompute,
            "layers": shape.layers, "stored": stored, "transient": transient}


def training_plan(cfg: Config, shape: Shape, gpu_gib: float, recompute: int | None = None) -> dict[str, Any]:
    """Peak GPU memory of one training process, by part, in bytes (`recompute`: see activation_plan)."""
    fast = fast_path_runs(cfg)
    upcast = cfg.quant.load_in_4bit and not fast  # peft's prepare_model_for_kbit_training
    float_bytes = 4 if upcast else dtype_bytes(compute_dtype(cfg))
    parts = {**weight_bytes(cfg, shape, float_bytes), **adapter_bytes(cfg, shape)}
    # what is allocated beside the activations: the base and the adapters' weights, gradients and states
    acts = activation_plan(cfg, shape, sum(parts.values()), gpu_gib, recompute)
    parts[f"activations ({acts['recompute_layers']} of {acts['layers']} layers recomputed)"] = acts["stored"]
    parts["logits / loss or a recomputed layer (transient)"] = acts["transient"]
    return {"parts": parts, "peak": sum(parts.values()), "activations": acts}


def serving_plan(cfg: Config, shape: Shape) -> dict[str, Any]:
    """Peak GPU memory of the server for the merged 16-bit form and the 4-bit base + adapter form:
    the weights, the static KV cache of serve.max_concurrent slots x the context, and a prefill of
    every slot at once (one layer's working set, the attention mask and the last logits)."""
    slots = cfg.serve.max_concurrent
    context = cfg.serve.context_length or cfg.model.max_seq_length
    dense = dtype_bytes(compute_dtype(cfg))
    kv = slots * context * shape.layers * 2 * shape.kv_heads * shape.head_dim * dense
    tokens = slots * context
    prefill = (tokens * (4 * shape.hidden + 3 * shape.intermediate) * dense + slots * context * context * (dense + 1)
               + slots * shape.vocab * 4)
    forms = {  # name: (label, weights); a base not in 4 bit is served in the compute dtype
        "merged": ("merged 16-bit weights",
                   (shape.linear_weights() + shape.float_weights()) * dtype_bytes(cfg.serve.export_dtype)),
        "adapter": (("4-bit" if cfg.quant.load_in_4bit else f"{8 * dense}-bit") + " base + adapter weights",
                    sum(weight_bytes(cfg, shape, dense).values())
                    + 4 * lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules)),
    }
    return {"slots": slots, "context": context, "kv_cache": kv, "prefill": prefill,
            "forms": {name: {"label": label, "weights": w, "peak": w + kv + prefill}
                      for name, (label, w) in forms.items()}}


def plan_notes(cfg: Config, shape: Shape, train: dict[str, Any]) -> list[str]:
    """What the figures leave out or assume, said rather than left silent."""
    notes = []
    if cfg.quant.compute_dtype == "auto":
        notes.append("quant.compute_dtype=auto is planned as bfloat16, as on a CUDA card. On a CPU this profile "
                     "trains in float32 on the plain path in system memory (RAM), which this plan does not predict.")
    budget = cfg.train.memory_budget_gib
    if train["activations"]["path"] == "fast" and 0 < budget < train["peak"] / GIB:
        notes.append(f"The peak is above train.memory_budget_gib={budget:g} even with every layer recomputed "
                     f"(training warns so): lower train.packed_tokens, or raise the budget.")
    if cfg.lora.use_dora:
        notes.append("lora.use_dora=true: DoRA's magnitude vectors and its extra activations are not planned "
                     "(the figures are plain LoRA's).")
    context = cfg.serve.context_length or cfg.model.max_seq_length
    if shape.positions and context > shape.positions:
        notes.append(f"Serving's context of {context} tokens is above the model's max_position_embeddings="
                     f"{shape.positions}: the server refuses it; lower serve.context_length.")
    if cfg.serve.form == "gguf":
        notes.append("serve.form=gguf: llama.cpp serves the GGUF on the CPU, not planned here; the serving "
                     "figures are the other two forms on a GPU.")
    elif cfg.serve.compile:
        notes.append("serve.compile=true: the compiled decode step's CUDA graphs come on top of the serving "
                     "peaks (measured eager).")
    return notes


def check_plannable(cfg: Config, shape: Shape) -> None:
    """What training would refuse is refused here too (the plan printed 0 GiB of adapters for targets that
    name no layer, and a fit for train.packed_tokens below model.max_seq_length)."""
    targets = cfg.lora.target_modules
    if not lora_targets(shape, targets):
        named = targets if isinstance(targets, str) else f"[{', '.join(targets)}]"
        raise ConfigError(f"lora.target_modules={named} names none of the model's linear layers "
                          f"({', '.join(shape.linears())}): peft would find no layer to adapt. Name some of them "
                          f"or use all-linear.", key="lora.target_modules")
    if fast_path_runs(cfg):
        check_packed_tokens(cfg)


def check_packed_tokens(cfg: Config) -> None:
    """The fast path's packing budget holds the longest example (training's rule, and the plan's)."""
    if cfg.train.packed_tokens < cfg.model.max_seq_length:
        raise ConfigError(f"train.packed_tokens={cfg.train.packed_tokens} is below model.max_seq_length="
                          f"{cfg.model.max_seq_length}: the fast path (train.fast_path={cfg.train.fast_path}) "
                          f"refuses it, the longest examples would not fit a micro-batch. Raise "
                          f"train.packed_tokens, or take the plain path with train.fast_path=never.",
                          key="train.packed_tokens")


def memory_plan(cfg: Config, gpu_gib: float) -> dict[str, Any]:
    shape = model_shape(cfg.model.source)
    check_plannable(cfg, shape)
    train = training_plan(cfg, shape, gpu_gib)
    return {"model": cfg.model.source, "shape": shape, "gpu_gib": gpu_gib, "distributed": cfg.train.distributed,
            "training": train, "serving": serving_plan(cfg, shape), "notes": plan_notes(cfg, shape, train)}


def card_gib(peak: int) -> float:
    """The card a peak of tensors needs: the allocator's reserve on top, and the CUDA context."""
    return peak / GIB * RESERVED_FACTOR + CUDA_CONTEXT_GIB


def fits(peak: int, gpu_gib: float) -> bool:
    return card_gib(peak) <= gpu_gib


def card_text(peak: int) -> str:
    """The card a peak needs, rounded up to 0.1 GiB: rounded to nearest, a 9.71 GiB need printed
    "needs a 9.7 GiB card: does NOT fit" for --gpu-gib 9.7."""
    return f"{math.ceil(round(card_gib(peak) * 10, 6)) / 10:.1f} GiB"


FUSED_NOTE = (", Liger kernels (a card below compute capability 8.0, a T4, runs without them: plan it with "
              "train.fused_kernels=false)")


def describe_plan(plan: dict[str, Any]) -> list[str]:
    """The plan as lines for the terminal."""
    gib = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    card = plan["gpu_gib"]
    train, acts = plan["training"], plan["training"]["activations"]

    def verdict(peak: int) -> str:
        return f"needs a {card_text(peak)} card: {'fits' if fits(peak, card) else 'does NOT fit'}"

    lines = [f"GPU memory plan for {plan['model']} on a {card:g} GiB CUDA card (peaks of PyTorch's allocator; a "
             f"card needs x{RESERVED_FACTOR} for its reserve + {CUDA_CONTEXT_GIB} GiB CUDA context)",
             f"Training ({acts['path']} path, {acts['tokens']} tokens per micro-batch"
             f"{FUSED_NOTE if acts['fused'] else ''}):"]
    if plan["distributed"] == "fsdp":
        lines.append("  (train.distributed=fsdp: FSDP shards the weights over the processes; this is one "
                     "process holding them whole, an upper bound)")
    lines += [f"  {name:<52}{gib(value)}" for name, value in train["parts"].items()]
    lines.append(f"  {'peak':<52}{gib(train['peak'])}  {verdict(train['peak'])}")
    serve = plan["serving"]
    lines.append(f"Serving ({serve['slots']} slots x {serve['context']} tokens of context):")
    lines.append(f"  {'KV cache':<52}{gib(serve['kv_cache'])}")
    lines.append(f"  {'prefill of every slot (transient)':<52}{gib(serve['prefill'])}")
    for form in serve["forms"].values():
        lines.append(f"  {form['label']:<52}{gib(form['weights'])}  peak {form['peak'] / GIB:.2f} GiB, "
                     f"{verdict(form['peak'])}")
    return lines + [f"Note: {note}" for note in plan.get("notes", [])]


# --- when it does not fit: what would ------------------------------------------------------------------


def _halved(key: str, value: int, least: int) -> list[list[str]]:
    """`key` halved step by step down to `least`."""
    out = []
    while value // 2 >= least:
        value //= 2
        out.append([f"{key}={value}"])
    return out


def _smaller_batches(micro: int, accumulation: int) -> list[list[str]]:
    """train.micro_batch_size through its divisors down to 1, gradient_accumulation_steps raised alike, so
    the batch per optimizer step stays the same (halving 3 to 1 and doubling 2 to 4 made 6 sequences 4)."""
    return [[f"train.micro_batch_size={d}", f"train.gradient_accumulation_steps={accumulation * micro // d}"]
            for d in range(micro - 1, 0, -1) if micro % d == 0]


def fitting_changes(profile: str, overrides: list[str], gpu_gib: float) -> tuple[list[str], dict] | None:
    """The fewest settings (tried cheapest first, each kept once taken) under which training fits the card,
    and the plan then; None when none of them is enough. Fast path: smaller packed micro-batches, then
    8-bit optimizer states. Plain path: gradient checkpointing, smaller micro-batches (more accumulation
    steps: the same batch per step), then 8-bit optimizer states."""
    from .config import load_config

    cfg = load_config(profile, overrides)
    shape, t = model_shape(cfg.model.source), cfg.train
    if fast_path_runs(cfg):
        # not below model.max_seq_length, which training refuses (the advice said packed_tokens=1024 at 4096)
        steps = _halved("train.packed_tokens", t.packed_tokens, max(1024, cfg.model.max_seq_length))
        if t.memory_budget_gib * GIB > card_budget(gpu_gib):  # a budget above the card: the card's own first
            steps.insert(0, ["train.memory_budget_gib=0"])
    else:
        steps = ([] if t.gradient_checkpointing else [["train.gradient_checkpointing=true"]]) + _smaller_batches(
            t.micro_batch_size, t.gradient_accumulation_steps)
    if t.optimizer != "paged_adamw_8bit":
        steps.append(["train.optimizer=paged_adamw_8bit"])
    taken: dict[str, str] = {}
    for step in steps:
        trial = {**taken, **dict(s.split("=", 1) for s in step)}
        plan = training_plan(load_config(profile, overrides + [f"{k}={v}" for k, v in trial.items()]), shape,
                             gpu_gib)
        taken = trial  # a later step keeps it (a key halved again replaces its value)
        if fits(plan["peak"], gpu_gib):
            return [f"{k}={v}" for k, v in taken.items()], plan
    return None


def describe_fix(cfg: Config, profile: str, overrides: list[str], gpu_gib: float) -> list[str]:
    """What to change when training of `cfg` (`profile` with `overrides`) does not fit `gpu_gib`, as
    lines for the terminal."""
    if cfg.train.distributed == "fsdp":
        return ["With train.distributed=fsdp each of --num-processes N processes holds about 1/N of the weights "
                "and optimizer states; the figures above are one process holding them all (an upper bound)."]
    found = fitting_changes(profile, overrides, gpu_gib)
    if found is None:
        return [f"No setting tried here fits training on {gpu_gib:g} GiB (smaller micro-batches, recomputation, "
                f"8-bit optimizer states): use a larger card, shard the model over several "
                f"(train.distributed=fsdp with --num-processes N), or a smaller model."]
    changes, plan = found
    sets = " ".join(f"--set {c}" for c in changes)
    return [f"To fit training on {gpu_gib:g} GiB: {sets} (peak {plan['peak'] / GIB:.2f} GiB, needs a "
            f"{card_text(plan['peak'])} card; {plan['activations']['recompute_layers']} of "
            f"{plan['activations']['layers']} layers recomputed)."]
