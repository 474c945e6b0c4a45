"""Greedy answers for evaluation, fast on a CPU: rows that finish leave the batch, and the 4-bit base
runs on its de-quantized weights where that computes the same numbers.

`generate_answers` is what stage 05's answer metrics use: every prompt's greedy continuation, and
whether it stopped on EOS before the token budget (the clean-stop metric needs that, which
`model.generate`'s text output loses). Decoding is plain greedy (argmax, no repetition penalty),
so the numbers show the model, not a decoding trick.

Why a loop of our own instead of `model.generate`: generate keeps every row in the batch until the
last one ends (a finished row still costs its share of each step), and it cannot say per row that it
stopped. The loop here is the dynamic path of serve/engine.py (a left-padded `DynamicCache` whose
rows are dropped with index_select) without its scheduler, threads and sampling; stage 05 cannot
import the serving package (a stage below it would depend on one above).

Why de-quantized weights: without gradients, bitsandbytes' ordinary CPU path (the one this project
keeps, see models.py) de-quantizes every 4-bit weight at every forward call and multiplies in the
compute dtype; doing the de-quantization once (`dense_base`) gives the same weights and the same
matmul, without repeating the de-quantization at every decode step. On CUDA, bitsandbytes' own
4-bit kernels compute differently (and memory is the point there), so the swap is CPU only.

Imports: torch and transformers are imported inside the functions (heavy; the unit tests of the
module's pure parts need neither).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    text: str        # the continuation, without the prompt and special tokens
    tokens: int      # tokens generated, the EOS not counted
    stopped: bool    # True: it ended with EOS within the budget; False: it ran to max_new_tokens


@contextlib.contextmanager
def dense_base(model) -> Iterator[int]:
    """Within the block, every bitsandbytes 4-bit layer of `model` on the CPU is replaced by an ordinary
    Linear holding its de-quantized weights in the layer's compute dtype (peft's LoRA layers keep their
    adapters around it); afterwards the 4-bit layers are put back. Yields how many were replaced.

    Only where it computes the same: on the CPU, with the 4-bit layers on bitsandbytes' de-quantize +
    matmul path (not the bf16 repacked kernel, models.keep_4bit_on_autograd_path)."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:  # no 4-bit layers can exist
        yield 0
        return
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit) or child.weight.device.type != "cpu":
                continue
            state = child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                continue  # the bf16 kernel computes other numbers: leave it as it is
            dtype = child.compute_dtype or torch.float32
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    dtype=dtype, device="cpu")
            with torch.no_grad():
                dense.weight.copy_(bnb.functional.dequantize_4bit(child.weight.data, state).to(dtype))
                if child.bias is not None:
                    dense.bias.copy_(child.bias.to(dtype))
            dense.requires_grad_(False)
            setattr(parent, name, dense)
            swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _decode_batch(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Answer]:
    """Greedy answers for one batch: a left-padded prefill, then one step per token for the rows
    still running; a row that ends (EOS or budget) leaves the cache before the next step."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, kwarg = DynamicCache(config=model.config), _cache_kwarg(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{kwarg: cache}).logits[:, -1]
    rows = list(range(len(prompt_ids)))  # which prompt each batch row answers
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    stopped = [False] * len(prompt_ids)
    eos = tokenizer.eos_token_id
    while True:
        chosen = logits.float().argmax(-1).tolist()
        keep = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            if token == eos:
                stopped[row] = True
                continue
            tokens[row].append(token)
            if len(tokens[row]) < max_new_tokens:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            mask = mask[index]
            unused = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns now all padding
            mask = mask[:, unused:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[index, :, unused:], layer.values[index, :, unused:]
            rows = [rows[i] for i in keep]
        step = torch.tensor([[tokens[r][-1]] for r in rows], device=device)
        positions = mask.sum(-1, keepdim=True)
        mask = torch.nn.functional.pad(mask, (0, 1), value=1)
        logits = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{kwarg: cache}).logits[:, -1]
    return [Answer(tokenizer.decode(t, skip_special_tokens=True), len(t), s) for t, s in zip(tokens, stopped)]


def generate_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                     dense: bool = True) -> list[Answer]:
    """Greedy answers to the prompts' token ids (encoded with prompts.encode_prompt, as for
    generation.generate), in their order. Prompts are batched by length (less padding); finished rows
    leave their batch; `dense` runs a CPU 4-bit base on its de-quantized weights (`dense_base`: the
    same numbers, fewer CPU seconds)."""
    import torch

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"generate_answers needs max_new_tokens >= 1 and batch_size >= 1 "
                         f"(got {max_new_tokens} and {batch_size}).")
    if prompt_ids and not isinstance(prompt_ids[0], list):
        raise TypeError("generate_answers takes token ids (lists of int): encode prompts with prompts.encode_prompt.")
    encoded = prompt_ids
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    answers: list[Answer | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    swap = dense_base(model) if dense else contextlib.nullcontext(0)
    try:
        with swap, torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                for i, answer in zip(chunk, _decode_batch(model, tokenizer, [encoded[i] for i in chunk],
                                                          max_new_tokens)):
                    answers[i] = answer
    finally:
        model.train(was_training)
    return answers
