"""Exceptions raised on bad input: each message names the file, key or field at fault."""


class ConfigError(ValueError):
  """A model config has a field we do not know, or a value we do not implement."""


class WeightsError(ValueError):
  """A weights file is unreadable, or its keys/shapes do not match the model."""


class DataError(ValueError):
  """A training dataset is empty, or a metadata line or image in it is bad."""
