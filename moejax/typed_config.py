"""Typed config groups: what every settings dataclass of moejax shares.

An experiment's settings are a tree of frozen dataclasses (`ExperimentConfig` with `model`, `data`,
`mesh`, `optimizer`, `train`; `model.moe`, `model.moe.router`, ...). Each class names its
command-line path in a class attribute `PATH` ("model.moe.router") and validates itself in
`__post_init__`:

    check_fields(self)      every field against its annotation: bool, int (not bool), float (an int
                            is accepted; NaN and inf are not), str, an Enum (its string value is
                            converted), a nested group, `X | None`
    ... the class's own rules (ranges, fields that depend on each other), raising ConfigError
    check_unused(self)      a field the chosen variant does not use (the class's `unused_fields()`)
                            must keep its default: setting it is an error, never silently ignored

Errors are `ConfigError`s (a ValueError) that name the field by its command-line path, the value
and what is allowed: `model.moe.router.k=0 must be an integer in [1, num_experts=8].`

`config_dict(cls)` turns the class defaults into an `ml_collections.ConfigDict` holding every field
(a None default becomes a typed placeholder), which is what experiment files start from, so every
typed field is settable as `--config.<path>=value` and the two never drift. `build(cls, values)`
turns such a ConfigDict back into the dataclass, rejecting fields the class does not have.
`as_plain` and `differences` compare two resolved configs (a workdir's saved one and a rerun's).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict as config_dict_lib


class ConfigError(ValueError):
  """A config value that is not allowed: names the field (command-line path) and the value."""

  def __init__(self, field: str, value: Any, must: str):
    self.field, self.value = field, value
    super().__init__(f"{field}={_plain(value)!r} {must}")


def path_of(obj_or_cls, name: str) -> str:
  """The command-line path of field `name` of a config group."""
  prefix = getattr(obj_or_cls, "PATH", "")
  return f"{prefix}.{name}" if prefix else name


def parse_enum(enum_cls: type[enum.Enum], field: str, value) -> enum.Enum:
  """`enum_cls(value)`, or a ConfigError naming the field, the value and what is allowed."""
  if isinstance(value, enum_cls):
    return value
  try:
    return enum_cls(value)
  except ValueError:
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(field, value, f"is not allowed; choose one of {allowed}.") from None


# ----------------------------------------------------------------------------- annotations


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _split_optional(hint) -> tuple[Any, bool]:
  """(T, True) for `T | None`, (hint, False) otherwise."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(hint)) == 2:
      return args[0], True
  return hint, False


def group_class(hint) -> type | None:
  """The dataclass a field holds (`MoeConfig` for `MoeConfig | None`), else None."""
  inner, _ = _split_optional(hint)
  return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_value(hint, value, field: str):
  """`value` checked against `hint` (an Enum's string converted); raises ConfigError."""
  inner, optional = _split_optional(hint)
  if value is None:
    if optional:
      return None
    raise ConfigError(field, value, "must be set (None is not allowed).")
  if inner is bool:
    if not isinstance(value, bool):
      raise ConfigError(field, value, "must be True or False.")
  elif inner is int:
    if not _is_int(value):
      raise ConfigError(field, value, "must be an integer.")
  elif inner is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(field, value, "must be a number.")
    if not math.isfinite(value):
      raise ConfigError(field, value, "must be a finite number (NaN and inf are not allowed).")
    return float(value)
  elif inner is str:
    if not isinstance(value, str):
      raise ConfigError(field, value, "must be a string.")
  elif isinstance(inner, type) and issubclass(inner, enum.Enum):
    return parse_enum(inner, field, value)
  elif group_class(inner) is not None:
    if not isinstance(value, inner):
      raise ConfigError(field, value, f"must be a {inner.__name__} (a group of fields).")
  return value


def check_fields(obj) -> None:
  """Checks (and converts, for Enums and floats) every field of `obj` against its annotation."""
  hints = _hints(type(obj))
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    checked = _check_value(hints[f.name], value, path_of(obj, f.name))
    if checked is not value:
      object.__setattr__(obj, f.name, checked)


def _default(cls, f: dataclasses.Field):
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return dataclasses.MISSING


def first_difference(value, default, field: str) -> tuple[str, Any, Any] | None:
  """(path, value, default) of the first leaf where `value` differs from `default`, else None.

  A group compared with a None default is compared with its class's defaults.
  """
  if dataclasses.is_dataclass(value):
    reference = default if default is not None else type(value)()
    for f in dataclasses.fields(value):
      found = first_difference(getattr(value, f.name), getattr(reference, f.name),
                               f"{field}.{f.name}")
      if found:
        return found
    return None
  return None if value == default else (field, value, default)


def check_unused(obj) -> None:
  """Raises ConfigError when a field `obj.unused_fields()` names differs from its default."""
  unused = obj.unused_fields() if hasattr(obj, "unused_fields") else {}
  by_name = {f.name: f for f in dataclasses.fields(obj)}
  for name, reason in unused.items():
    default = _default(type(obj), by_name[name])
    found = first_difference(getattr(obj, name), default, path_of(obj, name))
    if found:
      field, value, default_value = found
      raise ConfigError(field, value, f"is not used: {reason}. Leave it at its default "
                        f"({_plain(default_value)!r}) or choose a setting that uses it.")


# ----------------------------------------------------------------------------- ConfigDicts


def config_dict(cls) -> ml_collections.ConfigDict:
  """A ConfigDict of `cls`'s defaults, every field present (recursing into groups).

  A field without a default, or with a None default, becomes a typed placeholder (None until set,
  settable from the command line). Enums are stored as their string values.
  """
  hints = _hints(cls)
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    hint = hints[f.name]
    group = group_class(hint)
    default = _default(cls, f)
    if group is not None:
      out[f.name] = config_dict(group)
    elif default is dataclasses.MISSING or default is None:
      inner, _ = _split_optional(hint)
      kind = str if isinstance(inner, type) and issubclass(inner, enum.Enum) else inner
      out[f.name] = config_dict_lib.placeholder(kind if isinstance(kind, type) else object)
    else:
      out[f.name] = default.value if isinstance(default, enum.Enum) else default
  return out


def as_dict(value: Any, field: str) -> dict:
  """A ConfigDict or mapping as a plain dict of its top-level fields."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    return dict(value.to_dict())
  if isinstance(value, Mapping):
    return dict(value)
  raise ConfigError(field or "config", value, "must be a group of fields (a ConfigDict).")


def build(cls, values: Any, **fixed):
  """`cls(**values)` with nested groups built recursively; unknown fields raise ConfigError.

  `fixed` overrides fields after the groups are built (for values the caller resolved).
  """
  values = as_dict(values, getattr(cls, "PATH", ""))
  hints = _hints(cls)
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(allowed))
  if unknown:
    listed = ", ".join(path_of(cls, name) for name in unknown)
    where = getattr(cls, "PATH", "") or "the config"
    raise ConfigError(listed, values[unknown[0]],
                      f"is not a field of {where}; allowed fields: {allowed}.")
  kwargs = {}
  for name, value in values.items():
    group = group_class(hints[name])
    if group is not None and value is not None and not isinstance(value, group):
      value = build(group, value)
    kwargs[name] = value
  kwargs.update(fixed)
  return cls(**kwargs)


# ----------------------------------------------------------------------------- comparing configs


def _plain(value):
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def as_plain(obj) -> Any:
  """A resolved config as JSON-ready data: dicts, lists, strings, numbers, booleans, None."""
  return _plain(obj)


MISSING = "<missing>"  # a field one of two compared trees does not have (an older config)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(path, old, new) for every leaf where two `as_plain` trees differ (groups recursed).

  A field only one tree has is reported with `MISSING` on the other side.
  """
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      path = f"{prefix}.{key}" if prefix else key
      out += differences(old.get(key, MISSING), new.get(key, MISSING), path)
    return out
  return [] if old == new else [(prefix, old, new)]
