"""Response bodies in OpenAI's shapes: completion and chat choices, stream chunks, usage, logprobs.

Completions report logprobs as parallel lists (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`; with `echo` the prompt's tokens come first, the first one without a logprob, which
is what lm-evaluation-harness reads for loglikelihoods). Chat reports a list of
`{token, logprob, bytes, top_logprobs}` under `content`.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

from .batch import decoder_types
from .engine import Job

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_READERS: weakref.WeakKeyDictionary[Any, Callable[[int], bytes]] = weakref.WeakKeyDictionary()


def _byte_reader(tokenizer) -> Callable[[int], bytes]:
    """How to read a token's own bytes with this tokenizer: byte-level BPE (GPT-2, SmolLM2, LLaMA 3) maps
    each byte to a printable character; SentencePiece with byte fallback (LLaMA 2, Mistral) spells a
    byte `<0xF0>` and a space `▁`; anything else is decoded alone."""
    if tokenizer in _READERS:
        return _READERS[tokenizer]
    types = decoder_types(tokenizer)
    if "ByteLevel" in types:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}

        def read(token: int) -> bytes:
            piece = tokenizer.convert_ids_to_tokens(token)
            if all(c in to_byte for c in piece):
                return bytes(to_byte[c] for c in piece)
            return piece.encode("utf-8")  # an added token kept as written (<|im_end|> maps to itself anyway)
    elif "ByteFallback" in types:
        def read(token: int) -> bytes:
            piece = tokenizer.convert_ids_to_tokens(token)
            byte = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
    else:
        def read(token: int) -> bytes:
            return tokenizer.decode([token]).encode("utf-8")
    _READERS[tokenizer] = read
    return read


def token_bytes(tokenizer, token: int) -> bytes:
    """The token's own UTF-8 bytes, OpenAI's `bytes`: a token holding part of a character (an emoji is
    often three) has that part, so a client can join the bytes of consecutive tokens into the text, where
    decoding each token alone gives U+FFFD. A SentencePiece token keeps its leading space."""
    return _byte_reader(tokenizer)(token)


def token_text(tokenizer, token: int) -> str:
    return token_bytes(tokenizer, token).decode("utf-8", "replace")


def completion_logprobs(tokenizer, entries: list[dict | None], ids: list[int], offset: int) -> dict[str, Any]:
    """Completions' logprobs for tokens `ids` (entries[i] for ids[i]; None: no logprob, the first
    prompt token), text offsets counted from `offset` in characters: a token that starts inside a
    character (its bytes continue one) gets that character's offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    before = b""
    for token, entry in zip(ids, entries):
        raw = token_bytes(tokenizer, token)
        text = raw.decode("utf-8", "replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else entry["logprob"])
        out["top_logprobs"].append(None if entry is None else
                                   {token_text(tokenizer, t): lp for t, lp in entry["top"]} or
                                   {text: entry["logprob"]})
        out["text_offset"].append(offset + len(before.decode("utf-8", "ignore")))
        before += raw
    return out


def chat_logprobs(tokenizer, entries: list[dict]) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def usage(jobs: list[Job], copies: int = 1) -> dict[str, int]:
    """Token counts of a request whose jobs are `copies` (n) per prompt, prompt-major: each prompt
    counts once, as OpenAI counts it, every generated token counts."""
    prompt = sum(len(j.prompt_ids) for j in jobs[::copies])
    completion = sum(j.generated for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def envelope(rid: str, kind: str, model: str, choices: list[dict], **extra) -> dict[str, Any]:
    """A response or stream chunk; `extra` adds fields or overrides `created` (a stream's chunks share one)."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def completion_choice(tokenizer, index: int, job: Job, echo: bool, prompt_text: str, text: str,
                      finish: str | None) -> dict[str, Any]:
    """One completion choice: `text` (the prompt first with echo), logprobs when asked."""
    logprobs = None
    if job.sampling.logprobs is not None:
        ids, entries = list(job.tokens), list(job.logprobs)
        if job.ended_on_eos and len(entries) > len(ids):  # the EOS that ended the row: a logprob, no text
            ids.append(entries[-1]["token"])
        if echo:
            ids, entries = job.prompt_ids + ids, job.prompt_logprobs + entries
        logprobs = completion_logprobs(tokenizer, entries, ids, 0)
    return {"index": index, "text": (prompt_text if echo else "") + text, "logprobs": logprobs,
            "finish_reason": finish}


def chat_choice(tokenizer, index: int, job: Job, text: str) -> dict[str, Any]:
    logprobs = chat_logprobs(tokenizer, job.logprobs) if job.sampling.logprobs is not None else None
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": logprobs, "finish_reason": job.finish_reason}


def completion_chunk(tokenizer, index: int, job: Job, text: str, entries: list[dict], offset: int,
                     finish: str | None) -> dict[str, Any]:
    """A stream chunk's choice: new text and the logprobs of the tokens it came with."""
    logprobs = None
    if job.sampling.logprobs is not None and entries:
        logprobs = completion_logprobs(tokenizer, entries, [e["token"] for e in entries], offset)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_chunk(tokenizer, index: int, job: Job, text: str | None, entries: list[dict],
               finish: str | None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
        {"content": text} if text else {})
    logprobs = chat_logprobs(tokenizer, entries) if job.sampling.logprobs is not None and entries else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
