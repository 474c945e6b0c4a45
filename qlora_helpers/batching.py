"""Rows into batches: whole examples packed into rows of a token budget, packed rows collated with
their position ids, and how much of a batch is padding. Used by training (04, 04b) and the fast path;
the padded collator itself is `scoring.collate`. torch and transformers are imported where they are used (heavy)."""

from __future__ import annotations

import random
from typing import Any

from .errors import DataError

# --- packing ----------------------------------------------------------------------------------------


def pack_examples(examples: list[dict[str, list[int]]], budget: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pack whole examples into rows of at most `budget` tokens (first fit, longest first).

    Each row keeps `seq_lens`; position ids restart at 0 per example, and the first label of each
    example is -100 so no example is trained to follow the previous one.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > budget:
            raise DataError(f"An example of {n} tokens does not fit a packed row of {budget} tokens: raise the "
                            f"packing budget (train.packed_tokens, model.max_seq_length) or drop longer rows.")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(budget - n)
    random.Random(seed).shuffle(rows)
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            e = examples[i]
            row["input_ids"] += e["input_ids"]
            row["labels"] += [-100] + list(e["labels"][1:])
            row["position_ids"] += list(range(len(e["input_ids"])))
            row["seq_lens"].append(len(e["input_ids"]))
        packed.append(row)
    return packed


def collate_packed(rows: list[dict[str, list[int]]], pad_token_id: int, bool_mask: bool = True) -> dict[str, Any]:
    """Batch packed rows with a 4-D block-diagonal causal mask [batch, 1, q, k].

    Position ids alone do NOT keep packed examples apart under sdpa/eager attention in
    transformers (measured: docs/design.md, packing pitfall), so the mask does. sdpa takes the boolean form
    (True = may attend); eager needs the additive float form (0 / dtype min): `bool_mask=False`.
    Padding positions attend only to themselves, which keeps their (ignored) outputs finite.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    ids = torch.full((len(rows), width), pad_token_id)
    labels = torch.full((len(rows), width), -100)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        pos[b, :n] = torch.tensor(r["position_ids"])
        start = 0
        for length in r["seq_lens"]:
            end = start + length
            mask[b, 0, start:end, start:end] = causal[:length, :length]
            start = end
        idx = torch.arange(n, width)
        mask[b, 0, idx, idx] = True
    if not bool_mask:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def padding_efficiency(lengths: list[int], batch_size: int, seed: int = 0, by_length: bool = False) -> float:
    """Real tokens / tokens computed when examples are padded to the longest in each batch: shuffled, or
    in the order of transformers' `group_by_length` sampler (`train.group_by_length`) when `by_length`."""
    if by_length:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = [lengths[i] for i in get_length_grouped_indices(
            lengths, batch_size, generator=torch.Generator().manual_seed(seed))]
    else:
        order = list(lengths)
        random.Random(seed).shuffle(order)
    computed = sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size))
    return sum(lengths) / computed


def packed_efficiency(examples: list[dict[str, list[int]]], budget: int) -> dict[str, Any]:
    rows = pack_examples(examples, budget)
    real = sum(len(e["input_ids"]) for e in examples)
    return {"rows": len(rows), "efficiency": real / (len(rows) * budget)}


# --- the stage ----------------------------------------------------------------------------------


