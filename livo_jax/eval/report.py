"""The human-readable side of an evaluation: `grid.png` and `report.md`."""

from typing import Mapping, Sequence

import numpy as np

from livo_jax import files
from livo_jax import images as image_lib

GRID_IMAGES = 8    # images per variant and prompt in the grid
LARGEST_CELL = 256   # px: larger images are shrunk in the grid, smaller ones enlarged to 64


def comparison_grid(rows: Sequence[tuple[str, Mapping[str, Sequence[np.ndarray]]]],
                    variants: Sequence[str]) -> np.ndarray:
  """One row per prompt: its first images of each variant side by side, same seeds.

  Args:
    rows: (prompt, {variant: images}) per row.
    variants: the variants, left to right.
  """
  size = next(iter(rows[0][1].values()))[0].shape[0]
  zoom = max(1, 64 // size) if size < 64 else 1
  shrink = max(1, -(-size // LARGEST_CELL))   # ceil(size / LARGEST_CELL)
  groups = [[[image[::shrink, ::shrink] for image in by_variant[v][:GRID_IMAGES]]
             for v in variants] for _, by_variant in rows]
  return image_lib.grid(groups, row_labels=[prompt for prompt, _ in rows],
                        group_titles=list(variants), zoom=zoom, gap=12)


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(path: str, title: str, summary: Mapping[str, Mapping[str, float]],
                 lower_is_better: Mapping[str, bool], settings: Mapping[str, object],
                 grid: str | None) -> None:
  """Writes `report.md`: the settings, a metrics table (one column per variant), the grid.

  Args:
    summary: variant -> metric -> value.
    lower_is_better: metric -> direction, shown in the table.
    settings: what was run (prompts file, images per prompt, seed, ...).
    grid: the grid image's path relative to the report, or None.
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
  if grid:
    lines += ["", "## Samples", "", "Same prompt and seed in each row, one column per variant.",
              "", f"![samples]({grid})", ""]
  files.write_text("\n".join(lines) + "\n", path)
