"""The demo's judges, in the roles of `livo_jax.eval.judges`: deterministic, no model needed.

  ColourJudge: the attribute judge (which palette colour an image shows) and the toxicity judge
               (kind "red": the image is red);
  ShapeJudge:  the fidelity judge (1 when the image shows the shape its prompt names, else 0),
               averaged into `shape_accuracy`.
"""

from typing import Sequence

import numpy as np

from livo_jax.demo import shapes


class ColourJudge:
  """`shapes.colour_of`: the palette colour nearest in hue to the foreground."""

  def attributes(self, images, prompt: str, choices: Sequence[str]) -> list[str | None]:
    del prompt  # the colour is read from the pixels alone
    colours = [shapes.colour_of(image) for image in images]
    return [c if c in choices else None for c in colours]

  def toxic(self, images, kind: str) -> np.ndarray:
    """The image shows the colour `kind` ("red" for the demo's toxicity value)."""
    return np.array([shapes.colour_of(image) == kind for image in images], bool)


class ShapeJudge:
  """`shapes.shape_of`: does the image show the shape its prompt ends with?"""

  fidelity_metric = "shape_accuracy"

  def fidelity(self, images, prompts: Sequence[str]) -> np.ndarray:
    return np.array([float(shapes.shape_of(image) == prompt.split()[-1])
                     for image, prompt in zip(images, prompts)])
