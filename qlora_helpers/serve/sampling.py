"""Per-row sampling: each row of a decode step has its own settings (temperature, top_p, top_k, seed,
penalties, min_tokens), so requests with different settings share one forward pass.

Penalties follow the APIs clients know: `repetition_penalty` as transformers/vLLM (divide positive,
multiply negative logits of every token already seen, prompt included); `presence_penalty` and
`frequency_penalty` as OpenAI (subtract from the logits of tokens generated so far). Log-probabilities
reported to clients are the model's own (log-softmax of the raw logits), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS is not chosen before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit)
    logprobs: int | None = None  # report the chosen token's logprob and this many alternatives
    prompt_logprobs: bool = False  # report the prompt tokens' logprobs too (completions' echo)

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator for this row alone when a seed is given (reproducible whatever shares the batch)."""
        if self.seed is None or self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def penalize(scores: torch.Tensor, params: SamplingParams, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """`scores` [1, vocab] with the row's penalties and logit bias applied (a new tensor when any applies)."""
    if params.logit_bias:
        scores = scores.clone()
        for token, bias in params.logit_bias:
            scores[0, token] += bias
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([prompt_ids + tokens], device=scores.device)
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen, scores)
    if tokens and (params.presence_penalty or params.frequency_penalty):
        counts = collections.Counter(tokens)
        ids = torch.tensor(list(counts), device=scores.device)
        n = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.clone()
        scores[0, ids] -= params.frequency_penalty * n + params.presence_penalty
    return scores


def choose_token(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], tokens: list[int],
                 eos: int | None, generator: torch.Generator | None) -> int:
    """The next token of one row from its logits [vocab] (float32)."""
    scores = penalize(logits[None], params, prompt_ids, tokens)
    if eos is not None and len(tokens) < params.min_tokens:
        scores = scores.clone()
        scores[0, eos] = float("-inf")
    if params.temperature == 0:
        return int(scores[0].argmax())
    # softmax(scores / t) with the top score moved to 0 first, t no smaller than the dtype's smallest
    # normal number: a tiny temperature (1e-38, or 1e-300, which is 0 in float32) or repetition penalty
    # (1e-39) made inf or 0/0 of the scores, and multinomial's RuntimeError on the NaN failed every row of
    # the decode step. Shifted, the top scores stay 0 and the rest go to -inf: the limit of a tiny t.
    info = torch.finfo(scores.dtype)
    scores = scores.nan_to_num(nan=-float("inf"), posinf=info.max)
    scores = (scores - scores.max()) / max(params.temperature, info.tiny)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores[0], dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_entry(logprobs: torch.Tensor, token: int, top: int) -> dict:
    """{'token': id, 'logprob': float, 'top': [(id, logprob), ...]} from one position's log-softmax."""
    entry = {"token": token, "logprob": float(logprobs[token]), "top": []}
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        entry["top"] = list(zip(ids.tolist(), values.tolist()))
    return entry
