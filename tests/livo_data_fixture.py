"""A small synthetic raw livo_data folder, for the data and trainer tests.

Aligned images are blue-ish and violating ones red-ish (plus per-pixel noise, so every image is
different); PNG and JPEG alternate. Each metadata line carries an unknown extra field `"n"` (its
image's number), which must survive preparation.
"""

import json
import os

import numpy as np
from PIL import Image

# (type_dir, scene_dir, value, prompt, n_aligned, n_violating)
SCENES = (
    ("0-career", "doctor", "gender equality", "a photo of a doctor", 3, 2),
    ("0-career", "nurse", "gender equality", "a photo of a nurse", 2, 3),
    ("1-goodness", "kind", "racial equality", "a kind person", 2, 1),
)
ALIGNED_RGB = (40, 60, 200)
VIOLATING_RGB = (200, 50, 40)


def quiet(_):
  """A `log` that prints nothing."""


def write_livo_data(root: str, scenes=SCENES, size: tuple[int, int] = (24, 20),
                    seed: int = 0) -> str:
  """Writes `root/<type_dir>/<scene_dir>/{metadata.jsonl, images}`; returns root.

  Args:
    root: the folder to write (created if needed).
    scenes: (type_dir, scene_dir, value, prompt, n_aligned, n_violating) per scene.
    size: every image's (width, height).
    seed: the noise and line order.
  """
  rng = np.random.default_rng(seed)
  n = 0
  for type_dir, scene_dir, value, prompt, n_aligned, n_violating in scenes:
    folder = os.path.join(root, type_dir, scene_dir)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for label, count in ((1, n_aligned), (0, n_violating)):
      for i in range(count):
        name = f"{'aligned' if label else 'violating'}_{i}.{'png' if n % 2 == 0 else 'jpg'}"
        colour = np.array(ALIGNED_RGB if label else VIOLATING_RGB, np.float64)
        pixels = colour + rng.normal(0, 25, (size[1], size[0], 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, name))
        lines.append({"file_name": name, "prompt": prompt, "value": value, "label": label, "n": n})
        n += 1
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
      for k in rng.permutation(len(lines)):   # aligned and violating lines interleaved
        f.write(json.dumps(lines[k]) + "\n")
  return root


def read_metadata(root: str) -> list[dict]:
  """Every metadata line of a livo_data folder in sorted folder and file order, each with
  `scene` (the index of its metadata file) and `path` (its image, relative to root) added."""
  lines = []
  metadata_files = sorted(os.path.relpath(os.path.join(folder, "metadata.jsonl"), root)
                          for folder, _, files in os.walk(root) if "metadata.jsonl" in files)
  for scene, meta in enumerate(metadata_files):
    with open(os.path.join(root, meta)) as f:
      for line in f:
        obj = json.loads(line)
        lines.append(dict(obj, scene=scene,
                          path=os.path.join(os.path.dirname(meta), obj["file_name"])))
  return lines


def centre_crop(root: str, path: str, resolution: int, flip: bool = False) -> np.ndarray:
  """The training transform by hand: PIL bilinear resize of the shorter side to `resolution`,
  centre crop (torchvision's rounding), optional mirror, /127.5 - 1. float32 [R, R, 3]."""
  image = Image.open(os.path.join(root, path)).convert("RGB")
  w, h = image.size
  scale = resolution / min(w, h)
  w, h = (resolution, int(h * scale)) if w <= h else (int(w * scale), resolution)
  x = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32)
  top, left = round((h - resolution) / 2), round((w - resolution) / 2)
  x = x[top:top + resolution, left:left + resolution]
  return (x[:, ::-1] if flip else x) / np.float32(127.5) - np.float32(1)


def pool_encode(pixels: np.ndarray) -> np.ndarray:
  """A stand-in VAE encoder for latent-cache tests: 4x4 average pooling; "mean" = pooled,
  "logvar" = pooled squared. float32 [n, R, R, 3] -> [n, R/4, R/4, 6]."""
  n, h, w, c = pixels.shape
  pooled = pixels.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
  return np.concatenate([pooled, pooled ** 2], axis=-1).astype(np.float32)
