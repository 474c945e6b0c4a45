"""The row formats a source may have (Alpaca, chat messages, ShareGPT, prompt/completion): column
mapping, detection and validation of one row. Shared by stage 03 and 04b's preference pairs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .config import SourceConfig
from .errors import DataError

# Columns that identify each format (after column mapping).
FORMATS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
EXAMPLES_PER_REASON = 3


# --- formats and validation ------------------------------------------------------------------------


class RowProblem(Exception):
    """Why one row cannot be used: `reason` is a short key counted in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    mapped = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            mapped[ours] = row[theirs]
    return mapped


def require_rows(rows: list[Any], where: str, setting: str = "data.sources") -> None:
    """A source with no rows at all is an error that says so (not a format that cannot be told)."""
    if not rows:
        raise DataError(f"{where} has no rows: the file is empty (or holds only `[]`, or a CSV header line "
                        f"without rows). Add rows to it, or remove it from {setting}.")


def check_mapped_columns(rows: list[Any], columns: dict[str, str], where: str,
                         setting: str = "data.sources[].columns") -> None:
    """Every column a `columns:` mapping names must be in the source: a misspelt one is an error, never a
    mapping silently ignored (which would drop every row as missing a field, or train on the wrong one)."""
    if not columns:
        return
    seen = set().union(*(r.keys() for r in rows if isinstance(r, dict)))
    for ours, theirs in columns.items():
        if theirs not in seen:
            raise DataError(f"{where}: {setting} maps {ours!r} to the column {theirs!r}, which no row has; its "
                            f"columns are {sorted(map(str, seen)) or '(none)'}. Map {ours!r} to one of those "
                            f"({{our field: your column}}), or remove that entry.")


def detect_format(rows: list[dict[str, Any]], src: SourceConfig, where: str) -> str:
    """The source's format: as configured, or the first whose columns the rows have."""
    if src.format != "auto":
        return src.format
    seen = set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict))) if rows else set()
    for name, needed in FORMATS.items():
        if set(needed) <= seen:
            return name
    expected = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMATS.items())
    raise DataError(
        f"{where}: cannot tell the format from the columns {sorted(seen) or '(none)'}. Expected "
        f"one of {expected}. Map yours with data.sources[].columns (e.g. {{instruction: question, "
        f"output: answer}}) or set data.sources[].format.")


def _text_field(row: dict[str, Any], name: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise RowProblem("missing_field", f"no '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem("not_a_string", f"'{name}' is {type(value).__name__}, not text")
    if required and not value.strip():
        raise RowProblem("empty_field", f"'{name}' is empty")
    return value


def normalize_row(row: Any, fmt: str) -> dict[str, Any]:
    """One row as {'kind': 'alpaca'|'raw'|'chat', ...}, or RowProblem."""
    if isinstance(row, RowProblem):  # found while reading the file (`sources.read_records`)
        raise row
    if not isinstance(row, dict):
        raise RowProblem("not_a_record", f"row is {type(row).__name__}, not an object")
    if fmt == "alpaca":
        return {"kind": "alpaca", "instruction": _text_field(row, "instruction"),
                "input": _text_field(row, "input", required=False), "output": _text_field(row, "output")}
    if fmt == "prompt_completion":
        return {"kind": "raw", "prompt": _text_field(row, "prompt"), "completion": _text_field(row, "completion")}
    key, role_key, text_key = (("messages", "role", "content") if fmt == "messages"
                               else ("conversations", "from", "value"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowProblem("missing_field" if turns is None else "bad_messages", f"'{key}' is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem("bad_messages", f"{key}[{i}] is not an object")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role, role) if fmt == "sharegpt" else role
        if role not in ("system", "user", "assistant"):
            raise RowProblem("bad_messages", f"{key}[{i}].{role_key} = {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text_field(turn, text_key)})
    if messages[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", "the last turn is not the assistant's (nothing to learn)")
    return {"kind": "chat", "messages": messages}




def drops_by_source(sources: dict[str, dict[str, Any]], first: dict[str, dict[str, str]]) -> str:
    """Per source: rows read and dropped by reason, each reason with its first row (`first`: source ->
    reason -> 'row N: detail'); what the no-usable-rows errors of 03 and 04b say."""
    said = []
    for name, s in sources.items():
        reasons = ", ".join(f"{n} {r} ({first[name][r]})" for r, n in Counter(s["dropped"]).most_common())
        said.append(f"{s['origin']}: {s['rows']} rows read, {s['kept']} kept; dropped: {reasons or 'none'}")
    return "; ".join(said)
