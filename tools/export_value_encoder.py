r"""Exports the value encoder of any checkpoint of a training workdir.

  python tools/export_value_encoder.py --workdir=runs/livo_sd15 --step=5000 \
      --out=runs/livo_sd15/value_encoder_step5000

`--out` gets what the run writes as `value_encoder/` at its end, for that step: an HF
`CLIPTextModel` folder (config.json, model.safetensors) with SD's tokenizer and a model card
(README.md), the weights those the run had at that step, bit for bit. The config comes from the
run's record of the start that trained the step (`config.json`, `resumes/`), so the SD folder it
names must still be there. Without `--step`, the latest checkpoint. The workdir is only read:
it may export while the run trains (a checkpoint the run rotates out meanwhile is an error).
`--out` must be new or empty unless `--overwrite`. Errors are one line (exit 1).
"""

from absl import flags

from livo_jax import cli
from livo_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "the training workdir", required=True)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint's step (default: the latest)",
                             lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "the folder to write", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")
cli.must_exist(_WORKDIR, "folder")


def main(argv):
  del argv  # cli.run refuses arguments
  step = train.export(_WORKDIR.value, _STEP.value, _OUT.value, overwrite=_OVERWRITE.value)
  print(f"wrote the value encoder of step {step} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
