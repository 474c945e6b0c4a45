"""Preference pairs for stage 04b: read, detect the layout, validate, render, report; or build them.

A pair is one prompt with two answers, the one people preferred (`chosen`) and the other (`rejected`).
Hub datasets store them in three layouts, detected from the columns like stage 03's formats:

- `prompt_chosen_rejected`: three strings (UltraFeedback-binarized style, TRL's "standard" format);
- `chosen_rejected_messages`: `chosen` and `rejected` are message lists ({role, content}) that share
  every turn but the last (or a `prompt` message list and one-message answers: TRL's conversational
  format);
- `chosen_rejected_transcripts`: `chosen` and `rejected` are whole transcripts
  ("\\n\\nHuman: ...\\n\\nAssistant: ...", Anthropic/hh-rlhf) with a shared prefix up to the last
  "Assistant:" turn.

Every row becomes (prompt rendered with the run's template, as stage 03 renders its prompts; chosen;
rejected) or is dropped with a reason counted in the report (missing chosen, chosen identical to
rejected, empty prompt, ...), with a few examples per reason naming the source and row.

With no hub and no offline copy of a hub source, `build_own_pairs` makes pairs from the run's own
data instead: chosen = the reference answer of a 03 example, rejected = the SFT model's own greedy
answer where it differs (the report says so, and how many answers ran into the length cap).

Imports: torch (through decoding) is only touched when own pairs are generated.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .config import DataConfig, PreferenceConfig, PreferenceSourceConfig
from .decoding import generate_answers
from .errors import DataError
from .formats import (
    EXAMPLES_PER_REASON,
    RowProblem,
    check_mapped_columns,
    drops_by_source,
    map_columns,
    require_rows,
)
from .prompts import BadConversation, encode_text, render_conversation
from .sources import DataUnavailable, draw_rows, load_table, looks_like_file

LAYOUTS = {  # columns that identify each layout (after column mapping); the value types decide between them
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "chosen_rejected_messages": ("chosen", "rejected"),
    "chosen_rejected_transcripts": ("chosen", "rejected"),
}
# hh-rlhf's turn markers: "\n\nHuman: " and "\n\nAssistant: " (the first may lack its newlines)
TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
OWN_DATA = "own data"


# --- layouts and validation -------------------------------------------------------------------------


def detect_layout(rows: list[dict[str, Any]], src: PreferenceSourceConfig, where: str) -> str:
    """The source's layout: as configured, or told from the columns and the type of `chosen`."""
    if src.format != "auto":
        return src.format
    sample = [r for r in rows[:100] if isinstance(r, dict)]
    seen = set().union(*(r.keys() for r in sample)) if sample else set()
    if {"chosen", "rejected"} <= seen:
        first = next((r["chosen"] for r in sample if r.get("chosen") is not None), None)
        if isinstance(first, list):
            return "chosen_rejected_messages"
        if "prompt" in seen:
            return "prompt_chosen_rejected"
        if isinstance(first, str) and TURN.search(first):
            return "chosen_rejected_transcripts"
    expected = "; ".join(f"{n}: {', '.join(c)}" for n, c in LAYOUTS.items())
    raise DataError(
        f"{where}: cannot tell the preference layout from the columns {sorted(seen) or '(none)'}. Expected "
        f"one of {expected} (chosen/rejected as strings with a prompt column, as message lists, or as "
        f"'Human:/Assistant:' transcripts). Map yours with preference.sources[].columns (e.g. {{chosen: "
        f"preferred, rejected: dispreferred}}) or set preference.sources[].format.")


def _text(row: dict[str, Any], name: str) -> str:
    if name not in row or row[name] is None:
        raise RowProblem(f"missing_{name}", f"no '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem("not_a_string", f"'{name}' is {type(value).__name__}, not text")
    if not value.strip():
        raise RowProblem(f"empty_{name}", f"'{name}' is empty")
    return value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if value is None:
        raise RowProblem(f"missing_{name}", f"no '{name}'")
    if not isinstance(value, list) or not value:
        raise RowProblem("bad_messages", f"'{name}' is not a non-empty list of messages")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise RowProblem("bad_messages", f"{name}[{i}] is not a message with role system, user or assistant")
        content = turn.get("content")
        if not isinstance(content, str):
            raise RowProblem("bad_messages", f"{name}[{i}].content is not text")
        out.append({"role": turn["role"], "content": content})
    return out


def _answer(messages: list[dict[str, str]], name: str) -> str:
    if messages[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", f"the last turn of '{name}' is not the assistant's")
    if not messages[-1]["content"].strip():
        raise RowProblem(f"empty_{name}", f"the answer in '{name}' is empty")
    return messages[-1]["content"]


def parse_transcript(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    marks = list(TURN.finditer(text))
    if not marks:
        raise RowProblem("bad_transcript", "no 'Human:' or 'Assistant:' turn in the transcript")
    turns = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        content = text[m.end():nxt.start() if nxt else len(text)]
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content.strip()})
    return turns


def normalize_pair(row: Any, layout: str) -> dict[str, Any]:
    """One row as {'messages': the prompt's turns, 'chosen': str, 'rejected': str}, or RowProblem."""
    if isinstance(row, RowProblem):  # found while reading the file (`sources.read_records`)
        raise row
    if not isinstance(row, dict):
        raise RowProblem("not_a_record", f"row is {type(row).__name__}, not an object")
    if layout == "prompt_chosen_rejected":
        prompt = _text(row, "prompt")
        pair = {"messages": [{"role": "user", "content": prompt}],
                "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}
    elif layout == "chosen_rejected_messages":
        chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        explicit = row.get("prompt")
        prompt = _messages(explicit, "prompt") if explicit is not None else chosen[:-1]
        if explicit is None and rejected[:-1] != prompt:
            raise RowProblem("prompts_differ", "chosen and rejected do not share every turn before the answer")
        pair = {"messages": prompt, "chosen": _answer(chosen, "chosen"), "rejected": _answer(rejected, "rejected")}
    else:
        chosen, rejected = parse_transcript(_text(row, "chosen")), parse_transcript(_text(row, "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise RowProblem("prompts_differ", "the transcripts differ before their last Assistant turn")
        pair = {"messages": chosen[:-1], "chosen": _answer(chosen, "chosen"),
                "rejected": _answer(rejected, "rejected")}
    if not any(m["role"] == "user" and m["content"].strip() for m in pair["messages"]):
        raise RowProblem("empty_prompt", "no user turn with text before the answers")
    if pair["chosen"].strip() == pair["rejected"].strip():
        raise RowProblem("identical", "chosen and rejected are the same text")
    return pair


# --- reading sources ---------------------------------------------------------------------------------


def source_name(src: PreferenceSourceConfig) -> str:
    if src.name:
        return src.name
    return Path(src.path).stem if looks_like_file(src.path) else src.path


class _Report:
    """Rows read, kept and dropped by reason per source, with a few dropped examples per reason."""

    def __init__(self):
        self.sources: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.first: dict[str, dict[str, str]] = defaultdict(dict)  # source -> reason -> its first row, for errors

    def open(self, name: str, origin: str, layout: str, rows: int, **extra: Any) -> None:
        if name in self.sources:
            raise DataError(f"Two preference sources are both called {name!r}; give one a preference.sources[].name.")
        self.sources[name] = {"origin": origin, "format": layout, "rows": rows, "kept": 0, "dropped": Counter(),
                              **extra}

    def drop(self, name: str, reason: str, row_no: int, detail: str) -> None:
        self.sources[name]["dropped"][reason] += 1
        self.first[name].setdefault(reason, f"row {row_no}: {detail[:120]}")
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append({"source": name, "row": row_no, "detail": detail[:300]})

    def to_dict(self) -> dict[str, Any]:
        sources = {n: {**s, "dropped": dict(s["dropped"])} for n, s in self.sources.items()}
        dropped = sum((Counter(s["dropped"]) for s in sources.values()), Counter())
        return {"sources": sources, "kept": sum(s["kept"] for s in sources.values()), "dropped": dict(dropped),
                "dropped_examples": dict(self.examples)}


def pair_tokens(tokenizer, prompt: str, answer: str, template: str) -> int:
    """Tokens of prompt + answer + EOS, counted as 03 and the scorer tokenize them."""
    special = template != "chat"
    return (len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
            + len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1)


def read_source(src: PreferenceSourceConfig, pref: PreferenceConfig, data_cfg: DataConfig, tokenizer,
                report: _Report) -> list[dict[str, Any]]:
    """The valid pairs of one source, rendered with data.template; the rest counted in `report`."""
    name = source_name(src)
    rows, origin = load_table(src.path, data_cfg, src.split, keep_bad_rows=True)
    require_rows(rows, origin, "preference.sources")
    check_mapped_columns(rows, src.columns, origin, "preference.sources[].columns")
    rows, record = draw_rows(rows, src.sample, pref.seed)
    drawn = {"sample": record} if record else {}
    # row numbers are the file's (1-based), sampled or not
    numbers = [i + 1 for i in record["indices"]] if record else range(1, len(rows) + 1)
    rows = [map_columns(r, src.columns) if isinstance(r, dict) else r for r in rows]
    layout = detect_layout(rows, src, origin)
    report.open(name, origin, layout, len(rows), **drawn)
    pairs, seen = [], set()
    for row_no, row in zip(numbers, rows):
        try:
            pair = normalize_pair(row, layout)
            prompt = render_conversation(pair["messages"], data_cfg.template, tokenizer)
        except RowProblem as problem:
            report.drop(name, problem.reason, row_no, problem.detail)
            continue
        except BadConversation as exc:
            report.drop(name, "bad_messages", row_no, str(exc))
            continue
        key = (prompt, pair["chosen"], pair["rejected"])
        if key in seen:
            report.drop(name, "duplicate", row_no, prompt[:120])
            continue
        seen.add(key)
        longest = max(pair_tokens(tokenizer, prompt, pair[k], data_cfg.template) for k in ("chosen", "rejected"))
        if longest > pref.max_length:
            report.drop(name, "too_long", row_no, f"{longest} tokens > preference.max_length={pref.max_length}")
            continue
        report.sources[name]["kept"] += 1
        pairs.append({"source": name, "row": row_no, "prompt": prompt, "chosen": pair["chosen"],
                      "rejected": pair["rejected"]})
    return pairs


def load_preference_sources(pref: PreferenceConfig, data_cfg: DataConfig, tokenizer) -> tuple[list, dict] | None:
    """(pairs, report) from preference.sources; None when every source is a hub dataset that can be read
    from nowhere and preference.fallback allows own-data pairs instead (the reasons are in the
    returned report then: see `prepare_pairs`). A missing file is always an error."""
    report, pairs, unreachable = _Report(), [], []
    for src in pref.sources:
        try:
            pairs += read_source(src, pref, data_cfg, tokenizer, report)
        except DataUnavailable as exc:
            if looks_like_file(src.path) or not pref.fallback:
                raise
            unreachable.append(f"{src.path}: {exc}")
    if unreachable and not pairs:
        return None
    if unreachable:
        raise DataUnavailable(f"Some preference sources cannot be read ({'; '.join(unreachable)}) while others "
                              f"can; remove them from preference.sources or make them reachable.")
    if not pairs:
        raise DataError(f"No usable preference pairs: every row was dropped. "
                        f"{drops_by_source(report.sources, report.first)}. Fix those rows, or map the file's "
                        f"columns with preference.sources[].columns.")
    return pairs, report.to_dict()


def split_pairs(pairs: list[dict[str, Any]], pref: PreferenceConfig) -> tuple[list, list]:
    """(train, held out): eval_pairs drawn by seed first, then up to train_pairs of the rest."""
    if len(pairs) < 2:
        raise DataError(f"Only {len(pairs)} usable preference pair(s): at least one to train and one to hold out.")
    order = list(range(len(pairs)))
    random.Random(pref.seed).shuffle(order)
    n_eval = min(pref.eval_pairs, len(pairs) // 2)
    held = [pairs[i] for i in sorted(order[:n_eval])]
    train = [pairs[i] for i in sorted(order[n_eval:n_eval + pref.train_pairs])]
    return train, held


# --- pairs from the run's own data -------------------------------------------------------------------


def _answer_fits(example: dict[str, Any], limit: int) -> bool:
    return len(example["input_ids"]) - example["prompt_len"] <= limit  # response tokens with EOS


def own_candidates(examples: list[dict[str, Any]], n: int, limit: int, seed: int) -> list[dict[str, Any]]:
    """Up to n examples of a 03 split whose reference answer fits `limit` tokens, drawn by seed."""
    fitting = [e for e in examples if _answer_fits(e, limit)]
    return sorted(random.Random(seed).sample(fitting, min(n, len(fitting))), key=lambda e: e["row"])


def build_own_pairs(model, tokenizer, examples: list[dict[str, Any]], pref: PreferenceConfig, batch_size: int,
                    report: _Report, name: str, template: str) -> list[dict[str, Any]]:
    """chosen = the reference answer, rejected = the model's greedy answer (preference.answer_tokens at
    most) where it differs; examples whose greedy answer equals the reference are dropped ('identical').
    The answers come from 05's decoder (decoding.generate_answers: eval mode, so no LoRA dropout; finished
    rows leave their batch; de-quantized weights on a CPU), about half the CPU time of `model.generate`."""
    ids = [encode_text(template, tokenizer, e["prompt"]) for e in examples]  # the prompts as 03 encoded them
    generated = generate_answers(model, tokenizer, ids, pref.answer_tokens, batch_size)
    answers = [a.text for a in generated]
    capped = sum(not a.stopped for a in generated)
    report.open(name, "the run's own data (03's split) + the SFT model's greedy answers", "own_data",
                len(examples), rejected_is="the SFT model's greedy answer", answers_at_length_cap=capped)
    pairs = []
    for e, answer in zip(examples, answers):
        if not answer.strip():
            report.drop(name, "empty_rejected", e["row"], "the model's greedy answer is empty")
        elif answer.strip() == e["response"].strip():
            report.drop(name, "identical", e["row"], "the SFT model already answers as the reference")
        else:
            report.sources[name]["kept"] += 1
            pairs.append({"source": name, "row": e["row"], "prompt": e["prompt"], "chosen": e["response"],
                          "rejected": answer})
    return pairs


def prepare_pairs(model, tokenizer, pref: PreferenceConfig, data_cfg: DataConfig, prepared,
                  batch_size: int) -> dict[str, Any]:
    """{'train', 'eval', 'report'}: from preference.sources, or (none configured, or none reachable)
    from the run's own data: train pairs from 03's train split, held-out pairs from its eval split."""
    loaded = load_preference_sources(pref, data_cfg, tokenizer) if pref.sources else None
    if loaded is not None:
        pairs, report = loaded
        train, held = split_pairs(pairs, pref)
        return {"train": train, "eval": held, "report": {**report, "origin": "preference.sources"}}
    why = ("no preference.sources configured" if not pref.sources
           else "no preference source is reachable (no hub, no offline copy)")
    print(f"Preference pairs from the run's own data: {why}.")
    report = _Report()
    train = build_own_pairs(model, tokenizer, own_candidates(prepared.train, pref.train_pairs, pref.answer_tokens,
                                                             pref.seed), pref, batch_size, report, f"{OWN_DATA}: train",
                            data_cfg.template)
    held = build_own_pairs(model, tokenizer, own_candidates(prepared.eval, pref.eval_pairs, pref.answer_tokens,
                                                            pref.seed), pref, batch_size, report, f"{OWN_DATA}: eval",
                           data_cfg.template)
    if not train or not held:
        raise DataError(f"Could not build preference pairs from the run's own data ({len(train)} train, {len(held)} "
                        f"held out): no 03 example has a reference answer of at most preference.answer_tokens="
                        f"{pref.answer_tokens} tokens that the SFT model answers differently. Raise "
                        f"preference.answer_tokens or name a preference dataset in preference.sources.")
    return {"train": train, "eval": held, "report": {**report.to_dict(), "origin": OWN_DATA, "why": why}}
