"""livo_data for training: validate a folder once and cache it, then read it at random.

  prepared = prepare("livo_data")                  # validated TFDS array_record dataset, cached
  source = PreferenceSource(prepared)              # len = aligned images

See docs/data.md.
"""

from livo_jax.data.builder import prepare
from livo_jax.data.source import PreferenceSource

__all__ = ["PreferenceSource", "prepare"]
