"""livo_data for training: validate a folder once and cache it, then read it at random.

  prepared = prepare("livo_data")                  # validated TFDS array_record dataset, cached
  source = PreferenceSource(prepared)              # len = aligned images
  moments = cache_moments(source, encode_fn, resolution=512, random_flip=True, key="sd15")

See docs/data.md.
"""

from livo_jax.data.builder import prepare
from livo_jax.data.latents import Moments, cache_moments
from livo_jax.data.source import PreferenceSource

__all__ = ["Moments", "PreferenceSource", "cache_moments", "prepare"]
