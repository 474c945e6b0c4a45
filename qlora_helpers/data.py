"""Stage 03: training and evaluation data (sources, prompt formats, splits, tokenization).

Data lives outside the repo: a data directory (`data.data_dir`, or $QLORA_DATA_DIR) holds offline
copies, so the same config works on an offline machine and, with a hub id, online.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from .config import DataConfig
from .errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def resolve_data_dir(data_cfg: DataConfig) -> Path:
    configured = data_cfg.data_dir or os.environ.get("QLORA_DATA_DIR")
    if not configured:
        raise DataError("No data directory: set data.data_dir in the config or QLORA_DATA_DIR in "
                        "the environment to the folder holding alpaca/alpaca_5000.json "
                        "(make run/test point it at ../shared/data when that exists).")
    path = Path(configured).expanduser()
    if not path.is_dir():
        raise DataError(f"Data directory {path} does not exist (from "
                        f"{'data.data_dir' if data_cfg.data_dir else 'QLORA_DATA_DIR'}).")
    return path


def resolve_data_file(data_cfg: DataConfig, name: str | None = None) -> Path:
    name = name or data_cfg.dataset
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = resolve_data_dir(data_cfg) / name
    if not path.is_file():
        raise DataError(f"Dataset file {path} does not exist. Check data.dataset and the data directory.")
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array or JSONL file, with the file and position named on a parse error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}). "
                        f"Re-save it as UTF-8.") from None
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}, column "
                                f"{exc.colno}). Fix or delete that line.") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} "
                        f"({exc.msg}). Is the file truncated?") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON array of records, not a {type(rows).__name__}.")
    return rows


def format_alpaca(record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) in the Stanford Alpaca template, with or without the input section."""
    fill = {"instruction": record["instruction"], "input": record.get("input") or ""}
    template = ALPACA_PROMPT_WITH_INPUT if fill["input"].strip() else ALPACA_PROMPT
    return template.format(**fill), record["output"]


def split_indices(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic train/eval split of n rows: the same seed always gives the same split."""
    if not 0 < eval_size < n:
        raise DataError(f"data.eval_size={eval_size} must be between 1 and {n - 1} for {n} rows.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[eval_size:]), sorted(order[:eval_size])


def heldout_examples(data_cfg: DataConfig, n: int) -> list[tuple[str, str]]:
    """The first n (prompt, response) pairs of the held-out split of the configured dataset."""
    rows = read_records(resolve_data_file(data_cfg))
    _, eval_idx = split_indices(len(rows), data_cfg.eval_size, data_cfg.seed)
    return [format_alpaca(rows[i]) for i in eval_idx[:n]]


def tokenize_pair(tokenizer, prompt: str, response: str, train_on_prompt: bool = False) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels are -100 on the prompt unless train_on_prompt."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = (prompt_ids if train_on_prompt else [-100] * len(prompt_ids)) + response_ids
    return {"input_ids": prompt_ids + response_ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding is marked by attention_mask = 0 and labels = -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}
