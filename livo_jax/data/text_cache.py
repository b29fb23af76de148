"""Text cache: the frozen text encoder's hidden states of every distinct prompt, computed once.

  text = cache_text_embeddings(source, encode, key="sd15/text_encoder")
  it = train_iterator(source, ..., text=text)   # adds prompt_embeds [b, 77, D]

SD's text encoder is frozen, so a prompt's conditioning is the same at every step; with the cache
the trainer encodes each distinct prompt once instead of once per step. The files live in
`<prepared>/text/<key>-<hash>/`: `prompts.json` (the sorted distinct prompts) and
`embeddings.npy` (float32 [P, 77, D], row i for prompt i). Each is written under a temporary name
and renamed when complete, and reused when present.
"""

import dataclasses
import json
import os
from typing import Callable

import numpy as np
import tqdm

from livo_jax import files
from livo_jax.data.latents import cache_folder
from livo_jax.data.source import PreferenceSource
from livo_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
  """Cached prompt hidden states (what `train_iterator(text=)` takes)."""
  rows: dict           # prompt -> row of `table`
  table: np.ndarray    # float32 [P, 77, D]

  def get(self, prompt: str) -> np.ndarray:
    if prompt not in self.rows:
      raise DataError(f"prompt {prompt!r} is not in the text cache ({len(self.rows)} prompts): "
                      "it was made for another dataset")
    return np.array(self.table[self.rows[prompt]])


def distinct_prompts(source: PreferenceSource) -> list[str]:
  """The prompts of the aligned records: the only ones the pipeline looks up."""
  return sorted({source.aligned(i)["prompt"] for i in range(len(source))})


def cache_text_embeddings(source: PreferenceSource,
                          encode_fn: Callable[[list[str]], np.ndarray], *, key: str,
                          batch_size: int = 8,
                          log: Callable[[str], None] = print) -> TextEmbeddings:
  """Encodes every distinct prompt of the source once (or reuses the cache) and maps the result.

  Args:
    source: the prepared dataset.
    encode_fn: n prompts -> float32 [n, 77, D], the frozen text encoder's last hidden states.
      It is always called with n = batch_size (the last batch is padded), so a jitted encoder
      compiles once.
    key: identifies the text encoder (its folder and dtype); part of the folder's name.
    batch_size: prompts per encode_fn call.
    log: progress messages.
  """
  folder = cache_folder(source, "text", key)
  prompts_path = os.path.join(folder, "prompts.json")
  table_path = os.path.join(folder, "embeddings.npy")
  prompts = distinct_prompts(source)
  if os.path.isfile(prompts_path) and os.path.isfile(table_path):
    log(f"livo_data: reusing text embeddings in {folder}")
  else:
    log(f"livo_data: caching the text embeddings of {len(prompts)} prompts in {folder}")
    os.makedirs(folder, exist_ok=True)
    table = _encode_all(prompts, encode_fn, batch_size)
    with files.atomic_file(table_path) as tmp, open(tmp, "wb") as f:
      np.save(f, table)
    files.write_json(prompts, prompts_path, indent=None)
  with open(prompts_path) as f:
    cached = json.load(f)
  table = np.load(table_path, mmap_mode="r")
  if cached != prompts or table.dtype != np.float32 or table.ndim != 3 or len(table) != len(
      prompts):
    raise DataError(f"{folder}: holds {len(cached)} prompts and a {table.dtype} "
                    f"{list(table.shape)} table, not float32 [{len(prompts)}, 77, D] for this "
                    "dataset's prompts; delete it to recompute")
  return TextEmbeddings(rows={p: i for i, p in enumerate(prompts)}, table=table)


def _encode_all(prompts: list[str], encode_fn, batch_size: int) -> np.ndarray:
  out = []
  with tqdm.tqdm(total=len(prompts), unit="prompt", desc="Caching text embeddings") as bar:
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      padded = chunk + chunk[-1:] * (batch_size - len(chunk))
      out.append(np.asarray(encode_fn(padded), np.float32)[:len(chunk)])
      bar.update(len(chunk))
  return np.concatenate(out)
