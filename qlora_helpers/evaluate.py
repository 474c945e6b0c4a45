"""Stage 05: how good is the model? Held-out loss and perplexity (also used by stage 02)."""

from __future__ import annotations

import math
from typing import Any

from tqdm.auto import tqdm

from .data import collate, tokenize_pair


def heldout_loss(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int,
                 max_length: int, desc: str = "held-out loss") -> dict[str, Any]:
    """Token-weighted mean negative log-likelihood of the responses given their prompts.

    Examples longer than `max_length` are skipped and counted, never cut silently.
    """
    import torch

    examples = [tokenize_pair(tokenizer, p, r) for p, r in pairs]
    kept = [e for e in examples if len(e["input_ids"]) <= max_length]
    if not kept:
        raise ValueError(f"All {len(examples)} examples are longer than max_length={max_length}.")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()  # no dropout while measuring
    with torch.no_grad():
        for start in tqdm(range(0, len(kept), batch_size), desc=desc, leave=False):
            batch = collate(kept[start:start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((labels != -100).sum())
    model.train(was_training)
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "examples": len(kept),
            "skipped_too_long": len(examples) - len(kept), "tokens": total_tokens}
