"""The TFDS builder of a livo_data folder, and `prepare`, which validates and caches its output.

  prepared = prepare("livo_data")   # ~/.cache/livo_jax/datasets/livo_data-<fingerprint>

The prepared folder holds
  livo_data.json          the scene index: each scene's aligned and violating record ids
  livo_data/<version>/    the TFDS dataset (split "train", records in folder and line order)
  latents/                VAE moment caches, when `cache_moments` made some
It is named by a fingerprint of the raw folder (metadata bytes, image sizes and mtimes) and the
options, so an unchanged folder is reused at once and an edited one is prepared anew. It is
written to a temporary sibling and renamed when complete: an interrupted prepare leaves no
folder that a later call would take as ready.

No TensorFlow is needed: TFDS writes and reads array_record files on its own, given features
that are encoded bytes and strings rather than numpy images.
"""

import os
import shutil
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from livo_jax import files
from livo_jax.data import livo_data
from livo_jax.errors import DataError

INDEX = "livo_data.json"   # written last: its presence marks a complete prepared folder
TFDS_NAME = "livo_data"
DEFAULT_CACHE = "~/.cache/livo_jax/datasets"


class LivoData(tfds.core.GeneratorBasedBuilder):
  """The validated records of a livo_data folder: one "train" split, in folder and line order."""

  VERSION = tfds.core.Version(f"{livo_data.FORMAT_VERSION}.0.0")
  # TFDS looks for a checksums file next to a packaged builder through `importlib_resources`, a
  # backport it does not install on Python >= 3.9. We download nothing: there is no such file.
  code_path = None

  def __init__(self, *, scan: livo_data.Scan | None = None, **kwargs):
    self._scan = scan
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = tfds.core.MetadataDict()
    if self._scan is not None:
      metadata.update(train_dir=self._scan.train_dir, skipped=self._scan.skipped,
                      skip_reasons=self._scan.skip_reasons)
    return tfds.core.DatasetInfo(
        builder=self,
        description="LiVO preference data: aligned (label 1) and violating (label 0) images.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded jpg/png
            "prompt": tfds.features.Text(),
            "value": tfds.features.Text(),
            "label": np.int32,
            "scene": np.int32,
            "path": tfds.features.Text(),    # relative to train_dir
            "extra": tfds.features.Text(),   # unknown metadata fields, a JSON object
        }),
        disable_shuffling=True,   # record ids are the scene index's; keep the write order
        metadata=metadata)

  # TFDS prints where it writes, which is prepare's temporary folder; prepare logs the final one.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, r in enumerate(self._scan.records):
      with open(os.path.join(self._scan.train_dir, r.path), "rb") as f:
        image = f.read()
      yield i, dict(image=image, prompt=r.prompt, value=r.value, label=r.label, scene=r.scene,
                    path=r.path, extra=r.extra)


def is_prepared(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, INDEX))


def tfds_dir(prepared_dir: str) -> str:
  """The TFDS dataset folder inside a prepared folder."""
  return os.path.join(prepared_dir, TFDS_NAME, str(LivoData.VERSION))


def prepare(train_dir: str, *, cache_root: str | None = None, skip_bad: bool = False,
            log: Callable[[str], None] = print) -> str:
  """Validates a livo_data folder and writes it as a TFDS dataset; returns the prepared folder.

  Args:
    train_dir: the raw livo_data folder, or a folder `prepare` made (returned as is).
    cache_root: where prepared folders live; default `$LIVO_JAX_CACHE`, else
      ~/.cache/livo_jax/datasets.
    skip_bad: count and leave out bad lines and images (and scenes left without a violating
      image) instead of raising DataError.
    log: progress messages.
  Returns:
    `cache_root/<basename of train_dir>-<fingerprint>`.
  Raises:
    DataError: a bad metadata line or image (naming file and line), a scene with aligned but no
      violating images, or no aligned image at all.
  """
  train_dir = os.path.abspath(os.path.expanduser(train_dir))
  if is_prepared(train_dir):
    log(f"livo_data: {train_dir} is already prepared")
    return train_dir
  if not os.path.isdir(train_dir):
    raise DataError(f"{train_dir}: no such folder")
  cache_root = os.path.expanduser(cache_root or os.environ.get("LIVO_JAX_CACHE") or DEFAULT_CACHE)
  name = os.path.basename(train_dir)
  out = os.path.join(cache_root, f"{name}-{livo_data.fingerprint(train_dir, skip_bad=skip_bad)}")
  if is_prepared(out):
    log(f"livo_data: {train_dir} is unchanged; reusing {out}")
    return out

  log(f"livo_data: preparing {train_dir} -> {out}")
  scan = livo_data.scan(train_dir, skip_bad=skip_bad, log=log)
  os.makedirs(cache_root, exist_ok=True)
  files.remove_leftovers(cache_root)   # of prepares that were killed
  try:
    with files.atomic_folder(out) as tmp:
      _write(scan, tmp)
  except FileExistsError:
    if not is_prepared(out):   # else another process prepared the same folder first
      raise
  log(f"livo_data: {scan.num_aligned} aligned images, {len(scan.records)} images in "
      f"{len(scan.scenes)} scenes, {scan.skipped} skipped")
  return out


def _write(scan: livo_data.Scan, folder: str) -> None:
  """The TFDS dataset, then the scene index that marks the folder complete."""
  downloads = os.path.join(folder, ".downloads")  # TFDS makes one even with nothing to fetch
  LivoData(scan=scan, data_dir=folder, file_format="array_record").download_and_prepare(
      download_dir=downloads)
  shutil.rmtree(downloads, ignore_errors=True)
  scenes = [{"metadata": meta, "aligned": [], "violating": []} for meta in scan.scenes]
  for i, r in enumerate(scan.records):
    scenes[r.scene]["aligned" if r.label else "violating"].append(i)
  files.write_json({"format_version": livo_data.FORMAT_VERSION, "train_dir": scan.train_dir,
                    "num_records": len(scan.records), "scenes": scenes},
                   os.path.join(folder, INDEX), indent=None)
