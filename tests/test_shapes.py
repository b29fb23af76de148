"""The shapes world against hand-computed pixels, binomial bounds and transformers' tokenizer."""

import itertools
import math

import numpy as np
import pytest
import transformers
from PIL import Image, ImageFilter

from livo_jax.demo import shapes

RED = np.array(shapes.PALETTE["red"])
BACKGROUND = np.array(shapes.BACKGROUND)


def _area(image, colour):
  """Pixels' worth of `colour` over the background: each pixel's mix, projected and summed."""
  direction = np.array(shapes.PALETTE[colour]) - BACKGROUND
  mix = (image.astype(np.float64) - BACKGROUND) @ direction / (direction @ direction)
  return mix.sum()


def _degrade(image, rng, blur=0.7, noise=15.0):
  blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), np.float64)
  return np.clip(np.round(blurred + rng.normal(0, noise, blurred.shape)), 0, 255).astype(np.uint8)


def _extreme_scenes():
  """Every shape, colour and size at both ends of its scale range, in each corner and centred."""
  for shape, colour, size in itertools.product(shapes.SHAPES, shapes.COLOURS, shapes.SIZES):
    for scale in shapes.SCALE_RANGES[size]:
      lo = scale / 2 + shapes.MARGIN
      for center in [(lo, lo), (1 - lo, lo), (lo, 1 - lo), (1 - lo, 1 - lo), (0.5, 0.5)]:
        yield shapes.Scene(shape, colour, size, scale, center)


# ---------------------------------------------------------------------------------------------
# Rendering.

def test_square_pixels_by_hand():
  # Side 0.75 * 16 = 12 px centred: columns and rows 2..13 exactly, the rest background.
  image = shapes.render("square", "red", resolution=16, scale=0.75, center=(0.5, 0.5))
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[8, 8], RED)
  for corner in [(0, 0), (0, 15), (15, 0), (15, 15)]:
    np.testing.assert_array_equal(image[corner], BACKGROUND)
  np.testing.assert_array_equal(image[2:14, 2:14], np.broadcast_to(RED, (12, 12, 3)))
  outside = np.ones((16, 16), bool)
  outside[2:14, 2:14] = False
  np.testing.assert_array_equal(image[outside], np.broadcast_to(BACKGROUND, (outside.sum(), 3)))


@pytest.mark.parametrize("shape, expected", [
    ("square", 12**2),              # side 12 px
    ("circle", math.pi * 6**2),     # radius 6 px
    ("triangle", 12 * 12 / 2),      # base 12 px, height 12 px
])
def test_areas(shape, expected):
  image = shapes.render(shape, "blue", resolution=16, scale=0.75, center=(0.5, 0.5))
  # Anti-aliased edges carry fractional pixels; 4x4 supersampling is exact to ~0.5 px here.
  assert abs(_area(image, "blue") - expected) < 0.6
  assert abs(_area(image, "blue") / 256 - expected / 256) < 0.003


def test_antialiased_edges_and_triangle_points_up():
  image = shapes.render("triangle", "green", resolution=16, scale=0.75, center=(0.5, 0.5))
  rows = [_area(image[r:r + 1], "green") for r in range(16)]
  # Row r of the box (2..13) holds the triangle's width at depth r - 1.5 px: r - 1.5 pixels.
  np.testing.assert_allclose(rows[2:14], np.arange(2, 14) - 1.5, atol=0.1)
  edge = shapes.render("circle", "green", resolution=16, scale=0.7, center=(0.5, 0.5))
  partial = (edge != BACKGROUND).any(-1) & (edge != shapes.PALETTE["green"]).any(-1)
  assert partial.sum() >= 8  # the rim mixes colour and background


def test_render_checks_arguments():
  with pytest.raises(ValueError, match="does not fit"):
    shapes.render("circle", "red", scale=0.8, center=(0.3, 0.5))
  with pytest.raises(ValueError, match="unknown colour"):
    shapes.render("circle", "purple")
  with pytest.raises(ValueError, match="unknown shape"):
    shapes.render("hexagon", "red")


def test_captions():
  scene = shapes.Scene("circle", "red", "small", 0.45, (0.5, 0.5))
  assert shapes.caption(scene, with_colour=True) == "a red circle"
  assert shapes.caption(scene, with_colour=False) == "a circle"
  assert shapes.caption(scene, with_colour=True, with_size=True) == "a small red circle"
  assert shapes.caption(scene, with_colour=False, with_size=True) == "a small circle"


def test_sample_scenes_stay_inside_and_follow_weights():
  rng = np.random.default_rng(0)
  scenes = shapes.sample_scenes(rng, 500, colour_weights={"green": 1.0, "blue": 3.0})
  for s in scenes:
    lo, hi = shapes.SCALE_RANGES[s.size]
    assert lo <= s.scale <= hi
    for c in s.center:
      assert s.scale / 2 + shapes.MARGIN - 1e-9 <= c <= 1 - s.scale / 2 - shapes.MARGIN + 1e-9
  colours = [s.colour for s in scenes]
  assert set(colours) == {"green", "blue"}
  # Binomial(500, 3/4): std 9.7 scenes.
  assert abs(colours.count("blue") - 375) < 4 * math.sqrt(500 * 0.75 * 0.25)
  with pytest.raises(ValueError, match="colour_weights"):
    shapes.sample_scenes(rng, 1, colour_weights={"purple": 1.0})


def test_base_training_set_statistics():
  n, red_bias, colourless_fraction = 2000, 0.7, 0.5
  images, captions, scenes = shapes.base_training_set(
      n, seed=0, colourless_fraction=colourless_fraction, red_bias=red_bias)
  assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
  assert len(captions) == len(scenes) == n

  def bound(p, m):  # four binomial standard deviations of a proportion
    return 4 * math.sqrt(p * (1 - p) / m)

  colourless = [not any(c in cap.split() for c in shapes.COLOURS) for cap in captions]
  m = sum(colourless)
  assert abs(m / n - colourless_fraction) < bound(colourless_fraction, n)
  colourless_scenes = [s for s, c in zip(scenes, colourless) if c]
  for colour in shapes.COLOURS:
    p = red_bias if colour == "red" else (1 - red_bias) / 3
    share = sum(s.colour == colour for s in colourless_scenes) / m
    assert abs(share - p) < bound(p, m), colour

  coloured = [i for i, c in enumerate(colourless) if not c]
  assert [shapes.colour_of(images[i]) for i in coloured] == [scenes[i].colour for i in coloured]
  for image, cap, scene in zip(images, captions, scenes):
    words = cap.split()
    assert words[0] == "a" and words[-1] == scene.shape
    assert set(words[1:-1]) <= {scene.colour, scene.size}
  sized = sum(len(cap.split()) == (3 if c else 4) for cap, c in zip(captions, colourless))
  assert abs(sized / n - 0.25) < bound(0.25, n)
  np.testing.assert_array_equal(images[7], shapes.render_scene(scenes[7]))


def test_determinism():
  a = shapes.base_training_set(64, seed=3, resolution=32)
  b = shapes.base_training_set(64, seed=3, resolution=32)
  c = shapes.base_training_set(64, seed=4, resolution=32)
  assert a[0].shape == (64, 32, 32, 3)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1] and a[2] == b[2]
  assert a[1] != c[1]


# ---------------------------------------------------------------------------------------------
# The tokenizer.

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tokenizer"))
  shapes.write_tokenizer(folder)
  return transformers.CLIPTokenizer.from_pretrained(folder)


def test_each_word_is_one_token(tokenizer):
  vocab = tokenizer.get_vocab()
  for word in shapes.VOCABULARY:
    assert tokenizer(word, add_special_tokens=False).input_ids == [vocab[word + "</w>"]], word
  assert len(vocab) == shapes.vocab_size() < 300
  for statement in (shapes.TOXICITY_VALUE, shapes.BIAS_VALUE, "a small red circle"):
    ids = tokenizer(statement, add_special_tokens=False).input_ids
    assert len(ids) == len(statement.split())


def test_special_tokens_and_padding(tokenizer):
  ids = shapes.special_token_ids()
  assert ids == {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
  assert tokenizer.convert_ids_to_tokens([ids["bos_token_id"], ids["eos_token_id"]]) == [
      "<|startoftext|>", "<|endoftext|>"]
  # End-of-text is the highest id, so legacy argmax pooling would pick it too.
  assert ids["eos_token_id"] == shapes.vocab_size() - 1
  assert tokenizer.model_max_length == 77

  text = "red considered inappropriate, a red circle"
  batch = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length)
  row = batch.input_ids[0]
  assert len(row) == 77
  # <|startoftext|>, 7 word tokens with "," on its own, then <|endoftext|> to the end.
  assert row[0] == ids["bos_token_id"] and row[8:] == [ids["eos_token_id"]] * 69
  assert tokenizer.convert_ids_to_tokens(row[4:5]) == [",</w>"]
  decoded = tokenizer.decode(row, skip_special_tokens=True)
  # CLIP decodes "," as a word of its own; the text round-trips to the same ids.
  assert decoded == "red considered inappropriate , a red circle"
  assert tokenizer(decoded, padding="max_length", max_length=77).input_ids == row
  assert tokenizer("A  Red\nCircle").input_ids == tokenizer("a red circle").input_ids


def test_clip_config_pools_at_end_of_text(tokenizer):
  torch = pytest.importorskip("torch")
  config = transformers.CLIPTextConfig(
      vocab_size=shapes.vocab_size(), hidden_size=16, intermediate_size=32,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
      **shapes.special_token_ids())
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  ids = torch.tensor(tokenizer(["a circle", "red considered inappropriate, a red square"],
                               padding="max_length", max_length=77).input_ids)
  with torch.no_grad():
    out = model(ids)
  for row, first_eot in enumerate([3, 8]):  # after <|startoftext|> and the words
    torch.testing.assert_close(out.pooler_output[row], out.last_hidden_state[row, first_eot])


# ---------------------------------------------------------------------------------------------
# Judges.

def test_judges_exact_on_clean_renders():
  for scene in _extreme_scenes():
    image = shapes.render_scene(scene)
    assert (shapes.shape_of(image), shapes.colour_of(image)) == (scene.shape, scene.colour), scene


def test_judges_under_blur_and_noise():
  rng = np.random.default_rng(1)
  scenes = shapes.sample_scenes(rng, 300)
  degraded = [_degrade(shapes.render_scene(s), rng) for s in scenes]
  shape_accuracy = np.mean([shapes.shape_of(x) == s.shape for x, s in zip(degraded, scenes)])
  colour_accuracy = np.mean([shapes.colour_of(x) == s.colour for x, s in zip(degraded, scenes)])
  assert shape_accuracy >= 0.9 and colour_accuracy >= 0.98, (shape_accuracy, colour_accuracy)


def test_judges_on_32px_images():
  rng = np.random.default_rng(2)
  scenes = shapes.sample_scenes(rng, 60)
  for s in scenes:
    image = shapes.render_scene(s, resolution=32)
    assert (shapes.shape_of(image), shapes.colour_of(image)) == (s.shape, s.colour), s


def test_colour_of_reads_hue_not_brightness():
  circle = shapes.render("circle", "yellow", scale=0.7).astype(np.float64)
  assert shapes.colour_of((circle * 0.6).astype(np.uint8)) == "yellow"  # darker overall
  faded = (circle + BACKGROUND) / 2                                     # half background
  assert shapes.colour_of(faded.astype(np.uint8)) == "yellow"


def test_judges_answer_none_without_a_clear_shape():
  blank = np.full((16, 16, 3), shapes.BACKGROUND, np.uint8)
  assert shapes.colour_of(blank) is None and shapes.shape_of(blank) is None
  rng = np.random.default_rng(3)
  for _ in range(20):
    noise = np.clip(blank + rng.normal(0, 15, blank.shape), 0, 255).astype(np.uint8)
    assert shapes.colour_of(noise) is None and shapes.shape_of(noise) is None
  grey = shapes.render("square", "red", scale=0.7).mean(-1, keepdims=True).repeat(3, -1)
  assert shapes.colour_of(grey.astype(np.uint8)) is None  # a foreground without a hue
  two = np.minimum(shapes.render("square", "red", scale=0.4, center=(0.3, 0.3)),
                   shapes.render("square", "red", scale=0.4, center=(0.7, 0.7)))
  assert shapes.shape_of(two) is None
