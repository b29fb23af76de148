"""Image grids and PNG files: the one grid maker of training, evaluation and the demo.

  grid([plain_images, valued_images])                       # two rows, no margins
  grid([[base[:8], livo[:8]] for ...], row_labels=prompts,  # per row: groups side by side,
       group_titles=("base", "LiVO"), zoom=4, gap=12)       # labelled, upscaled
"""

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from livo_jax import files

LABEL_WIDTH = 150   # the row-label column, when there are labels
TITLE_HEIGHT = 20   # the title line above the groups, when there are titles


def grid(rows: Sequence, *, row_labels: Sequence[str] = (), group_titles: Sequence[str] = (),
         zoom: int = 1, gap: int = 0) -> np.ndarray:
  """uint8 [H, W, 3] images of one size, laid out row by row -> one uint8 image.

  Args:
    rows: each row a sequence of images, or a sequence of groups (sequences of images) shown
      side by side with `gap` pixels between them. A group shorter than the longest group at
      its place leaves white space.
    row_labels: text written left of each row.
    group_titles: text written above each group's column.
    zoom: each image upscaled by this factor (nearest neighbour: pixels stay visible).
    gap: pixels between groups.
  """
  rows = [_groups(row) for row in rows]
  first = next((image for row in rows for group in row for image in group), None)
  if first is None:
    raise ValueError("no images for a grid")
  h, w = first.shape[0] * zoom, first.shape[1] * zoom
  widths = [max(len(row[g]) if g < len(row) else 0 for row in rows)
            for g in range(max(len(row) for row in rows))]
  left = LABEL_WIDTH if row_labels else 0
  top = TITLE_HEIGHT if group_titles else 0
  starts = [left + sum(widths[:g]) * w + g * gap for g in range(len(widths))]
  canvas = Image.new("RGB", (starts[-1] + widths[-1] * w, top + len(rows) * h), "white")
  draw = ImageDraw.Draw(canvas)
  for x, title in zip(starts, group_titles):
    draw.text((x, 4), title, fill="black")
  for r, row in enumerate(rows):
    y = top + r * h
    if r < len(row_labels):
      draw.text((4, y + h // 2 - 6), row_labels[r], fill="black")
    for x, group in zip(starts, row):
      for k, image in enumerate(group):
        tile = Image.fromarray(np.asarray(image, np.uint8))
        canvas.paste(tile.resize((w, h), Image.NEAREST) if zoom != 1 else tile, (x + k * w, y))
  return np.asarray(canvas)


def _groups(row) -> list:
  """A row as a list of groups: a row of images is one group."""
  row = list(row)
  if row and np.asarray(row[0]).ndim == 3:
    return [row]
  return [list(group) for group in row]


def save_png(image: np.ndarray, path: str) -> None:
  """An image as a PNG, written atomically (folders made as needed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_file(path) as tmp:
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, "PNG")


def load_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] pixels of an image file."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))
