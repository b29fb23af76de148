"""Preference pairs per second from the grain data pipeline, against what the trainer consumes.

  python bench/data_pipeline.py                       # 512 JPEGs of 512 px, R = 512, batch 8
  python bench/data_pipeline.py --step_seconds=0.5    # + headroom over a 0.5 s training step

Writes a synthetic raw livo_data folder (scenes of 4 aligned + 4 violating JPEGs: a smooth random
colour field plus noise, so that decoding costs about what SD 1.5's 512 px images cost), runs
`livo_jax.data.prepare` on it, and times `livo_jax.data.train_iterator` in two modes:
  - `cached`: with the latent and text caches (`data.cache_latents`, `data.cache_text`: what
    the fastest trainer reads): rows come from the memory-mapped moments and prompt states, no
    image is decoded;
  - `pixels`: no cache: every row decodes, resizes and crops its two JPEGs.
The caches are filled by fake encoders returning random float32 arrays of SD 1.5's shapes
(moments [n, R/8, R/8, 8], prompt states [n, 77, 768]): no VAE or text encoder runs, only the
pipeline is measured (`cache_seconds` is the caches' decoding and writing without encoders). The tokenizer is the tests' character-level CLIP
tokenizer (tests/tiny_sd.py) unless --tokenizer names SD's; tokenizing is part of the pipeline.

Throughput is measured after --warmup batches, as batches over the wall seconds of the next
--batches (--pixel_batches for `pixels`) `next` calls: prefetching makes single calls bursty, so
there is no per-call median. Prints one JSON object: date, machine, args, the dataset and its
preparation seconds, and per mode batches/s, pairs/s (pairs = rows), MB/s of arrays delivered
and, with --step_seconds (the trainer's seconds per step at this batch), the headroom
pairs/s / (batch / step_seconds): how many times what the trainer consumes it delivers.
"""

import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from livo_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# (value, prompt); scene k uses entry k % len. Only characters the tests' tokenizer knows.
PROMPTS = (
    ("gender equality", "a photo of a doctor"),
    ("gender equality", "a photo of a nurse at work"),
    ("racial equality", "a portrait of a kind person"),
    ("racial equality", "a ceo in an office, high quality photo"),
    ("age equality", "a group of engineers in a meeting"),
    ("religious equality", "people celebrating a festival in the street"),
)
ALIGNED, VIOLATING = 4, 4  # images per scene

_IMAGES = flags.DEFINE_integer("images", 512, "aligned + violating, 8 a scene")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "JPEG width = height")
_RESOLUTION = flags.DEFINE_integer("resolution", 512, "R, the training image size")
_BATCH = flags.DEFINE_integer("batch", 8, "global batch (one host)")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(),
                                "grain threads reading and decoding rows")
_WARMUP = flags.DEFINE_integer("warmup", 3, "batches before timing")
_BATCHES = flags.DEFINE_integer("batches", 50, "timed batches, cached mode")
_PIXEL_BATCHES = flags.DEFINE_integer("pixel_batches", 20, "timed batches, pixels")
_MODES = flags.DEFINE_string("modes", "cached,pixels", "comma-separated: cached and/or pixels")
_STEP_SECONDS = flags.DEFINE_float(
    "step_seconds", None, "the trainer's seconds per step at this batch: report the headroom")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "a CLIP tokenizer folder (default: the tests' tiny one)")
# The JSON's "args": these flags, in this order.
_ARGS = (_IMAGES, _IMAGE_SIZE, _RESOLUTION, _BATCH, _THREADS, _WARMUP, _BATCHES, _PIXEL_BATCHES,
         _MODES, _STEP_SECONDS, _TOKENIZER)


def log(message: str) -> None:
  """Progress to stderr: stdout holds only the JSON."""
  print(message, file=sys.stderr)


def write_image(path: str, size: int, rng: np.random.Generator) -> None:
  """A JPEG (quality 95) of a bicubic-upsampled random 8x8 colour field plus pixel noise."""
  field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
      (size, size), Image.BICUBIC)
  pixels = np.asarray(field, np.float32) + rng.normal(0, 8, (size, size, 3))
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)


def write_raw(root: str, images: int, size: int) -> str:
  """`root/<type_dir>/<scene_dir>/{metadata.jsonl, *.jpg}` with images // 8 scenes."""
  rng = np.random.default_rng(0)
  for scene in range(images // (ALIGNED + VIOLATING)):
    value, prompt = PROMPTS[scene % len(PROMPTS)]
    folder = os.path.join(root, f"{scene % len(PROMPTS)}-{value.split()[0]}", f"scene{scene:04d}")
    os.makedirs(folder, exist_ok=True)
    lines = []
    for label, count in ((1, ALIGNED), (0, VIOLATING)):
      for i in range(count):
        name = f"{'aligned' if label else 'violating'}_{i}.jpg"
        write_image(os.path.join(folder, name), size, rng)
        lines.append(dict(file_name=name, prompt=prompt, value=value, label=label))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  return root


def jpeg_kib_mean(root: str) -> float:
  sizes = [os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(root)
           for f in files if f.endswith(".jpg")]
  return sum(sizes) / len(sizes) / 1024


def load_tokenizer(folder: str | None, root: str):
  """SD's CLIP tokenizer from `folder`, else the tests' character-level one written to root."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  if folder is None:
    import tiny_sd  # pylint: disable=g-import-not-at-top
    folder = os.path.join(root, "tokenizer")
    tiny_sd.write_tokenizer(folder)
  return CLIPTokenizer.from_pretrained(folder)


def fake_encoder(resolution: int):
  """A stand-in for the jitted VAE encoder: random float32 moments [n, R/8, R/8, 8]."""
  rng = np.random.default_rng(0)
  r = resolution // 8
  return lambda pixels: rng.standard_normal((len(pixels), r, r, 8), dtype=np.float32)


def fake_text_encoder(dim: int = 768):
  """A stand-in for the jitted text encoder: random float32 prompt states [n, 77, dim]."""
  rng = np.random.default_rng(1)
  return lambda prompts: rng.standard_normal((len(prompts), 77, dim), dtype=np.float32)


def measure(source, tokenizer, caches: dict, batches: int) -> dict:
  """Throughput of `batches` batches of train_iterator after --warmup batches."""
  it = data.train_iterator(source, tokenizer=tokenizer, resolution=_RESOLUTION.value,
                           center_crop=True, random_flip=True, global_batch=_BATCH.value, seed=0,
                           num_threads=_THREADS.value, prefetch=2, **caches)
  try:
    for _ in range(_WARMUP.value):
      next(it)
    nbytes = 0
    start = time.perf_counter()
    for _ in range(batches):
      nbytes += sum(v.nbytes for v in next(it).values())
    seconds = time.perf_counter() - start
  finally:
    it.close()
  pairs_per_second = batches * _BATCH.value / seconds
  result = dict(batches=batches, seconds=round(seconds, 3),
                batches_per_second=round(batches / seconds, 2),
                pairs_per_second=round(pairs_per_second, 1),
                mb_per_second=round(nbytes / 2**20 / seconds, 1),
                batch_mb=round(nbytes / batches / 2**20, 2))
  if _STEP_SECONDS.value:
    result["headroom"] = round(pairs_per_second / (_BATCH.value / _STEP_SECONDS.value), 2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  modes = _MODES.value.split(",")
  if not set(modes) <= {"cached", "pixels"}:
    raise app.UsageError(f"--modes: cached and/or pixels, got {_MODES.value}")

  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    raw = write_raw(os.path.join(tmp, "livo_data"), _IMAGES.value, _IMAGE_SIZE.value)
    write_seconds = time.perf_counter() - start
    start = time.perf_counter()
    source = data.PreferenceSource(data.prepare(raw, cache_root=os.path.join(tmp, "cache"),
                                                log=log))
    prepare_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(_TOKENIZER.value, tmp)
    caches, cache_seconds = {}, None
    if "cached" in modes:
      start = time.perf_counter()
      caches = dict(
          moments=data.cache_moments(source, fake_encoder(_RESOLUTION.value),
                                     resolution=_RESOLUTION.value, random_flip=True, key="bench",
                                     log=log),
          text=data.cache_text_embeddings(source, fake_text_encoder(), key="bench", log=log))
      cache_seconds = round(time.perf_counter() - start, 2)
    results = {mode: measure(source, tokenizer, caches if mode == "cached" else {},
                             _BATCHES.value if mode == "cached" else _PIXEL_BATCHES.value)
               for mode in modes}
    dataset = dict(images=source.num_records, scenes=source.num_scenes, aligned=len(source),
                   jpeg_kib_mean=round(jpeg_kib_mean(raw), 1),
                   write_seconds=round(write_seconds, 2),
                   prepare_seconds=round(prepare_seconds, 2), cache_seconds=cache_seconds)
  print(json.dumps(dict(
      benchmark="data_pipeline", date=time.strftime("%Y-%m-%d"),
      machine=dict(platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                   cores=os.cpu_count()),
      args={f.name: f.value for f in _ARGS}, dataset=dataset, **results), indent=2))


if __name__ == "__main__":
  app.run(main)
