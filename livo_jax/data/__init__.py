"""livo_data for training: validate and cache a folder, then stream deterministic batches.

  prepared = prepare("livo_data")                  # validated TFDS array_record dataset, cached
  source = PreferenceSource(prepared)              # len = aligned images
  it = train_iterator(source, tokenizer=tok, resolution=512, global_batch=64, seed=0,
                      process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)     # pixels_w, pixels_l, prompt_ids, value_ids, position
  state = it.get_state()                           # JSON; it.set_state(state) resumes

See docs/data.md.
"""

from livo_jax.data.latents import Moments, cache_moments
from livo_jax.data.pipeline import train_iterator
from livo_jax.data.tfds_dataset import prepare
from livo_jax.data.source import PreferenceSource
from livo_jax.data.text_cache import TextEmbeddings, cache_text_embeddings

__all__ = ["Moments", "PreferenceSource", "TextEmbeddings", "cache_moments",
           "cache_text_embeddings", "prepare", "train_iterator"]
