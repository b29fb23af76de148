r"""Builds a livo_data training folder with Stable Diffusion, from a JSON Lines spec of scenes.

  python scripts/build_dataset.py --model=sd15 --spec=spec.jsonl --out=livo_data \
      --steps=25 --guidance=7.5 --scheduler=dpm --seed=0 --batch_size=8

Writes `out/<type>/<scene>/metadata.jsonl` and the PNGs beside it, `out/build_settings.json`,
then `out/build_summary.json`. `--model` is a folder or a Hugging Face Hub repo id
(docs/weights.md). The same spec and flags give byte-identical images. See
docs/build_dataset.md for the spec format.

A rerun resumes into its `--out`: it keeps the images already made and makes the rest (and
remakes those of scenes whose prompts changed in the spec). A rerun with another `--model`,
`--steps`, `--guidance`, `--scheduler`, `--seed`, `--height` or `--width` than the folder was
built with is refused; `--overwrite` makes every image of the spec afresh. Every flag and the
spec are checked before the model loads; errors are one line ("error: ...", exit 1), Ctrl-C
stops with "interrupted" (exit 130) and leaves whole files only.
"""

from absl import flags

from livo_jax import cli
from livo_jax import dataset_builder

_MODEL = cli.ModelFlags("model", "diffusers SD (torch, or our Flax checkpoint)", required=True)
_SPEC = flags.DEFINE_string("spec", None, "JSON Lines spec, one scene per line", required=True)
_OUT = flags.DEFINE_string("out", None, "the livo_data folder to write (a rerun resumes it)",
                           required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "make every image afresh, instead of "
                               "refusing a --out built with other settings")
_STEPS = flags.DEFINE_integer("steps", 25, "sampler steps", lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale",
                               lower_bound=0)
_SCHEDULER = flags.DEFINE_enum("scheduler", "dpm", ["dpm", "ddim"], "DPM-Solver++ 2M or DDIM")
_SEED = flags.DEFINE_integer("seed", 0, "base seed of every scene side's noise stream (any "
                             "integer: it is hashed)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "images per compiled call", lower_bound=1)
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the model's)",
                               lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the model's)",
                              lower_bound=1)

cli.must_exist(_SPEC, "file")
cli.must_be_finite(_GUIDANCE)


def main(argv):
  del argv  # cli.run refuses arguments
  dataset_builder.build(
      _MODEL.ref(), _SPEC.value, _OUT.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
      scheduler=_SCHEDULER.value, seed=_SEED.value, batch_size=_BATCH.value,
      height=_HEIGHT.value, width=_WIDTH.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  cli.run(main)
