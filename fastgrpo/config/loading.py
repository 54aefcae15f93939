"""A run's config: the defaults, then a YAML file (overrides only), then ``key=value`` overrides from
the command line (dotted keys, values parsed as YAML scalars), or a saved config dict (resume).
Unknown keys and wrong types fail with the key's dotted name and what is allowed; a key a file sets
is named with its file and line."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from fastgrpo.config.checks import validate
from fastgrpo.config.schema import CHOICES, RENAMED_SECTIONS, Config, ConfigError


def _renamed_sections(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a file's or an override's top level) with the old section names replaced, warning once each."""
    out = dict(data)
    for old, new in RENAMED_SECTIONS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source}: sets both {old!r} and {new!r}; {old!r} is the old name of {new!r}: keep "
                              f"only {new!r}", key=new)
        warnings.warn(f"{source}: the config key {old!r} is renamed {new!r}; use {new!r}", FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}", key=key)
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}", key=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string: YAML 1.1's float rule
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
    raise ConfigError(f"{key}: unsupported type {tp}", key=key)  # a programming error in this module


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}", key=where)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}", key=key)
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {', '.join(CHOICES[key])}", key=key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        # reward_weights and data.mixture are {name: weight} maps: an override replaces the whole map
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("reward_weights", "mixture"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=10)", key=None)
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key", key=None)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated."""
    loaded: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist", key=None)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}", key=None) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}", key=None)
        loaded = _renamed_sections(loaded, str(path))
        try:
            _build(Config, loaded, "")  # names the file's own bad key before merging
        except ConfigError as exc:
            raise ConfigError(f"{_file_line(path, exc)}: {exc}", key=exc.key) from None
    try:
        return config_from_dict(loaded, overrides)
    except ConfigError as exc:
        # A cross-field error about a key that the file sets (and no override replaces) points at its line.
        set_by = [o.split("=", 1)[0].strip().split(".", 1) for o in overrides]  # an old section name counts too
        overridden = exc.key is not None and any(exc.key == ".".join([RENAMED_SECTIONS.get(k[0], k[0]), *k[1:]])
                                                 for k in set_by)
        if path is None or overridden or _yaml_line(path.read_text(), exc.key) is None:
            raise
        raise ConfigError(f"{_file_line(path, exc)}: {exc}", key=exc.key) from None


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- ``data`` (sections as ``to_dict`` writes them, e.g. a checkpoint's saved config) <-
    ``key=value`` overrides, validated as ``load_config`` validates a file; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}", key=None)
    merged = _merge(to_dict(Config()), _renamed_sections(data, "the saved config"))
    for item in overrides:
        merged = _merge(merged, _renamed_sections(parse_override(item), f"override {item!r}"))
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg


def _yaml_line(text: str, key: str | None) -> int | None:
    """1-based line where a YAML document sets the dotted ``key``; None when it does not.

    A list index ends the walk at the list's own key: "rollout.length_stages[1]" is found on the
    line of ``length_stages:``; a renamed section is found under its old name too.
    """
    if key is None:
        return None
    node, line = yaml.compose(text), None
    for part in key.split("[", 1)[0].split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        top = line is None  # only top-level sections were renamed
        hit = next(((k, v) for k, v in node.value if k.value == part or top and RENAMED_SECTIONS.get(k.value) == part),
                   None)
        if hit is None:
            return None
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


def _file_line(path: Path, exc: ConfigError) -> str:
    """``path:line`` of the key an error names (``path`` when the file does not set it)."""
    line = _yaml_line(path.read_text(), exc.key)
    return f"{path}:{line}" if line else str(path)
