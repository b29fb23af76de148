r"""Builds a livo_data training folder with Stable Diffusion, from a JSON Lines spec of scenes.

  python scripts/build_dataset.py --model=sd15 --spec=spec.jsonl --out=livo_data \
      --steps=25 --guidance=7.5 --scheduler=dpm --seed=0 --batch_size=8

Writes `out/<type>/<scene>/metadata.jsonl` and the PNGs beside it, then `out/build_summary.json`.
The same spec and flags give byte-identical images; a rerun keeps the images already made and
makes the rest. See docs/build_dataset.md for the spec format.
"""

import sys

from absl import app
from absl import flags

from livo_jax import dataset_builder
from livo_jax import weights
from livo_jax.errors import ConfigError, DataError, WeightsError

_MODEL = flags.DEFINE_string("model", None, "diffusers SD folder (torch or Flax checkpoint)",
                             required=True)
_SPEC = flags.DEFINE_string("spec", None, "JSON Lines spec, one scene per line", required=True)
_OUT = flags.DEFINE_string("out", None, "the livo_data folder to write", required=True)
_STEPS = flags.DEFINE_integer("steps", 25, "sampler steps", lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
_SCHEDULER = flags.DEFINE_enum("scheduler", "dpm", ["dpm", "ddim"], "DPM-Solver++ 2M or DDIM")
_SEED = flags.DEFINE_integer("seed", 0, "base seed of every scene side's noise stream")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images per compiled call", lower_bound=1)
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the model's)")
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the model's)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    specs = dataset_builder.read_spec(_SPEC.value)   # before the model: spec errors come fast
    sd = weights.load_sd(_MODEL.value)
    dataset_builder.build_dataset(
        sd, specs, _OUT.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
        scheduler=_SCHEDULER.value, seed=_SEED.value, batch_size=_BATCH.value,
        height=_HEIGHT.value, width=_WIDTH.value)
  except (ConfigError, DataError, WeightsError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
