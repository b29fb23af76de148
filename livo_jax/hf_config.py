"""Strict reading of Hugging Face (transformers / diffusers) `config.json` dicts into dataclasses.

A field the dataclass has is read into it. A field whose only supported value is fixed (for
example a UNet's `class_embed_type: null`) must hold that value. A field with no effect on the
computation (dropout, library versions) is ignored. Anything else is an error naming the field,
so an unsupported model is never silently run as a different one:

  config = parse(UNetConfig, raw, fixed=unet.HF_FIXED, ignored=unet.HF_IGNORED,
                 source="sd15/unet/config.json")

The dataclass may have `validate()`, raising ValueError("field 'x' = ... why") for a value it
does not implement; the message is re-raised as a `ConfigError` prefixed with `source`. The model
modules define the dataclasses and their tables; this module knows no model.
"""

import dataclasses
from typing import Any, Mapping

from livo_jax.errors import ConfigError


def parse(cls, raw: Mapping[str, Any], *, fixed: Mapping[str, Any] = (),
          ignored: tuple[str, ...] = (), source: str = "config"):
  """Builds dataclass `cls` from `raw` (lists become tuples)."""
  fixed = dict(fixed)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in raw.items():
    if key.startswith("_") or key in ignored:
      continue
    if key in names:
      kwargs[key] = _tuples(value)
    elif key in fixed:
      if _tuples(value) != _tuples(fixed[key]):
        raise ConfigError(f"{source}: field '{key}' = {value!r} is not supported "
                          f"(only {fixed[key]!r} is implemented)")
    else:
      raise ConfigError(f"{source}: unknown config field '{key}' = {value!r}")
  try:
    config = cls(**kwargs)
  except TypeError as e:  # a required field is missing
    raise ConfigError(f"{source}: {e}") from None
  validate = getattr(config, "validate", None)
  if validate is not None:
    try:
      validate()
    except ValueError as e:
      raise ConfigError(f"{source}: {e}") from None
  return config


def to_dict(config) -> dict[str, Any]:
  """The dataclass as a JSON-ready dict (tuples become lists, nested dataclasses dicts)."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(config).items()}


def _tuples(value):
  return tuple(value) if isinstance(value, list) else value
