"""Latent cache: every image's VAE moments, computed once and memory-mapped.

  moments = cache_moments(source, encode, resolution=512, random_flip=True, key="sd15/vae")
  it = train_iterator(source, ..., moments=moments)   # moments_w/moments_l instead of pixels

Images are centre-cropped (a random crop cannot be cached) and, with random_flip, encoded a second
time mirrored, since a VAE's moments of a mirrored image are not the mirrored moments. The
arrays live in `<prepared>/latents/<key>-<hash>-<resolution>px/{plain,flipped}.npy`, float32
[num_records, r, r, 2C] (mean and logvar on the last axis), indexed by record id. Each file is
written under a temporary name and renamed when complete, and reused when present.
"""

import contextlib
import dataclasses
import hashlib
import os
import re
from typing import Callable

import numpy as np
import tqdm

from livo_jax import files
from livo_jax.data import transforms
from livo_jax.data.source import PreferenceSource
from livo_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Moments:
  """Cached VAE moments of every record of a source (what `train_iterator(moments=)` takes)."""
  plain: np.ndarray            # [num_records, r, r, 2C] float32, of the centre crops
  flipped: np.ndarray | None   # the same of the mirrored crops; None without random_flip
  resolution: int              # the image size they were encoded at

  def get(self, record_id: int, flip: bool) -> np.ndarray:
    return np.array((self.flipped if flip else self.plain)[record_id])


def cache_folder(source: PreferenceSource, kind: str, key: str, suffix: str = "") -> str:
  """`<prepared>/<kind>/<readable key>-<key hash><suffix>`: one folder per cached encoder."""
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[-48:]
  digest = hashlib.sha256(key.encode()).hexdigest()[:8]
  return os.path.join(source.directory, kind, f"{readable}-{digest}{suffix}")


def cache_moments(source: PreferenceSource, encode_fn: Callable[[np.ndarray], np.ndarray], *,
                  resolution: int, random_flip: bool, key: str, batch_size: int = 8,
                  log: Callable[[str], None] = print) -> Moments:
  """Encodes every image of the source once (or reuses the cache) and memory-maps the result.

  Args:
    source: the prepared dataset.
    encode_fn: float32 pixels [n, R, R, 3] in [-1, 1] -> float32 moments [n, r, r, 2C]. It is
      always called with n = batch_size (the last batch is padded), so a jitted encoder
      compiles once.
    resolution: R.
    random_flip: also cache the mirrored images' moments.
    key: identifies the encoder (e.g. the VAE folder); part of the cache folder's name.
    batch_size: images per encode_fn call.
    log: progress messages.
  """
  folder = cache_folder(source, "latents", key, f"-{resolution}px")
  variants = ("plain", "flipped") if random_flip else ("plain",)
  paths = {v: os.path.join(folder, f"{v}.npy") for v in variants}
  missing = [v for v in variants if not os.path.isfile(paths[v])]
  if missing:
    log(f"livo_data: caching VAE moments ({', '.join(missing)}) of {source.num_records} images "
        f"in {folder}")
    os.makedirs(folder, exist_ok=True)
    _encode_all(source, encode_fn, resolution, batch_size, {v: paths[v] for v in missing})
  else:
    log(f"livo_data: reusing VAE moments in {folder}")
  arrays = {v: np.load(paths[v], mmap_mode="r") for v in variants}
  for v, a in arrays.items():
    if a.dtype != np.float32 or a.ndim != 4 or len(a) != source.num_records:
      raise DataError(f"{paths[v]}: expected float32 [{source.num_records}, r, r, 2C], "
                       f"got {a.dtype} {list(a.shape)}; delete it to recompute")
  return Moments(plain=arrays["plain"], flipped=arrays.get("flipped"), resolution=resolution)


def _encode_all(source, encode_fn, resolution, batch_size, paths):
  """Writes the moments of each variant in `paths`, each file renamed in place when complete."""
  with contextlib.ExitStack() as stack:
    tmp = {v: stack.enter_context(files.atomic_file(p)) for v, p in paths.items()}
    out = {}
    with tqdm.tqdm(total=source.num_records, unit="img", desc="Caching VAE moments") as bar:
      for start in range(0, source.num_records, batch_size):
        ids = range(start, min(start + batch_size, source.num_records))
        pixels = np.stack([_centre_crop(source.record(i)["image"], resolution) for i in ids])
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(ids), 0)])
        for v in paths:
          x = pixels[:, :, ::-1] if v == "flipped" else pixels
          moments = np.asarray(encode_fn(np.ascontiguousarray(x)), np.float32)[:len(ids)]
          if v not in out:
            out[v] = np.lib.format.open_memmap(
                tmp[v], mode="w+", dtype=np.float32,
                shape=(source.num_records,) + moments.shape[1:])
          out[v][start:start + len(ids)] = moments
        bar.update(len(ids))
    for array in out.values():
      array.flush()
    out.clear()


def _centre_crop(data: bytes, resolution: int) -> np.ndarray:
  image = transforms.resize_shorter_side(transforms.decode(data), resolution)
  return transforms.to_pixels(image, resolution, transforms.center_offset(image, resolution),
                              flip=False)
