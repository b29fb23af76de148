"""Exceptions raised on bad input: each message names the file, key or field at fault."""


class ConfigError(ValueError):
  """A setting we cannot use: a config.json field we do not know or implement, a trainer config
  key or value, a flag, a mesh that does not fit the devices, an unwritable workdir."""


class WeightsError(ValueError):
  """A weights file is unreadable, or its keys/shapes do not match the model."""


class DataError(ValueError):
  """A training dataset is empty, or a metadata line or image in it is bad."""


class RunError(RuntimeError):
  """A training run stopped on purpose: its workdir is held by another run, a write failed, or
  its steps stopped being finite. The message says why and what was kept."""
