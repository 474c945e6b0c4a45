"""The GPU training fast path: the default on CUDA (`train.fast_path: auto`).

The seed recipe feeds an H100 micro-batches of 4 padded Alpaca examples (~430 tokens): the card
idles. Each change here is measured in benchmarks/BENCHMARKS.md (benchmarks/train_throughput.py):

1. Token-budget micro-batches. Whole examples are packed into one unpadded row of up to
   `train.packed_tokens` tokens (first fit, longest first), position ids restarting per example.
2. Attention that never crosses examples: torch's varlen FlashAttention over the examples'
   boundaries (`cu_seq_lens`), registered with transformers' AttentionInterface. Position ids
   alone do not isolate packed examples under sdpa/eager/flex (docs/design.md, packing pitfall). The
   varlen kernels need compute capability 8.0+; on older cards (T4, RTX 20xx) SDPA with a 4-D
   block-diagonal mask does the same job with O(tokens^2) mask memory. Without boundaries
   (evaluation, generation) both fall back to transformers' own sdpa with the usual padding mask.
3. Fused kernels from Liger (RMSNorm, RoPE, SwiGLU, and linear + cross-entropy without the logits)
   when `liger-kernel` is installed (`requirements-gpu.txt`) and Triton supports the card, on the
   model being trained only (a model built later in the process is transformers' own).
4. No fp32 copies of the norms and the LM head (peft's k-bit preparation makes them; bf16 autocast
   does the matmuls in bf16 either way), so the loss head stays one bf16 weight.
5. Recomputation by memory budget: only as many decoder layers are checkpointed as the budget
   (`train.memory_budget_gib`, or what is free on the card) needs; the rest keep activations.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import math
import types
from typing import Any

from .errors import ConfigError

VARLEN = "qlora_varlen"
MASKED = "qlora_masked"
GIB = 2**30
VARLEN_MIN_CAPABILITY = (8, 0)  # torch's varlen FlashAttention kernels: Ampere and newer
TRITON_MIN_CAPABILITY = (8, 0)  # the NVIDIA cards Triton's README lists as supported (Liger is Triton)


def fast_path_active(train_cfg, device: str) -> bool:
    """auto: with a CUDA device; always: required (an error elsewhere); never: the plain path."""
    if train_cfg.fast_path == "never":
        return False
    cuda = str(device).startswith("cuda")
    if train_cfg.fast_path == "always" and not cuda:
        raise ConfigError("train.fast_path=always needs a CUDA GPU (its attention and fused kernels are GPU "
                          "kernels). Use train.fast_path=auto or never on this machine.")
    return cuda


def choose_fast_path(train_cfg, device) -> dict[str, Any]:
    """What of the fast path runs on this card: varlen attention at compute capability 8.0+ (else
    the block-diagonal mask), Liger where Triton supports the card. `always` on a card below 8.0, or
    `fast_attention: varlen` there, is a ConfigError naming what to set instead."""
    import torch

    cap = tuple(torch.cuda.get_device_capability(device))
    card = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    varlen_ok = cap >= VARLEN_MIN_CAPABILITY and varlen_available()
    if not varlen_ok and (train_cfg.fast_path == "always" or train_cfg.fast_attention == "varlen"):
        setting = "train.fast_path=always" if train_cfg.fast_path == "always" else "train.fast_attention=varlen"
        raise ConfigError(f"{setting} needs torch's varlen FlashAttention, which runs at compute capability "
                          f"8.0+ (A100, RTX 30xx and newer); this card is {card}. Use train.fast_path=auto "
                          f"(packing with a block-diagonal attention mask) or never.")
    attention = VARLEN if train_cfg.fast_attention == "varlen" or (train_cfg.fast_attention == "auto" and varlen_ok) \
        else MASKED
    liger = importlib.util.find_spec("liger_kernel") is not None
    fused = train_cfg.fused_kernels and liger and cap >= TRITON_MIN_CAPABILITY
    why_not_fused = ("off (train.fused_kernels=false)" if not train_cfg.fused_kernels else
                     "off (liger-kernel is not installed: requirements-gpu.txt)" if not liger else
                     "off (Triton supports compute capability 8.0+)" if not fused else "Liger")
    return {"card": card, "capability": cap, "attention": attention, "fused": fused,
            "fused_note": why_not_fused, "bf16": bool(torch.cuda.is_bf16_supported())}


def describe_choice(choice: dict[str, Any], dtype) -> str:
    """One line: what the fast path chose on this card, and why where it gave something up."""
    import torch

    attention = ("varlen FlashAttention" if choice["attention"] == VARLEN else
                 "SDPA with a block-diagonal mask" + ("" if choice["capability"] >= VARLEN_MIN_CAPABILITY else
                                                       " (varlen FlashAttention needs 8.0+)"))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16 with loss scaling" + (
        "" if choice["bf16"] else " (no bf16 on this card)")}.get(dtype, str(dtype).removeprefix("torch."))
    return (f"fast path on {choice['card']}: packed rows, {attention}, fused kernels {choice['fused_note']}, "
            f"{precision}")


def describe_fast_path(fast: dict[str, Any] | None, device: str) -> str:
    """What training used, for people: the fast path's choices, or why the plain path ran."""
    if fast is None:
        if not str(device).startswith("cuda"):
            return ("plain path (CPU): padded micro-batches and transformers' sdpa attention; the fast "
                    "path (packed rows, fused kernels) is for CUDA GPUs")
        return "plain path (train.fast_path=never): padded micro-batches and transformers' sdpa attention"
    attention = "varlen FlashAttention" if fast["attention"] == VARLEN else "SDPA with a block-diagonal mask"
    kernels = ", ".join(fast["fused_kernels"]) or "none"
    plan = fast["recompute"]
    return (f"fast path on {fast.get('card', 'CUDA')}: packed rows of {plan['tokens']} tokens, {attention}, "
            f"fused kernels: {kernels}; {plan['recompute_layers']} of {plan['layers']} layers recomputed "
            f"to fit {plan['budget_gib']:.1f} GiB")


# --- batches ---------------------------------------------------------------------------------------


def collate_flat(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Concatenate packed rows into one unpadded row [1, T] plus the examples' boundaries
    (cumulative lengths, as FlashAttention's varlen kernels and transformers' kwargs name them)."""
    import torch

    lens = [n for r in rows for n in r["seq_lens"]]
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    cat = lambda key: torch.tensor([[x for r in rows for x in r[key]]])  # noqa: E731
    return {"input_ids": cat("input_ids"), "labels": cat("labels"), "position_ids": cat("position_ids"),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens)}


# --- attention --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn and how this torch spells causal / GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "is_causal" in params, "enable_gqa" in params


def varlen_available() -> bool:
    return _torch_varlen() is not None


def _varlen_reference(q, k, v, cu, scale):
    """Per-example causal sdpa: the CPU stand-in for the kernel (tests, and no-varlen torch)."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                   enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1))
    return torch.cat(outs)


def _varlen_cuda(q, k, v, cu, max_len, scale):
    varlen_attn, has_is_causal, has_gqa = _torch_varlen()
    if k.shape[1] != q.shape[1] and not has_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kwargs: dict[str, Any] = {"scale": scale}
    if has_is_causal:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)  # causal, in the newer signature
    if has_gqa and k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: varlen over the examples' boundaries when the batch carries
    them (`cu_seq_lens_q`), transformers' sdpa otherwise. Shapes in: [b, heads, s, d]; out: [b, s, heads, d]."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, heads, s, d = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], d)  # noqa: E731
    q, k, v = flat(query), flat(key), flat(value)
    if query.is_cuda:
        dtype = value.dtype if value.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = _varlen_cuda(q.to(dtype), k.to(dtype), v.to(dtype), cu.to(query.device),
                           int(kwargs["max_length_q"]), scaling).to(query.dtype)
    else:
        out = _varlen_reference(q, k, v, cu.to(query.device), scaling)
    return out.reshape(b, s, heads, d), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """Masks for the varlen implementation: none for unpadded rows (the boundaries do the work),
    sdpa's own for padded batches (evaluation after training uses the same model)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def block_diagonal_mask(cu, length: int, device=None):
    """[1, 1, length, length] boolean mask (True = may attend): causal within each example of a
    packed row, nothing across examples. The form sdpa takes (docs/design.md, packing pitfall)."""
    import torch

    lens = (cu[1:] - cu[:-1]).to(device)
    example = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    same = example[:, None] == example[None, :]
    return (same & torch.ones(length, length, dtype=torch.bool, device=device).tril())[None, None]


def masked_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function for cards without the varlen kernels: SDPA with the
    block-diagonal mask when the batch carries boundaries, transformers' sdpa otherwise."""
    import torch.nn.functional as F

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    mask = block_diagonal_mask(cu, query.shape[2], query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_varlen_attention(model, name: str = VARLEN) -> None:
    """Register the packed-row attention `name` (VARLEN or MASKED) with transformers and switch
    `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    forward = {VARLEN: varlen_attention_forward, MASKED: masked_attention_forward}[name]
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, _varlen_mask)
    model.set_attn_implementation(name)


# --- fused kernels --------------------------------------------------------------------------------------


def apply_fused_kernels(model) -> list[str]:
    """Liger's RMSNorm, RoPE and SwiGLU on a LLaMA-family model, and its fused linear + cross-entropy
    for the training loss. Returns what was applied ([] when Liger or a GPU is missing)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss
    except ImportError:
        return []
    if model.config.model_type != "llama" or getattr(model.config, "hidden_act", "silu") not in ("silu", "swish"):
        return []
    from transformers.models.llama import modeling_llama

    # Liger replaces transformers' LLaMA classes and rope function module-wide as well as patching this
    # instance: every model built later in the process (an evaluation copy, a server's compiled step)
    # would get Triton kernels it never asked for. Keep its instance patches, undo the module-wide ones.
    module_wide = {name: getattr(modeling_llama, name) for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")}
    try:
        apply_liger_kernel_to_llama(rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    finally:
        for name, value in module_wide.items():
            setattr(modeling_llama, name, value)
    applied = ["rms_norm", "swiglu"]
    if scope_liger_rope(model, modeling_llama):
        applied.insert(1, "rope")
    plain_forward = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        # Training with labels: the loss straight from the last hidden states, chunk by chunk,
        # without ever materialising [tokens, vocab] logits. Anything else: the model's own forward.
        if not (self.training and labels is not None):
            return plain_forward(input_ids=input_ids, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        loss = LigerForCausalLMLoss(hidden_states=hidden, lm_head_weight=self.lm_head.weight, labels=labels,
                                    hidden_size=self.config.hidden_size, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    # keep the signature's **kwargs so Trainer passes num_items_in_batch (correct accumulation)
    model.forward = types.MethodType(forward, model)
    return applied + ["fused_linear_cross_entropy"]


def scope_liger_rope(model, modeling_llama) -> bool:
    """Liger's RoPE for this model's attention layers only: each gets a copy of LlamaAttention.forward
    (without its keyword-renaming decorator; the decoder layer passes the current names) whose globals
    name Liger's `apply_rotary_pos_emb`. False, and transformers' RoPE kept, when that forward does
    not look the function up as a global (a transformers release that moved it)."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    plain = inspect.unwrap(modeling_llama.LlamaAttention.forward)
    if "apply_rotary_pos_emb" not in plain.__code__.co_names:
        return False
    scoped = types.FunctionType(plain.__code__, {**plain.__globals__, "apply_rotary_pos_emb": liger_rotary_pos_emb},
                                plain.__name__, plain.__defaults__, plain.__closure__)
    scoped.__kwdefaults__ = plain.__kwdefaults__
    base = getattr(model, model.base_model_prefix, model)
    for layer in base.layers:
        layer.self_attn.forward = types.MethodType(scoped, layer.self_attn)
    return True


# --- recomputation by memory budget ------------------------------------------------------------------


# Bytes kept per token and decoder layer for the backward pass, in units of 2-byte activations, as
# multiples of the hidden size h and the MLP width m. Fused kernels (Liger RMSNorm/RoPE/SwiGLU), measured
# on an H100 (LLaMA-2-7B shape, LoRA on q_proj/v_proj, 16k-token rows): ~6 h + 2 m; one more h of margin.
# Unfused, eager RMSNorm keeps float32 copies of its input (+2 h) and eager SwiGLU keeps gate, up and
# silu(gate) (3 m): 9 h + 3 m, which the 12 GB-class run on an H200 gave (benchmarks/BENCHMARKS.md,
# "memory plan"). One more m when LoRA sits on down_proj (its input must then be kept). A checkpointed
# layer keeps its input.
ACT_HIDDEN_FACTOR = 7
ACT_MLP_FACTOR = 2
UNFUSED_HIDDEN_FACTOR = 9
UNFUSED_MLP_FACTOR = 3
# The loss without fused kernels, bytes per logit alive at its peak: the logits in the compute dtype (2),
# their float32 copy (`logits.float()` in transformers' loss, 4), log-softmax's float32 output kept for
# backward (4) and its float32 gradient (4). At 4,096 tokens and a 49,152 vocabulary: 2.6 GiB, which the
# budget must hold besides the activations (without it the 12 GB-class run on the H200 peaked 0.8 GiB
# above its 10.8 GiB budget; benchmarks/BENCHMARKS.md, "memory plan").
LOSS_BYTES_PER_LOGIT = 2 + 4 + 4 + 4
LOSS_RESERVE = GIB  # the least kept beside the model: optimizer step, workspace, Liger's loss chunks
# The caching allocator reserves more than it hands out (fragmentation): on the H200 the reserved peak was
# 8-18% above the allocated one in every setting measured (BENCHMARKS.md), so the tensors may use the
# card's memory divided by this (plan.py's verdict divides the same way).
RESERVED_FACTOR = 1.15
# LoRA dropout (lora.dropout > 0) gives every adapted layer its own dropped copy of its input (2 bytes a
# value), which lora_A keeps for its gradient, and dropout's mask (1 byte a value). Without dropout the
# adapters keep their inputs themselves, one copy per input they share (bitsandbytes' 4-bit matmul keeps
# none): q/k/v's is in the factors above (measured with LoRA on q,v and no dropout), down_proj's is the one
# more m. Measured on an H100 (qlora-paper: r=64 on every linear layer, dropout 0.1, 8,192 and 16,384 packed
# tokens): without this term the plan was 15-23% under the peaks (BENCHMARKS.md, "memory plan").
DROPOUT_BYTES = 2 + 1
LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_inputs(model_config, lora_targets: Any) -> list[int]:
    """The input width of each adapted linear layer of a decoder layer (LLaMA's names)."""
    names = LORA_LAYERS if lora_targets == "all-linear" else [n for n in LORA_LAYERS if n in lora_targets]
    return [model_config.intermediate_size if n == "down_proj" else model_config.hidden_size for n in names]


def activation_bytes(model_config, tokens: int, lora_targets: Any = (), fused: bool = True,
                     hidden_bytes: int = 2, lora_dropout: float = 0.0) -> tuple[int, int]:
    """(bytes a layer keeps without recomputation, bytes with) for `tokens` tokens, with or without the
    fused kernels; `hidden_bytes` is the residual stream's element size; `lora_dropout`: lora.dropout."""
    h, m = model_config.hidden_size, model_config.intermediate_size
    hidden, mlp = (ACT_HIDDEN_FACTOR, ACT_MLP_FACTOR) if fused else (UNFUSED_HIDDEN_FACTOR, UNFUSED_MLP_FACTOR)
    down = lora_targets == "all-linear" or "down_proj" in lora_targets
    lora = 0
    if lora_dropout > 0:  # the dropped copies and masks replace the shared inputs the adapters kept
        shared_qkv = lora_targets == "all-linear" or any(n in lora_targets for n in LORA_LAYERS[:3])
        lora = DROPOUT_BYTES * sum(lora_inputs(model_config, lora_targets)) - (2 * h if shared_qkv else 0)
    elif down:
        mlp += 1
    full = tokens * (hidden * h * hidden_bytes + mlp * m * 2 + lora)
    return full, tokens * h * hidden_bytes


def loss_bytes(model_config, tokens: int, fused: bool) -> int:
    """The logits and loss at their peak: Liger's chunks (and the input gradient it computes in the
    forward), or the whole logits with their float32 copy and gradient (LOSS_BYTES_PER_LOGIT)."""
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    if not fused:
        return tokens * vocab * LOSS_BYTES_PER_LOGIT
    chunk = 1 << max(0, math.ceil(math.log2(math.ceil(tokens / math.ceil(vocab / hidden)))))
    return chunk * vocab * 2 + 2 * tokens * hidden * 2


def activation_peak(layers: int, recompute: int, full: int, kept: int, on_top: int) -> tuple[int, int]:
    """(bytes the layers keep for backward, bytes on top at the peak) with `recompute` of `layers`
    recomputed. On top: `on_top` (the loss) at the forward's end; a recomputed layer's activations in
    the backward come after the stored layers freed theirs (backward meets them first), so they add to
    the peak only when every layer is recomputed."""
    stored = (layers - recompute) * full + recompute * kept
    return stored, on_top if recompute < layers else max(on_top, full)


def plan_recompute(model_config, tokens: int, budget_bytes: int, in_use_bytes: int,
                   lora_targets: Any = (), fused: bool = True, lora_dropout: float = 0.0) -> dict[str, Any]:
    """The fewest decoder layers to recompute so that activations fit the budget beside what is
    already allocated (the model) and a reserve for the loss (`loss_bytes`; at least LOSS_RESERVE, which
    also covers the optimizer step and cuBLAS' workspace), or, when every layer is recomputed, one
    layer's recomputed activations during backward; sized with the factors of the kernels that run
    (`fused`: Liger's; otherwise eager's) and the LoRA dropout's copies."""
    layers = model_config.num_hidden_layers
    full, kept = activation_bytes(model_config, tokens, lora_targets, fused, lora_dropout=lora_dropout)
    reserve = max(LOSS_RESERVE, loss_bytes(model_config, tokens, fused))

    def need(recompute: int) -> int:
        return sum(activation_peak(layers, recompute, full, kept, reserve))

    room = budget_bytes - in_use_bytes
    recompute = next((r for r in range(layers + 1) if need(r) <= room), layers)
    return {"recompute_layers": recompute, "layers": layers, "fits": need(recompute) <= room, "tokens": tokens,
            "budget_gib": budget_bytes / GIB, "in_use_gib": in_use_bytes / GIB,
            "activations_gib": (need(recompute) - reserve) / GIB}


def apply_recompute(model, recompute_layers: int) -> None:
    """Checkpoint the first `recompute_layers` decoder layers (non-reentrant); the rest keep theirs."""
    if recompute_layers <= 0:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < recompute_layers


def decoder_layers(model):
    inner = getattr(model, "model", model)
    return list(inner.layers)


def budget_bytes(train_cfg, device) -> int:
    """train.memory_budget_gib, or what the card has free plus what this process holds, over the
    allocator's reserve (RESERVED_FACTOR): the tensors' peak that the card can hold."""
    import torch

    if train_cfg.memory_budget_gib > 0:
        return int(train_cfg.memory_budget_gib * GIB)
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_allocated(device)) / RESERVED_FACTOR)


def prepare_fast_model(model, train_cfg, device, lora_targets: Any = (), adapter_bytes: int = 0,
                       lora_dropout: float = 0.0) -> dict[str, Any]:
    """Everything the fast path does to a loaded base before LoRA goes on: varlen attention, fused
    kernels, frozen base weights kept in their dtype, recomputation planned from the budget beside the
    base and `adapter_bytes` (the LoRA weights, gradients and optimizer states still to come), with
    the activations of `lora_targets` at `lora_dropout`."""
    import torch

    choice = choose_fast_path(train_cfg, device)
    for p in model.parameters():
        p.requires_grad_(False)
    use_varlen_attention(model, choice["attention"])
    kernels = apply_fused_kernels(model) if choice["fused"] else []
    print(describe_choice(choice, model.dtype))
    plan = plan_recompute(model.config, train_cfg.packed_tokens, budget_bytes(train_cfg, device),
                          torch.cuda.memory_allocated(device) + adapter_bytes, lora_targets, fused=bool(kernels),
                          lora_dropout=lora_dropout)
    apply_recompute(model, plan["recompute_layers"])
    if not plan["fits"]:
        print(f"train.packed_tokens={train_cfg.packed_tokens} may not fit the memory budget "
              f"({plan['budget_gib']:.1f} GiB) even recomputing every layer; lower train.packed_tokens.")
    return {"attention": choice["attention"], "card": choice["card"], "fused_kernels": kernels, "recompute": plan}
