"""Greedy, batched text generation shared by the quantize, evaluate and serve stages.

It takes token ids, never text: callers encode their prompts with `prompts.encode_prompt` (or
`encode_text`), the rule training used, so generation cannot tokenize a prompt another way."""

from __future__ import annotations

from tqdm.auto import tqdm


def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of the prompts' token ids (left-padded batches), without the prompt or
    special tokens."""
    import torch

    if prompt_ids and not isinstance(prompt_ids[0], list):
        raise TypeError("generate takes token ids (lists of int): encode prompts with prompts.encode_prompt.")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="generating", leave=False):
        rows = prompt_ids[start:start + batch_size]
        width = max(len(r) for r in rows)  # left padding: decoder-only models continue from the last real token
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs
