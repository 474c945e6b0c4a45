"""Greedy, batched text generation shared by the quantize, evaluate and serve stages."""

from __future__ import annotations

from tqdm.auto import tqdm

from .data import format_alpaca
from .errors import ConfigError


def render_prompt(tokenizer, instruction: str, style: str = "alpaca") -> str:
    """An instruction as the model should see it: the Alpaca template or the tokenizer's chat template."""
    if style == "chat":
        if not tokenizer.chat_template:
            raise ConfigError("This tokenizer has no chat template, so data.template=chat cannot render "
                              "prompts; set data.template=alpaca or use a model whose tokenizer has one.")
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    return format_alpaca({"instruction": instruction, "output": ""})[0]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), without the prompt or special tokens."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", leave=False):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs
