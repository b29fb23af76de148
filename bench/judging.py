"""Judging throughput: images/s of the CLIP zero-shot bias judge and the FID InceptionV3.

  python bench/judging.py                      # tiny random CLIP (the tests' config)
  python bench/judging.py --preset=vitl14      # CLIP ViT-L/14 architecture, random weights

Prints one JSON object: images/s after warm-up for CLIP bias judging (5 race attributes per
image, preprocessing included) and for Inception pool3+logits at 299 px, plus compile times.
"""

import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
import transformers
from flax import nnx

from livo_jax.eval import judges
from livo_jax.models.inception import InceptionV3
from timing import median_seconds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import tiny_sd  # pylint: disable=g-import-not-at-top,wrong-import-position

PRESETS = {
    "tiny": dict(
        text_config=dict(vocab_size=len(tiny_sd.VOCAB), hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16),
    "vitl14": dict(
        text_config=dict(vocab_size=len(tiny_sd.VOCAB), hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768),
}

_PRESET = flags.DEFINE_enum("preset", "tiny", sorted(PRESETS), "random CLIP shape")
_IMAGES = flags.DEFINE_integer("images", 32, "random 512 px images, judged as one batch")


def images_per_second(fn, n_images, repeats=3):
  """(images/s after the first call, seconds the first call took beyond a later one)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  seconds, _ = median_seconds(fn, repeats)
  return n_images / seconds, first - seconds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  folder = os.path.join(tempfile.mkdtemp(), "clip")
  config = transformers.CLIPConfig(**PRESETS[_PRESET.value])
  transformers.CLIPModel(config).save_pretrained(folder)
  tiny_sd.write_tokenizer(folder)
  judge = judges.CLIPJudge(folder, batch_size=_IMAGES.value)
  images = list(np.random.default_rng(0).integers(0, 256, (_IMAGES.value, 512, 512, 3), np.uint8))
  clip_rate, clip_compile = images_per_second(
      lambda: judge.attribute_counts(images, "a photo of a doctor", "race"), _IMAGES.value)

  inception = InceptionV3(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(inception)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  batch = np.stack(images)
  inception_rate, inception_compile = images_per_second(
      lambda: jax.block_until_ready(forward(state, batch)), _IMAGES.value)
  print(json.dumps({
      "benchmark": "judging", "preset": _PRESET.value, "images": _IMAGES.value,
      "input_size": 512, "clip_bias_images_per_s": round(clip_rate, 2),
      "clip_compile_seconds": round(clip_compile, 2),
      "inception_images_per_s": round(inception_rate, 2),
      "inception_compile_seconds": round(inception_compile, 2),
      "jax_backend": jax.default_backend(), "cpu": platform.processor() or platform.machine(),
      "cores": os.cpu_count(),
  }, indent=2))


if __name__ == "__main__":
  app.run(main)
