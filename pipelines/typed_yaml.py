"""Typed YAML configs: dataclass trees read from YAML files plus dotted `section.key=value` overrides.

The engine knows nothing of this project's options (those are `config.py`'s schema). Every key,
type and choice is checked before any work starts, so a typo fails in a second, not an hour into a
run. A choice that was renamed is still accepted, with a warning, when the field says so:

    arch: Literal["new", "other"] = field(default="new", metadata=renamed({"old": "new"}))
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key, has the wrong type or an invalid value."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def expand_output_dir(cfg: Any) -> str:
    """Fill `{section.key}` fields of `output_dir` from the config itself, so a sweep over
    `loss.name` can name each run's folder `runs/sweep/{loss.name}_emb{model.label_emb_dim}`."""
    import string

    flat = _flatten(to_dict(cfg))
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(cfg.output_dir):
        parts.append(literal)
        if name is None:
            continue
        if name not in flat:
            raise ConfigError(f"output_dir={cfg.output_dir!r}: unknown field {{{name}}}; fields look like "
                              "{loss.name} or {model.label_emb_dim}")
        if spec or conversion:
            raise ConfigError(f"output_dir={cfg.output_dir!r}: {{{name}}} takes no format spec or conversion")
        value = flat[name]
        parts.append("-".join(map(str, value)) if isinstance(value, list) else str(value))
    return "".join(parts)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_positive(section: Any, key: str, prefix: str) -> None:
    value = getattr(section, key)
    if value < 1:
        raise ConfigError(f"{prefix}.{key}={value}: must be positive")


def check_at_least(section: Any, key: str, prefix: str, low: float) -> None:
    value = getattr(section, key)
    if value < low:
        raise ConfigError(f"{prefix}.{key}={value}: must be >= {low}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        errors = []
        for option in others:
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        if value is None:
            raise ConfigError(f"{key}: null is not allowed here; expected {', '.join(_type_name(o) for o in others)}")
        raise ConfigError(errors[0])
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not a valid choice; valid choices: {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping) with keys {_field_names(tp)}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        # nan passes every `<` check below and inf every `>`: refuse both here, for every option.
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


RENAMED = "renamed"


def renamed(old_to_new: dict[str, str]) -> dict:
    """Field metadata: choices under their old names are still accepted (with a warning) as the new ones."""
    return {RENAMED: dict(old_to_new)}


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
            f"{_field_names(cls)}"
        )
    kwargs = {k: _coerce(_current_name(v, fields[k], prefix + k), hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _current_name(value: Any, f: dataclasses.Field, key: str) -> Any:
    new_names = f.metadata.get(RENAMED, {})
    if isinstance(value, str) and value in new_names:
        warnings.warn(f"{key}={value!r} is the old name of {new_names[value]!r}; it still works, but write "
                      f"{key}={new_names[value]!r}", FutureWarning, stacklevel=2)
        return new_names[value]
    return value


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate(value)
    if hasattr(obj, "validate"):
        obj.validate()


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `["train.epochs=30", "model.arch=notes_e"]` into a nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.epochs=30)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from None
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return nested


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(cls: type, values: dict) -> Any:
    """Build and validate a config dataclass from nested plain data."""
    cfg = _build(cls, values)
    _validate(cfg)
    return cfg


def load_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Any:
    """Read `path` (YAML, optional), apply dotted `overrides`, and return a validated `cls` instance."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = _yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values.pop("dataset", None)  # a run's config.yaml: what identified its images, a fact and not an option
    values = _merge(values, parse_overrides(overrides or []))
    return config_from_dict(cls, values)


def to_dict(cfg: Any) -> dict:
    """Plain nested data (tuples as lists) for YAML, W&B and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path, extra: Optional[dict] = None) -> None:
    """The resolved config as YAML; `extra` (facts of the run, not options) goes after it, as top-level keys."""
    Path(path).write_text(yaml.safe_dump({**to_dict(cfg), **(extra or {})}, sort_keys=False))
