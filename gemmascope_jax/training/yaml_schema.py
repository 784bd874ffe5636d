"""Typed YAML configs: `extends` files, YAML 1.2 floats, `key=value` overrides, and a builder
that turns a plain mapping into nested frozen dataclasses, reporting every problem at once.

    raw = apply_overrides(read_yaml("run.yaml"), ["train.steps=100", "items.0.width=8192"])
    cfg = build_checked(MyConfig, raw)  # MyConfig: frozen dataclasses, bounds via `field`

Why a module of its own: this machinery knows nothing about training runs (their schema and
semantic checks are `training.config` and its `config_sections` / `config_checks`), so it is
read, tested and reused apart from them.

- `read_yaml`: a file may name `extends: base.yaml` (or a list; paths relative to the file);
  the bases are merged first, mappings key by key, lists replaced whole; cycles are errors.
  Floats follow YAML 1.2: `7e-5` is a float (PyYAML's YAML 1.1 rules make it a string).
- `apply_overrides`: dotted keys into the merged mapping (list items by index,
  `dictionaries.0.width`), values parsed by `parse_value` as YAML scalars / flow values
  (`7e-5` a float, `[5, 9]` a list, `null` None).
- `build` / `build_checked`: fields typed `int`, `float`, `bool`, `str`, `Literal`, unions and
  optionals, `tuple[X, ...]` / fixed tuples, `Any` and nested dataclasses; `field` adds
  min/max bounds and a custom parser; `merge_defaults` spreads a defaults mapping over list
  items. Unknown keys come with the closest known key suggested, wrong types and bounds with
  what was expected, all as (dotted key, message) problems in one `ConfigError`.
- `dump_yaml` / `write_yaml`: the way back, for saving a resolved config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "build_checked",
    "dump_yaml",
    "field",
    "merge_defaults",
    "parse_value",
    "read_yaml",
    "show",
    "unknown_key",
    "write_yaml",
]


class ConfigError(ValueError):
    """Invalid configuration; `problems` is a list of (dotted key, message)."""

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        lines = "\n".join(f"  {key}: {msg}" for key, msg in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def field(default=dataclasses.MISSING, *, min=None, max=None, parse=None, factory=None):
    """A dataclass field with bounds / a custom parser, checked by `build`."""
    meta = {"min": min, "max": max, "parse": parse}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- YAML loading, extends, overrides -----------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (`7e-5` is a float, not a string)."""


_Loader.yaml_implicit_resolvers = {
    c: [r for r in rs if r[0] != "tag:yaml.org,2002:float"]
    for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_value(text: str):
    """A command-line value as a YAML scalar/flow value (`1e-4`, `[5, 9]`, `null`, `true`)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path, _seen: tuple = ()) -> dict:
    """A YAML mapping with its `extends` bases merged in (bases first, this file last)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError([("extends", f"cycle: {' -> '.join(map(str, (*_seen, path)))}")])
    if not path.is_file():
        raise ConfigError([("extends" if _seen else "config", f"no such file {path}")])
    raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(raw, dict):
        raise ConfigError([("config", f"{path}: top level must be a mapping")])
    bases = raw.pop("extends", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / base, (*_seen, path)))
    return _merge(merged, raw)


def dump_yaml(data) -> str:
    """`data` (plain mappings, lists, scalars) as YAML, keys in their order, block style but
    innermost collections inline."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def write_yaml(path, data, comment: str) -> Path:
    """Write `data` as YAML under a `# comment` line, atomically (via a .tmp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"# {comment}\n{dump_yaml(data)}")
    tmp.replace(path)
    return path


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`raw` with each `dotted.key=value` set (a copy; list items by index)."""
    raw = json.loads(json.dumps(raw))
    problems = []
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append((item, "overrides are key=value (e.g. train.steps=100)"))
            continue
        node, parts = raw, key.split(".")
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                value = parse_value(text) if last else {}
                if isinstance(node, list):
                    idx = int(part) if re.fullmatch(r"-?\d+", part) else None
                    if idx is None or not -len(node) <= idx < len(node):
                        raise KeyError(f"no item {part!r} (the list has {len(node)})")
                    node[idx] = value if last else node[idx]
                    node = node[idx]
                elif isinstance(node, dict):
                    if last or not isinstance(node.get(part), dict | list):
                        if not last and node.get(part) is not None:
                            raise KeyError(f"{'.'.join(parts[: i + 1])} is not a mapping")
                        node[part] = value
                    node = node[part]
                else:
                    raise KeyError(f"{'.'.join(parts[:i])} is a value, not a mapping")
        except KeyError as e:
            problems.append((key, e.args[0]))
        except yaml.YAMLError as e:
            problems.append((key, f"cannot parse value {text!r}: {e}"))
    if problems:
        raise ConfigError(problems)
    return raw


# ---- structure: types and unknown keys -----------------------------------------------------


def unknown_key(key: str, name, known: Sequence[str]) -> tuple[str, str]:
    """The problem for an unknown `name` under `key`, suggesting the closest of `known`."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {_join(key, close[0])!r}?)" if close else ""
    return _join(key, str(name)), f"unknown key{hint}; known: {', '.join(known)}"


def merge_defaults(raw, defaults_key: str, items_key: str, cls, problems: list):
    """`raw` without its optional `defaults_key` mapping, which is merged under every mapping
    in the `items_key` list (an item's own keys win); keys that are not fields of the
    dataclass `cls` are reported (and dropped) like unknown keys in `build`. A `raw` that is
    not a mapping is returned as is (`build` reports it)."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    defaults = raw.pop(defaults_key, None) or {}
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(defaults, dict):
        problems.append((defaults_key, f"expected a mapping, got {show(defaults)}"))
        return raw
    problems.extend(unknown_key(defaults_key, k, known) for k in defaults if k not in known)
    defaults = {k: v for k, v in defaults.items() if k in known}
    items = raw.get(items_key)
    if defaults and isinstance(items, list):
        raw[items_key] = [{**defaults, **d} if isinstance(d, dict) else d for d in items]
    return raw


def build(cls, raw, key: str, problems: list):
    """An instance of the dataclass `cls` from the mapping `raw` found at dotted `key` ("" at
    the top); each problem is appended to `problems` (then the result may be None or hold
    defaults in place of bad values, so raise `ConfigError(problems)` when there are any)."""
    if not isinstance(raw, dict):
        problems.append((key or "config", f"expected a mapping, got {show(raw)}"))
        return cls() if _has_defaults(cls) else None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            problems.append(unknown_key(key, name, list(fields)))
            continue
        meta = fields[name].metadata
        try:
            value = meta["parse"](value, sub) if meta.get("parse") else value
            kwargs[name] = _coerce(hints[name], value, sub, problems)
        except TypeError as e:
            problems.append((sub, str(e)))
            continue
        lo, hi, v = meta.get("min"), meta.get("max"), kwargs[name]
        num = isinstance(v, int | float) and not isinstance(v, bool)
        if num and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            problems.append((sub, f"must be {bound}, got {v}"))
    missing = [n for n, f in fields.items() if n not in kwargs and not _has_default(f)]
    for name in missing:
        problems.append((_join(key, name), "required"))
    if missing:
        return None
    return cls(**kwargs)


def build_checked(cls, raw, problems: Sequence[tuple[str, str]] = ()):
    """`build` from the top, raising one `ConfigError` with `problems` (found earlier, e.g. by
    `merge_defaults`) followed by its own, if there are any."""
    problems = list(problems)
    out = build(cls, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    return out


def _coerce(tp, value, key, problems):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            sub: list = []
            try:
                out = _coerce(arm, value, key, sub)
            except TypeError:
                continue
            if not sub:
                return out
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                problems.extend(sub)
                return None
        raise TypeError(f"expected {_type_name(tp)}, got {show(value)}")
    if origin is Literal:
        if value in args:
            return value
        raise TypeError(f"expected one of {', '.join(map(repr, args))}, got {show(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
    if origin is tuple:
        items = list(value) if isinstance(value, list | tuple) else [value]
        arms = args[:1] * len(items) if len(args) == 2 and args[1] is Ellipsis else args
        if len(arms) != len(items):
            raise TypeError(f"expected {len(arms)} items, got {show(value)}")
        pairs = enumerate(zip(arms, items, strict=True))
        return tuple(_coerce(a, v, f"{key}.{i}", problems) for i, (a, v) in pairs)
    if tp is bool and isinstance(value, bool):
        return value
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if tp is int and integral and not isinstance(value, bool):
        return int(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise TypeError(f"expected {_type_name(tp)}, got {show(value)}")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    return "a mapping" if dataclasses.is_dataclass(tp) else getattr(tp, "__name__", str(tp))


def show(value) -> str:
    """A value with its type, for messages: `int 3`, `str 'x'`."""
    return f"{type(value).__name__} {value!r}"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _has_default(f) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _has_defaults(cls) -> bool:
    return all(_has_default(f) for f in dataclasses.fields(cls))
