"""Dataclass trees and their YAML form: conversion with type checks, dotted overrides.

Generic over any nested dataclass schema (``copd_mega.config`` holds the schema): every error is
a :class:`ConfigError` that names the dotted path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted path and how to fix it."""


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return to_dataclass(value, tp, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(
                f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__}); "
                f"fix the value in the YAML file or the {path}=... override"
            )
        return value
    return value


def to_dataclass(data: dict, cls: type, path: str = "") -> Any:
    """``cls`` built from the mapping ``data``; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = ", ".join(f"{path}.{k}".lstrip(".") for k in unknown)
        raise ConfigError(
            f"unknown config key {where}; valid keys under '{path or '<root>'}' are: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain data (its YAML form)."""
    return dataclasses.asdict(cfg)


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw mapping ``data`` in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: write it as dotted.key=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, key)  # checks the index
        node[int(last)] = value
    else:
        node[last] = value


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: list index {part!r} out of range (have {len(node)} items)")
    return node[int(part)]


def non_finite(node: Any, path: str = "") -> str | None:
    """Dotted path of the first NaN/inf float anywhere in the config, or None."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            found = non_finite(getattr(node, f.name), f"{path}.{f.name}".lstrip("."))
            if found:
                return found
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found = non_finite(item, f"{path}.{i}")
            if found:
                return found
    elif isinstance(node, float) and not math.isfinite(node):
        return path
    return None
