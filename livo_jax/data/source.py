"""`PreferenceSource`: random access to a prepared livo_data folder.

Item i is the i-th aligned record (so `len` is the number of training samples, as grain's
`MapDataset.source` expects); `violating(scene)` lists the record ids to pair it with.
"""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from livo_jax.data import tfds_dataset
from livo_jax.errors import DataError


class PreferenceSource:
  """The records of a folder made by `prepare`.

  A record is a dict: image (encoded bytes), prompt, value, label (1 aligned, 0 violating),
  scene (index), path (relative to the raw folder), extra (the line's unknown fields, a dict)
  and record (its id).
  """

  def __init__(self, prepared_dir: str):
    index = os.path.join(prepared_dir, tfds_dataset.INDEX)
    if not os.path.isfile(index):
      raise DataError(f"{prepared_dir}: not a prepared livo_data folder (no "
                      f"{tfds_dataset.INDEX}); run livo_jax.data.prepare on the raw folder")
    with open(index) as f:
      scenes = json.load(f)["scenes"]
    self.directory = prepared_dir
    dataset = tfds.builder_from_directory(tfds_dataset.tfds_dir(prepared_dir))
    self._records = dataset.as_data_source(split="train")
    self._metadata = dataset.info.metadata
    self._aligned = np.array([i for s in scenes for i in s["aligned"]], np.int64)
    self._violating = [np.array(s["violating"], np.int64) for s in scenes]

  def __len__(self) -> int:
    return len(self._aligned)

  def __getitem__(self, i: int) -> dict:
    return self.aligned(i)

  @property
  def num_scenes(self) -> int:
    return len(self._violating)

  @property
  def num_records(self) -> int:
    """Aligned and violating images together."""
    return len(self._records)

  @property
  def skipped(self) -> int:
    """Metadata lines `prepare(skip_bad=True)` left out."""
    return int(self._metadata.get("skipped", 0))

  @property
  def skip_reasons(self) -> list[str]:
    """The first few reasons for `skipped`."""
    return list(self._metadata.get("skip_reasons", []))

  def aligned(self, i: int) -> dict:
    """The i-th aligned record, 0 <= i < len(self)."""
    return self.record(int(self._aligned[i]))

  def violating(self, scene: int) -> np.ndarray:
    """The record ids of the scene's violating images."""
    return self._violating[scene]

  def record(self, record_id: int) -> dict:
    raw = self._records[record_id]
    return dict(image=raw["image"], prompt=raw["prompt"].decode(), value=raw["value"].decode(),
                label=int(raw["label"]), scene=int(raw["scene"]), path=raw["path"].decode(),
                extra=json.loads(raw["extra"]), record=record_id)
