"""`import` and `export` stream: they hold a tensor (or a small group), never the model.

tracemalloc sees what numpy allocates (numpy reports its arrays to it) and Python's own objects,
not tensorstore's C++ buffers. Here, with 7.3 MB of weights whose largest file has 0.9 MB, a
conversion that builds the model (as both did before they streamed) peaks at 11.1 MB traced
(import) and 7.4 MB (export); streaming, at 2.0 and 0.9 MB. bench/conversion_memory.py
measures the resident memory of SD 1.5's conversion.
"""

import glob
import importlib
import os
import tracemalloc

import numpy as np
import pytest

from tiny_sd import torch_component
from livo_jax import weights

# What a conversion allocates besides its tensor: jax's tracing of the abstract model, orbax's
# and tensorstore's bookkeeping in Python, the key lists.
MARGIN = 2 * 2**20


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
  """A text encoder of 7.3 MB in 9 shards of at most 1 MB, with the index transformers writes."""
  folder = str(tmp_path_factory.mktemp("sharded") / "text_encoder")
  torch_component("text_encoder", hidden_size=192, intermediate_size=768,
                  num_hidden_layers=4).save_pretrained(folder, max_shard_size="1MB")
  return folder


def traced_peak(convert) -> int:
  for module in ("orbax.checkpoint", "tensorstore"):   # the conversion imports them at first use
    importlib.import_module(module)
  tracemalloc.start()
  try:
    convert()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def stored_tensors(paths):
  tensors = weights.CLIP_TEXT.normalise_keys(weights.tensors.open_all(paths))
  return {key: np.asarray(value) for key, value in tensors.items()}


def test_import_and_export_hold_a_file_not_the_model(sharded_folder, tmp_path, monkeypatch):
  # `import` writes in groups of 256 MB, 6% of SD 1.5's 4.3 GB; here of 512 KB, 7% of 7.3 MB.
  monkeypatch.setattr(weights.tensors, "WRITE_GROUP_BYTES", 2**19)
  shards = sorted(glob.glob(os.path.join(sharded_folder, "*.safetensors")))
  largest, total = max(map(os.path.getsize, shards)), sum(map(os.path.getsize, shards))
  bound = largest + MARGIN
  assert len(shards) >= 6 and total > 2 * bound   # so that holding the model fails
  flax_dir, torch_dir = str(tmp_path / "flax"), str(tmp_path / "torch")

  peak = traced_peak(lambda: weights.conversion.import_folder(sharded_folder, flax_dir))
  assert peak < bound, f"import: {peak:,} bytes traced; the largest file has {largest:,}"
  peak = traced_peak(lambda: weights.conversion.export_folder(flax_dir, torch_dir))
  assert peak < bound, f"export: {peak:,} bytes traced; the largest file has {largest:,}"

  original = stored_tensors(shards)
  exported = stored_tensors([os.path.join(torch_dir, "model.safetensors")])
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    assert (value.dtype, value.shape) == (exported[key].dtype, exported[key].shape), key
    assert value.tobytes() == exported[key].tobytes(), key
