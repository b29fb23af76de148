"""`train_iterator`: the endless, deterministic, per-process grain pipeline of training batches.

The stream is a function of (seed, position n) only:
  - epoch e = n // N (N = aligned images) visits the aligned images in a permutation of (seed, e)
    (grain's `shuffle` over an endless `repeat`);
  - example n's violating image (uniform over its scene's), crop offsets and flips come from
    `np.random.default_rng(SeedSequence([seed, n]))`, drawn in this order: violating choice;
    aligned crop (random_crop only), aligned flip (random_flip only); the same for the violating
    image;
  - process p of P takes, at its local step g, positions [g*B + p*b, g*B + (p+1)*b) (B global,
    b = B // P local batch).
So the global batch of a step is the same whatever the process count, each process reads and
decodes only its own rows, and a resumed iterator continues exactly where it stopped.
"""

import dataclasses
import sys
from typing import Any

import grain
import numpy as np

from livo_jax import conditioning
from livo_jax.data import transforms
from livo_jax.data.latents import Moments
from livo_jax.data.source import PreferenceSource
from livo_jax.data.text_cache import TextEmbeddings

_TEXT = ("prompt", "value")


def train_iterator(source: PreferenceSource, *, tokenizer: Any, resolution: int,
                   center_crop: bool = True, random_flip: bool = True, global_batch: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   moments: Moments | None = None, text: TextEmbeddings | None = None,
                   num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
  """This process's training batches, endless and checkpointable.

  Args:
    source: the prepared dataset.
    tokenizer: SD's CLIP tokenizer (model_max_length 77).
    resolution: R, the image size.
    center_crop: centre crop, else a random crop.
    random_flip: mirror each image with probability 0.5 (aligned and violating independently).
    global_batch: B, the batch over all processes.
    seed: non-negative; fixes the whole stream.
    process_index, process_count: this process p of P; P must divide B.
    moments: a latent cache (`cache_moments`): yield its moments instead of decoding images.
      Needs center_crop and, with random_flip, the cache's flipped variant.
    text: a text cache (`cache_text_embeddings`): also yield each prompt's hidden states.
    num_threads: grain threads reading and decoding rows.
    prefetch: local batches read ahead.
  Returns:
    A grain DatasetIterator (`get_state()` -> JSON-serialisable dict; `set_state(state)`) of
    dicts of numpy arrays, b = B // P rows each:
      pixels_w, pixels_l: float32 [b, R, R, 3] in [-1, 1] (without moments), or
      moments_w, moments_l: float32 [b, r, r, 2C] (with moments);
      prompt_ids, value_ids: int32 [b, 77], the prompt and "<value>, <prompt>" token ids;
      prompt_embeds: float32 [b, 77, D] (with text), the prompt's cached hidden states;
      position: int64 [b], each row's position n in the global stream.
  """
  if global_batch <= 0 or process_count <= 0 or global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} must be a positive multiple of "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if moments is not None:
    _check_moments(source, moments, resolution, center_crop, random_flip)
  local_batch = global_batch // process_count
  example = _Example(source, resolution=resolution, center_crop=center_crop,
                     random_flip=random_flip, seed=seed, moments=moments, text=text)
  # Hashed so that seeds s and s + 1 do not share epochs (grain reseeds epoch e with seed + e).
  shuffle_seed = int(np.random.SeedSequence(seed, spawn_key=(0,)).generate_state(1)[0])
  stream = (grain.MapDataset.source(source)
            .shuffle(shuffle_seed)
            .repeat()                  # endless; epoch e = n // N
            .map_with_index(example))  # the index here is the stream position n

  def local_row(k):
    """This process's k-th row: row j of its block of the global batch of step g."""
    g, j = divmod(k, local_batch)
    return stream[g * global_batch + process_index * local_batch + j]

  ds = (grain.MapDataset.range(sys.maxsize)
        .map(local_row)
        # Rows are read and decoded in parallel threads, `prefetch` batches ahead.
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=prefetch * local_batch))
        .batch(local_batch, batch_fn=_stack)
        # In the consumer's thread: fast tokenizers are not safe to share between threads.
        .map(lambda batch: _tokenize(tokenizer, batch)))
  return iter(ds)


@dataclasses.dataclass(frozen=True)
class _Example:
  """Stream position n and its aligned record -> one training example (a dict of arrays)."""
  source: PreferenceSource
  resolution: int
  center_crop: bool
  random_flip: bool
  seed: int
  moments: Moments | None
  text: TextEmbeddings | None

  def __call__(self, position: int, aligned: dict) -> dict:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, position]))
    choices = self.source.violating(aligned["scene"])
    violating_id = int(choices[rng.integers(len(choices))])
    row = dict(prompt=aligned["prompt"], value=aligned["value"], position=np.int64(position))
    if self.text is not None:
      row["prompt_embeds"] = self.text.get(aligned["prompt"])
    if self.moments is None:
      row["pixels_w"] = self._pixels(aligned["image"], rng)
      row["pixels_l"] = self._pixels(self.source.record(violating_id)["image"], rng)
    else:
      row["moments_w"] = self.moments.get(aligned["record"], self._flip(rng))
      row["moments_l"] = self.moments.get(violating_id, self._flip(rng))
    return row

  def _flip(self, rng) -> bool:
    return self.random_flip and bool(rng.random() < 0.5)

  def _pixels(self, data: bytes, rng) -> np.ndarray:
    image = transforms.resize_shorter_side(transforms.decode(data), self.resolution)
    offset = (transforms.center_offset(image, self.resolution) if self.center_crop
              else transforms.random_offset(image, self.resolution, rng))
    return transforms.to_pixels(image, self.resolution, offset, self._flip(rng))


def _stack(rows: list[dict]) -> dict:
  """Rows -> arrays stacked on a new first axis; the texts stay lists until tokenized."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in _TEXT}
  batch.update({k: [r[k] for r in rows] for k in _TEXT})
  return batch


def _tokenize(tokenizer, batch: dict) -> dict:
  prompts, values = batch.pop("prompt"), batch.pop("value")
  return dict(batch,
              prompt_ids=conditioning.tokenize(tokenizer, prompts),
              value_ids=conditioning.tokenize(
                  tokenizer, [conditioning.value_prompt(v, p) for v, p in zip(values, prompts)]))


def _check_moments(source, moments, resolution, center_crop, random_flip):
  if not center_crop:
    raise ValueError("a latent cache holds centre crops: it needs center_crop=True")
  if moments.resolution != resolution:
    raise ValueError(f"the latent cache was made at resolution {moments.resolution}, "
                     f"not {resolution}")
  if random_flip and moments.flipped is None:
    raise ValueError("random_flip needs a latent cache made with random_flip=True")
  if len(moments.plain) != source.num_records:
    raise ValueError(f"the latent cache has {len(moments.plain)} records, the source "
                     f"{source.num_records}: it was made for another dataset")
