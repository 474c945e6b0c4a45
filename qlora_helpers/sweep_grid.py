"""A sweep's grid: `--grid` values, the combinations they expand to, their run folder names, and which
keys each sets (a key may be fixed or swept, not both, and swept once). The plan and the running are
`sweep.py`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .config import override_keys
from .errors import ConfigError
from .user_yaml import load_yaml


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """`lora.target_modules=[q_proj,v_proj],all-linear` -> ('lora.target_modules', [[...], 'all-linear']).

    The values are read as one YAML flow sequence, so commas inside brackets or quotes stay inside
    a value and each value follows the `--set` rules (`8` an int, `[a,b]` a list, `true` a bool)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"Grid {text!r} must look like section.key=value1,value2 "
                          f"(for example lora.r=8,16 or 'lora.target_modules=[q_proj,v_proj],all-linear').")
    try:
        values = load_yaml(f"[{raw}]", f"Grid {text!r}", lines=False)  # a key twice: at [i].key
    except yaml.YAMLError as exc:
        raise ConfigError(f"Grid {text!r}: the values are not valid YAML ({exc.problem}). Separate values "
                          f"with commas; put a list in brackets and a string with commas in quotes.") from None
    except ConfigError as exc:  # said by the value's place in the option, not as `[1].r`
        index, _, inner = (exc.key or "").partition("]")
        if not index.startswith("[") or not inner:
            raise
        raise ConfigError(f"Grid {text!r}: --grid {key}'s {_ordinal(int(index[1:]) + 1)} value sets "
                          f"{inner.lstrip('.')} twice; YAML would silently keep the last one. Remove one of "
                          f"them (or merge the two).", key=f"{key}{index}]{inner}") from None
    return key, values


def _ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest: {a: [1, 2], b: [x, y]} -> a1b1, a1by, a2bx, a2by."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def override_text(key: str, value: Any) -> str:
    """A `--set` string that reads back as `value` (JSON is a subset of YAML)."""
    return f"{key}={json.dumps(value)}"


def flatten_settings(settings: Any, where: str) -> dict[str, Any]:
    """{train: {max_steps: 16}, 'lora.r': 8} -> {'train.max_steps': 16, 'lora.r': 8}."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a mapping of sections (train: {{max_steps: 16}}) or dotted keys, "
                          f"not {settings!r}.")
    flat: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # each flat key -> how the mapping wrote it, for a key written twice
    for key, value in settings.items():
        if "." not in str(key) and isinstance(value, dict):
            items = [(f"{key}.{sub}", v, f"{sub} in {key}: {{...}}") for sub, v in value.items()]
        else:
            items = [(str(key), value, str(key))]
        for flat_key, v, how in items:  # one value used to win silently
            both = [f for f in flat if _overlap(f, flat_key)]
            if both:
                raise ConfigError(f"{where} sets {max(both[0], flat_key, key=len)} twice ({spelled[both[0]]} "
                                  f"and {how}); give it once.")
            flat[flat_key], spelled[flat_key] = v, how
    return flat


def value_label(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def run_tags(combos: list[dict[str, Any]]) -> list[str]:
    """Readable, unique folder names: {'lora.r': 8, 'lora.target_modules': [q_proj, v_proj]} ->
    'r-8__target_modules-q_proj.v_proj'. Keys go by their last part unless two share it."""
    keys = list(dict.fromkeys(k for c in combos for k in c))
    last = [k.split(".")[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    tags = []
    for combo in combos:
        text = "__".join(f"{short[k]}-{value_label(v)}" for k, v in combo.items()) or "base"
        tag = re.sub(r"[^A-Za-z0-9._-]+", ".", text).strip(".-_") or "run"
        digest = hashlib.sha1(json.dumps(combo, sort_keys=True).encode()).hexdigest()[:8]
        tags.append(tag if len(tag) <= 80 else f"{tag[:60]}-{digest}")
    for i, tag in enumerate(tags):  # the rare clash ('a b' and 'a.b' both become 'a.b'): add a hash
        if tags.count(tag) > 1:
            digest = hashlib.sha1(json.dumps(combos[i], sort_keys=True).encode()).hexdigest()[:8]
            tags[i] = f"{tag}-{digest}"
    return tags


def combinations(path: Path, spec: dict[str, Any], grid_args: list[str]) -> list[dict[str, Any]]:
    if "runs" in spec:
        if grid_args or "grid" in spec:
            raise ConfigError(f"{path.name} lists its runs (runs:); it cannot take a grid too. Put the "
                              f"combinations in runs:, or use grid: alone.")
        runs = spec["runs"]
        if not isinstance(runs, list) or not runs:
            raise ConfigError(f"{path.name}: runs: must be a non-empty list of mappings (- {{lora.r: 8}}).")
        return [flatten_settings(r, f"{path.name}: runs[{i}]") for i, r in enumerate(runs)]
    given: set[str] = set()
    grid = flatten_settings(spec.get("grid"), f"{path.name}: grid")
    for text in grid_args:
        key, values = parse_grid(text)
        if key in grid:  # the last one used to win, silently
            where = "twice (--grid)" if key in given else f"in {path.name}'s grid: and again with --grid"
            raise ConfigError(f"Grid key {key!r} is given {where}; give it once, with every value "
                              f"(--grid {key}=V1,V2,...).")
        given.add(key)
        grid[key] = values
    if not grid:
        raise ConfigError("Nothing to sweep: give --grid KEY=V1,V2 (repeatable) or a sweep file with grid:.")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"Grid key {key!r} needs a non-empty list of values, not {values!r}.")
        dupes = [v for i, v in enumerate(values) if v in values[:i]]
        if dupes:
            raise ConfigError(f"Grid key {key!r} lists {dupes[0]!r} twice.")
    return expand_grid(grid)


def _leaves(key: str, value: Any) -> list[str]:
    """The dotted keys a swept or fixed value sets: a section's mapping sets each key it names."""
    return override_keys(override_text(key, value))


def _overlap(a: str, b: str) -> bool:
    """Do two dotted keys set the same setting? (equal, or one is the section holding the other)"""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def fixed_keys(fixed: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Each dotted key fixed for every run -> how it was fixed (`set: lora.r` or `--set lora={r: 8}`)."""
    keys = {leaf: f"set: {key}" for key, value in fixed.items() for leaf in _leaves(key, value)}
    keys.update({leaf: f"--set {text}" for text in overrides for leaf in override_keys(text)})
    return keys


def check_keys(combos: list[dict[str, Any]], fixed: dict[str, str]) -> list[str]:
    """The swept keys, in order; refused when one is also fixed or two swept keys set the same setting
    (`lora.r` and a `lora` mapping naming r), whichever way each is spelled."""
    swept = list(dict.fromkeys(k for c in combos for k in c))
    leaves = {key: sorted({leaf for c in combos if key in c for leaf in _leaves(key, c[key])}) for key in swept}
    for key in swept:
        for leaf in leaves[key]:
            clash = [how for f, how in fixed.items() if _overlap(leaf, f)]
            if clash:
                raise ConfigError(f"{leaf} is both fixed ({clash[0]}) and swept (grid {key}); keep one.")
    for i, key in enumerate(swept):
        for other in swept[i + 1:]:
            both = [a for a in leaves[key] for b in leaves[other] if _overlap(a, b)]
            if both:
                raise ConfigError(f"{both[0]} is swept twice (grid {key} and grid {other}); sweep it once.")
    return swept
