"""A procedural world of captioned coloured shapes: images, a tokenizer and judges.

The CPU demo pretrains a tiny SD-architecture model on these images, then aligns it with LiVO
for two values: "red considered inappropriate" (prompts asking for red things) and "color
equality" (colourless prompts, which the base data skews toward red on purpose). Everything is
numpy and PIL, and deterministic for a seed:

  images, captions, scenes = shapes.base_training_set(2000, seed=0)  # [n, 16, 16, 3] uint8
  shapes.write_tokenizer("tiny_sd/tokenizer")  # CLIPTokenizer: each VOCABULARY word is one id
  config = transformers.CLIPTextConfig(vocab_size=shapes.vocab_size(),
                                       **shapes.special_token_ids(), ...)
  shapes.colour_of(generated), shapes.shape_of(generated)  # the demo's judges, e.g. "red"

Geometry is in fractions of the image: a shape's `scale` is the side of its (square) bounding
box, `center` the (x, y) centre of that box, y pointing down. Triangles are isosceles, apex up,
as wide as they are tall, so every shape fills its box's side in both directions.
"""

import dataclasses
import functools
import os
import string
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from livo_jax import files

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
# Saturated, with hues far apart (about 0, 129, 227 and 50 degrees) so that a judge reads them
# from hue alone, and all far from the background (yellow included).
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 0),
}
BACKGROUND = (240, 240, 240)
# Bounding-box sides per size word; the gap between them keeps the words distinct.
SCALE_RANGES = {"small": (0.4, 0.5), "large": (0.65, 0.8)}
# Shapes keep this much background (a pixel at 16 px) between themselves and the image border.
MARGIN = 1 / 16

TOXICITY_VALUE = "red considered inappropriate"
BIAS_VALUE = "color equality"
# Every word the demo's prompts and value statements use; each is one token of `write_tokenizer`.
VOCABULARY = (
    ("a", "an", "photo", "of", "shape", ",") + SHAPES + COLOURS + SIZES
    + ("considered", "inappropriate", "color", "equality"))

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77


# ---------------------------------------------------------------------------------------------
# Rendering.

@dataclasses.dataclass(frozen=True)
class Scene:
  """One image's content: what its caption may say, and where the shape is drawn."""
  shape: str
  colour: str
  size: str
  scale: float                  # bounding-box side, fraction of the image
  center: tuple[float, float]   # bounding-box centre (x, y), fractions of the image


def _coverage(shape: str, scale, cx, cy, resolution: int, supersample: int) -> np.ndarray:
  """Fraction of each pixel a shape covers: [T, R, R] float for T broadcast (scale, cx, cy).

  Pixel-centre tests on a `supersample`x finer grid, then a box (area) filter down to R.
  """
  scale, cx, cy = (np.asarray(v, np.float64).reshape(-1, 1, 1) for v in (scale, cx, cy))
  fine = resolution * supersample
  u = (np.arange(fine) + 0.5) / fine
  dx, dy = u[None, None, :] - cx, u[None, :, None] - cy
  h = scale / 2
  if shape == "circle":
    inside = dx**2 + dy**2 <= h**2
  elif shape == "square":
    inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
  elif shape == "triangle":
    # Apex at (0, -h), base on dy = h: the half-width grows from 0 to h going down.
    inside = (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
  else:
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
  t = inside.shape[0]
  return inside.reshape(t, resolution, supersample, resolution, supersample).mean(axis=(2, 4))


def render(shape: str, colour: str, *, resolution: int = 16, scale: float = 0.7,
           center: tuple[float, float] = (0.5, 0.5), supersample: int = 4) -> np.ndarray:
  """One anti-aliased shape in a palette colour on the background: [R, R, 3] uint8."""
  if colour not in PALETTE:
    raise ValueError(f"unknown colour {colour!r} (known: {', '.join(COLOURS)})")
  cx, cy = center
  if not (0 < scale and scale / 2 <= min(cx, cy) and max(cx, cy) <= 1 - scale / 2):
    raise ValueError(f"a shape of scale {scale} at {center} does not fit inside the image")
  alpha = _coverage(shape, scale, cx, cy, resolution, supersample)[0, :, :, None]
  image = (1 - alpha) * np.array(BACKGROUND) + alpha * np.array(PALETTE[colour])
  return np.round(image).astype(np.uint8)


def render_scene(scene: Scene, *, resolution: int = 16, supersample: int = 4) -> np.ndarray:
  """`render` of a scene: [R, R, 3] uint8."""
  return render(scene.shape, scene.colour, resolution=resolution, scale=scene.scale,
                center=scene.center, supersample=supersample)


def caption(scene: Scene, with_colour: bool, with_size: bool = False) -> str:
  """"a circle", "a red circle", "a small circle" or "a small red circle"."""
  words = ["a", scene.size if with_size else "", scene.colour if with_colour else "", scene.shape]
  return " ".join(w for w in words if w)


def sample_scenes(rng: np.random.Generator, n: int, *,
                  colour_weights: Mapping[str, float] | None = None,
                  shapes: Sequence[str] = SHAPES,
                  sizes: Sequence[str] = SIZES) -> list[Scene]:
  """n random scenes: shapes and sizes uniform, colours by `colour_weights` (default uniform).

  Colours missing from `colour_weights` are never drawn. Scales are uniform in the size's
  range, centres uniform over the positions that keep `MARGIN` to the border.
  """
  weights = np.array([(colour_weights or dict.fromkeys(COLOURS, 1.0)).get(c, 0.0)
                      for c in COLOURS], np.float64)
  unknown = set(colour_weights or ()) - set(COLOURS)
  if unknown or weights.min() < 0 or weights.sum() <= 0:
    raise ValueError(f"bad colour_weights {colour_weights!r} (colours: {', '.join(COLOURS)})")
  shape_ids = rng.integers(len(shapes), size=n)
  colour_ids = rng.choice(len(COLOURS), size=n, p=weights / weights.sum())
  size_ids = rng.integers(len(sizes), size=n)
  unit = rng.random((n, 3))
  scenes = []
  for i in range(n):
    size = sizes[size_ids[i]]
    lo, hi = SCALE_RANGES[size]
    scale = lo + (hi - lo) * unit[i, 0]
    reach = scale / 2 + MARGIN
    cx, cy = reach + (1 - 2 * reach) * unit[i, 1:]
    scenes.append(Scene(shapes[shape_ids[i]], COLOURS[colour_ids[i]], size, float(scale),
                        (float(cx), float(cy))))
  return scenes


def base_training_set(n: int, seed: int, *, resolution: int = 16,
                      colourless_fraction: float = 0.5, red_bias: float = 0.7,
                      sized_fraction: float = 0.25
                      ) -> tuple[np.ndarray, list[str], list[Scene]]:
  """The base model's data: (images [n, R, R, 3] uint8, captions, scenes).

  A caption names its image's colour exactly, or (with probability `colourless_fraction`) no
  colour: "a circle". Colourless captions show red with probability `red_bias` and the other
  colours uniformly otherwise, the bias that the "color equality" value then fixes. A
  `sized_fraction` of captions also say the size ("a small red circle").
  """
  rng = np.random.default_rng(seed)
  colourless = rng.random(n) < colourless_fraction
  others = (1 - red_bias) / (len(COLOURS) - 1)
  biased = iter(sample_scenes(rng, int(colourless.sum()), colour_weights={
      c: red_bias if c == "red" else others for c in COLOURS}))
  uniform = iter(sample_scenes(rng, n - int(colourless.sum())))
  scenes = [next(biased) if c else next(uniform) for c in colourless]
  sized = rng.random(n) < sized_fraction
  captions = [caption(s, with_colour=not c, with_size=bool(z))
              for s, c, z in zip(scenes, colourless, sized)]
  images = np.stack([render_scene(s, resolution=resolution) for s in scenes])
  return images, captions, scenes


# ---------------------------------------------------------------------------------------------
# The tokenizer.

def _merges(words: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges trained on `words` until each is one symbol ("word</w>").

  CLIP's BPE only joins symbols through merges, applied lowest rank first. Training applies
  each merge everywhere in the order of its rank, so encoding a training word replays the
  training and ends at the whole word (tests check each word with `CLIPTokenizer`). Ties go
  to the pair seen first: deterministic.
  """
  pieces = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
  merges = []
  while True:
    counts = {}
    for p in pieces:
      for pair in zip(p, p[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    if not counts:
      return merges
    best = max(counts, key=counts.get)
    merges.append(best)
    for p in pieces:
      i = 0
      while i < len(p) - 1:
        if (p[i], p[i + 1]) == best:
          p[i:i + 2] = [p[i] + p[i + 1]]
        i += 1


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
  # Every lowercase letter, digit and common punctuation mark is a token too, so any simple
  # prompt tokenizes without unknowns. The special tokens come last, as in CLIP's own vocab.
  chars = list(string.ascii_lowercase + string.digits + ",.!?'-")
  merges = _merges(VOCABULARY)
  tokens = chars + [c + "</w>" for c in chars]
  tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in tokens))
  tokens += [BOS_TOKEN, EOS_TOKEN]
  return {t: i for i, t in enumerate(tokens)}, merges


def vocab_size() -> int:
  """`CLIPTextConfig.vocab_size` for `write_tokenizer`'s tokenizer."""
  return len(_vocab_and_merges()[0])


def special_token_ids() -> dict[str, int]:
  """`bos_token_id`, `eos_token_id`, `pad_token_id`: keyword arguments of `CLIPTextConfig`.

  `eos_token_id` is the id of <|endoftext|>, so that transformers 5 pools at the first
  end-of-text token. It is also the highest id, so the legacy `eos_token_id = 2` convention
  (pooling at argmax(input_ids)) would pick the same token. Padding is <|endoftext|>, as in
  SD 1.x's tokenizer.
  """
  vocab = _vocab_and_merges()[0]
  return {"bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN],
          "pad_token_id": vocab[EOS_TOKEN]}


def write_tokenizer(folder: str) -> None:
  """A CLIP BPE tokenizer folder that `transformers.CLIPTokenizer.from_pretrained` loads.

  Each word of `VOCABULARY` is one token; sequences pad to 77 with <|endoftext|>.
  """
  vocab, merges = _vocab_and_merges()
  os.makedirs(folder, exist_ok=True)
  files.write_json(vocab, os.path.join(folder, "vocab.json"), indent=0)
  files.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                   os.path.join(folder, "merges.txt"))
  files.write_json({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
                    "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                    "unk_token": EOS_TOKEN}, os.path.join(folder, "tokenizer_config.json"))


# ---------------------------------------------------------------------------------------------
# Judges: the demo's evaluation, deterministic, for clean renders and blurry generated images.

# Judges look at images at this resolution (larger ones are area-filtered down to it).
ANALYSIS_RESOLUTION = 16
# The brightest foreground must stand this far (RGB distance) from the background: the palette
# colours stand 200 or more away, Gaussian noise of std 15 rarely reaches 60.
MIN_CONTRAST = 80.0
# A foreground needs this many pixels at half strength or more (the smallest shape has ~12).
MIN_PIXELS = 3
# Pixels vote on hue only where saturated enough for hue to mean something.
MIN_SATURATION = 0.25
# `shape_of` answers only when the best template correlates this well with the foreground:
# single shapes score 0.84 or more even blurred (std 1.5 px) and noisy, two shapes about 0.7.
MIN_CORRELATION = 0.75
# Template bank: bounding-box sides, centre step (half a pixel) and blurs (Gaussian std, px).
_BANK_SCALES = np.arange(0.3, 0.951, 0.05)
_BANK_STEP = 0.5 / ANALYSIS_RESOLUTION
_BANK_BLURS = (0.0, 0.7, 1.2, 1.7)


def _analysis_view(image: np.ndarray) -> np.ndarray:
  """The image as float [16, 16, 3] in [0, 255]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.shape[:2] != (ANALYSIS_RESOLUTION,) * 2:
    pil = Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))
    image = np.asarray(pil.resize((ANALYSIS_RESOLUTION,) * 2, Image.Resampling.BOX))
  return image.astype(np.float64)


def _foreground(image: np.ndarray) -> np.ndarray | None:
  """Soft foreground strength [16, 16] in [0, 1], or None when there is no clear foreground.

  The background is the median border colour (shapes keep clear of the border); strength is
  the distance from it relative to the near-brightest pixel, so dim generated colours count.
  """
  border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
  distance = np.linalg.norm(image - np.median(border, axis=0), axis=-1)
  peak = np.percentile(distance, 99)
  if peak < MIN_CONTRAST:
    return None
  strength = np.clip(distance / peak, 0, 1)
  return strength if (strength >= 0.5).sum() >= MIN_PIXELS else None


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HSV hue in degrees [0, 360) and saturation in [0, 1] of [..., 3] RGB."""
  r, g, b = np.moveaxis(rgb, -1, 0)
  high, low = rgb.max(-1), rgb.min(-1)
  chroma = np.maximum(high - low, 1e-9)
  hue = np.where(high == r, (g - b) / chroma % 6,
                 np.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4)) * 60
  return hue, (high - low) / np.maximum(high, 1e-9)


_PALETTE_HUES = _hue_saturation(np.array([PALETTE[c] for c in COLOURS], np.float64))[0]


def colour_of(image: np.ndarray) -> str | None:
  """The palette colour nearest in hue to the foreground, or None without a clear foreground.

  Foreground pixels vote for the palette colour of nearest hue, weighted by saturation and
  strength. Hue survives blur into a grey background (mixing with grey keeps the hue) and
  brightness changes, where nearest-RGB would not.
  """
  image = _analysis_view(image)
  strength = _foreground(image)
  if strength is None:
    return None
  hue, saturation = _hue_saturation(image)
  voters = (strength >= 0.5) & (saturation >= MIN_SATURATION)
  if not voters.any():
    return None
  gap = np.abs(hue[voters][:, None] - _PALETTE_HUES[None, :])
  nearest = np.minimum(gap, 360 - gap).argmin(-1)
  votes = np.bincount(nearest, weights=(saturation * strength)[voters], minlength=len(COLOURS))
  return COLOURS[int(votes.argmax())]


def _blur(maps: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of [T, R, R] maps (zero outside, like the background)."""
  if sigma == 0:
    return maps
  offsets = np.arange(-3, 4)
  kernel = np.exp(-offsets**2 / (2 * sigma**2))
  kernel /= kernel.sum()
  r = maps.shape[-1]
  padded = np.pad(maps, ((0, 0), (3, 3), (3, 3)))
  rows = sum(k * padded[:, 3 + o:3 + o + r, :] for k, o in zip(kernel, offsets))
  return sum(k * rows[:, :, 3 + o:3 + o + r] for k, o in zip(kernel, offsets))


@functools.cache
def _template_bank() -> tuple[np.ndarray, np.ndarray]:
  """(templates [T, 256] zero-mean unit-norm, shape index [T]) over sizes, centres, blurs.

  Sizes and centres go beyond what `sample_scenes` draws, since generated shapes stray.
  """
  res = ANALYSIS_RESOLUTION
  templates, labels = [], []
  for label, shape in enumerate(SHAPES):
    grid = []
    for scale in _BANK_SCALES:
      centres = np.arange(scale / 2, 1 - scale / 2 + 1e-9, _BANK_STEP)
      cx, cy = np.meshgrid(centres, centres)
      grid.append(np.stack([np.full(cx.size, scale), cx.ravel(), cy.ravel()], -1))
    scale, cx, cy = np.concatenate(grid).T
    coverage = _coverage(shape, scale, cx, cy, res, supersample=4)
    for sigma in _BANK_BLURS:
      templates.append(_blur(coverage, sigma).reshape(len(scale), -1))
      labels.append(np.full(len(scale), label))
  templates = np.concatenate(templates)
  templates -= templates.mean(-1, keepdims=True)
  templates /= np.linalg.norm(templates, axis=-1, keepdims=True)
  return templates.astype(np.float32), np.concatenate(labels)


def shape_of(image: np.ndarray) -> str | None:
  """The shape whose rendered template correlates best with the foreground, or None.

  Templates cover a grid of sizes, half-pixel centres, sharp and blurred; normalized
  correlation ignores how strong the foreground is. None without a clear foreground, or when
  no template correlates at least `MIN_CORRELATION`.
  """
  strength = _foreground(_analysis_view(image))
  if strength is None:
    return None
  templates, labels = _template_bank()
  centred = strength.ravel() - strength.mean()
  scores = templates @ (centred / np.linalg.norm(centred)).astype(np.float32)
  best = int(scores.argmax())
  return SHAPES[labels[best]] if scores[best] >= MIN_CORRELATION else None
