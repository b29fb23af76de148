"""Image preprocessing of LiVO's (diffusers') training script, on PIL and numpy.

torchvision's `Resize(R, BILINEAR)`, `CenterCrop(R)` / `RandomCrop(R)`, `RandomHorizontalFlip`,
`ToTensor`, `Normalize([0.5], [0.5])`, with the same size and offset arithmetic, NHWC out.
"""

import io

import numpy as np
from PIL import Image


def decode(data: bytes) -> Image.Image:
  with Image.open(io.BytesIO(data)) as image:
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Bilinear resize so that the shorter side is `size` (the longer one rounded down)."""
  w, h = image.size
  new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  return image.resize(new, Image.BILINEAR)


def center_offset(image: Image.Image, size: int) -> tuple[int, int]:
  """(top, left) of torchvision's centre crop."""
  w, h = image.size
  return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def random_offset(image: Image.Image, size: int, rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) uniform over every crop that fits."""
  w, h = image.size
  return int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))


def to_pixels(image: Image.Image, size: int, offset: tuple[int, int], flip: bool) -> np.ndarray:
  """Crop at offset, optionally mirror, and scale to float32 [size, size, 3] in [-1, 1]."""
  top, left = offset
  x = np.asarray(image, np.float32)[top:top + size, left:left + size]
  if flip:
    x = x[:, ::-1]
  return np.ascontiguousarray(x / 127.5 - 1.0)
