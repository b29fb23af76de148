"""The human-readable side of an evaluation: image grids and `report.md`."""

import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image


def image_grid(images: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
  """uint8 [H, W, 3] images of one size -> one uint8 grid image, row by row."""
  if not len(images):
    raise ValueError("no images for a grid")
  rows = math.ceil(len(images) / columns)
  columns = min(columns, len(images))
  h, w, c = images[0].shape
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid


def save_grid(images: Sequence[np.ndarray], path: str, columns: int = 4) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image_grid(images, columns)).save(path)


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(path: str, title: str, summary: Mapping[str, Mapping[str, float]],
                 lower_is_better: Mapping[str, bool], settings: Mapping[str, object],
                 grids: Sequence[tuple[str, str, str]]) -> None:
  """Writes `report.md`: the settings, a metrics table (one column per variant), grids.

  Args:
    summary: variant -> metric -> value.
    lower_is_better: metric -> direction, shown in the table.
    settings: what was run (prompts file, images per prompt, seed, ...).
    grids: (variant, prompt, path relative to the report) per grid image.
  """
  variants = list(summary)
  metrics = sorted({m for values in summary.values() for m in values})
  lines = [f"# {title}", "", "| setting | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in settings.items()]
  lines += ["", "| metric | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants)]
  for metric in metrics:
    arrow = {True: " (lower is better)", False: " (higher is better)"}.get(
        lower_is_better.get(metric), "")
    cells = [_fmt(summary[v].get(metric)) for v in variants]
    lines.append(f"| {metric}{arrow} | " + " | ".join(cells) + " |")
  if grids:
    lines += ["", "## Samples", ""]
    for variant, prompt, grid in grids:
      lines += [f"**{variant}**: {prompt}", "", f"![{variant}: {prompt}]({grid})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
