"""The checks behind `config.load_config`: each value against its field's type (`Literal` choices,
unions, lists, mappings, nested sections) and its range, with errors that name the key, the value and
what is valid. config.py declares the fields (their help and range live in each field's metadata).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.", key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key '{prefix}{key}' in {where}.{hint} "
                              f"Valid keys: {', '.join(names)}.", key=f"{prefix}{key}")
    values = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = build_dataclass(hints[name], data[name], prefix=f"{key}.")
        else:
            values[name] = _check_value(key, hints[name], data[name])
            _check_range(key, values[name], fields[name].metadata)
            problem = fields[name].metadata.get("check", lambda _: None)(values[name])
            if problem:
                raise ConfigError(f"'{key}' is {data[name]!r}: {problem}.", key=key)
    return cls(**values)


def _check_range(key: str, value: Any, meta: Any) -> None:
    rng = meta.get("range", {})
    if not rng or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    finite = math.isfinite(value)  # NaN compares False with every bound: refused here, not passed
    wrong = (not finite or ("low" in rng and value < rng["low"]) or ("gt" in rng and value <= rng["gt"])
             or ("lt" in rng and value >= rng["lt"]) or (rng.get("nonzero") and value == 0))
    if wrong:
        limits = [f">= {rng['low']}" if "low" in rng else None, f"> {rng['gt']}" if "gt" in rng else None,
                  f"< {rng['lt']}" if "lt" in rng else None, "not 0" if rng.get("nonzero") else None]
        kind = "" if finite else "a finite number "
        raise ConfigError(f"'{key}' is {value!r}: it must be {kind}{' and '.join(x for x in limits if x)} "
                          f"({meta['help']}).", key=key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping of " + " to ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming key, value and what is valid."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check_value(key, option, value)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            item = typing.get_args(tp)[0]
            if dataclasses.is_dataclass(item):
                return [build_dataclass(item, v, prefix=f"{key}[{i}].") for i, v in enumerate(value)]
            return [_check_value(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            k_tp, v_tp = typing.get_args(tp)
            return {_check_value(key, k_tp, k): _check_value(f"{key}.{k}", v_tp, v) for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} = {value!r} is invalid: expected {_type_name(tp)}.", key=key)

