"""The one reader of YAML a user writes: profiles, sweep files, and the values of `--set` and `--grid`.

PyYAML's `safe_load` keeps the last of two equal keys in one mapping without a word (two `lora:`
sections, `r:` twice), so the setting a user reads in the file need not be the one used. Here a key
given twice is a ConfigError naming the file (or the option), the key (dotted, from the top) and the
lines of both. A file that is not YAML at all is a ConfigError too (`read_yaml_file`); for the text
of an option PyYAML's own `yaml.YAMLError` is left to the caller, which words it for that option.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .paths import read_utf8

MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor`: the keys beside it override the anchor's, by design


def read_yaml_file(path: Path) -> Any:
    """A user's YAML file (a profile, a sweep file), read as UTF-8 by `load_yaml`."""
    try:
        return load_yaml(read_utf8(path, ConfigError), str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def load_yaml(text: str, source: str, lines: bool = True, setting: str = "") -> Any:
    """`yaml.safe_load(text)`, refusing a key given twice in one mapping: the error names `source`
    (a file's path, or `Override 'lora={r: 8, r: 16}'`), the key (below `setting`, the dotted key
    the text is the value of) and, with `lines`, where both stand."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        repeated = _repeated_key(loader, node, setting, set())
        if repeated:
            where, first, again = repeated
            raise ConfigError(f"{source}: key {where!r} is given twice{' ' + _at(first, again) if lines else ''}; "
                              f"YAML would silently keep the last one. Remove one of them (or merge the two).",
                              key=where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _repeated_key(loader: yaml.SafeLoader, node: yaml.Node, path: str,
                  seen: set[int]) -> tuple[str, yaml.Node, yaml.Node] | None:
    """The first key given twice in one mapping, walking the composed document: (its dotted path, its
    first key node, the repeated one). Each node is walked once (an alias may point at its own anchor)."""
    if id(node) in seen:
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        return next(filter(None, (_repeated_key(loader, item, f"{path}[{i}]", seen)
                                  for i, item in enumerate(node.value))), None)
    first: dict[Any, yaml.Node] = {}
    for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else []:
        where = path
        if key_node.tag != MERGE_TAG:
            key = loader.construct_object(key_node, deep=True)
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, typing.Hashable):  # an unhashable key: safe_load's own error, later
                if key in first:
                    return where, first[key], key_node
                first[key] = key_node
        found = _repeated_key(loader, value_node, where, seen)
        if found:
            return found
    return None


def _at(first: yaml.Node, again: yaml.Node) -> str:
    """`at line 3 and again at line 9` (with columns when both stand on one line, as in a flow mapping)."""
    a, b = first.start_mark, again.start_mark
    if a.line == b.line:
        return f"at line {a.line + 1}, column {a.column + 1} and again at column {b.column + 1}"
    return f"at line {a.line + 1} and again at line {b.line + 1}"
