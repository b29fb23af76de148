"""Strict parsing of HF/diffusers `config.json` dicts into frozen dataclasses.

A field we implement is read into the dataclass. A field whose only supported value is fixed
(for example `class_embed_type: null`) must hold that value. A field with no effect on the
forward pass (dropout, library versions) is ignored. Anything else is an error that
names the field, so an unsupported model is never silently run as a different one.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

from livo_jax.errors import ConfigError


def parse_config(cls, raw: Mapping[str, Any], *, fixed: Mapping[str, Any] = (),
                 ignored: tuple[str, ...] = (), source: str = "config"):
  """Builds dataclass `cls` from `raw`.

  Args:
    cls: a dataclass whose field names are the config names we implement.
    raw: the parsed config.json.
    fixed: field -> the value we implement; any other value is an error.
    ignored: fields that do not change the forward pass.
    source: what to call the config in error messages (usually its path).
  """
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in raw.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in names:
      kwargs[key] = tuple(value) if isinstance(value, list) else value
    elif key in fixed:
      if _normalise(value) != _normalise(fixed[key]):
        raise ConfigError(
            f"{source}: field '{key}' = {value!r} is not supported "
            f"(only {fixed[key]!r} is implemented)")
    else:
      raise ConfigError(f"{source}: unknown config field '{key}' = {value!r}")
  try:
    config = cls(**kwargs)
  except TypeError as e:  # a required field is missing
    raise ConfigError(f"{source}: {e}") from None
  validate = getattr(config, "validate", None)
  if validate is not None:
    validate(source)
  return config


def _normalise(value):
  return tuple(value) if isinstance(value, list) else value


def config_to_dict(config) -> dict[str, Any]:
  """The dataclass as a JSON-ready dict (tuples become lists)."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(config).items()}


def read_json_object(path: str, *, missing_hint: str = "") -> dict[str, Any]:
  """A config file's JSON object; `ConfigError` naming the file if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such file{missing_hint}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: unreadable config: {e}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw
