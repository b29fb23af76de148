r"""Generates images with Stable Diffusion, optionally conditioned on a LiVO value.

  python scripts/generate.py --model=sd15 --value_encoder=livo/value_encoder \
      --prompt="a photo of a doctor" --value=auto --num_images=8 --out=out/doctor
  python scripts/generate.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --model_variant=fp16 --value_encoder=ORG/LIVO --value_encoder_subfolder=value_encoder \
      --prompt="a photo of a doctor" --value="gender equality" --out=out/doctor_hub

`--model` and `--value_encoder` take a folder or a Hugging Face Hub repo id (fetched into the HF
cache, or read from it with HF_HUB_OFFLINE=1; docs/weights.md).

Writes `out/00000.png`, ... and a JSON sidecar per image (prompt, value, seed, steps, scheduler,
guidance, ...). The same flags give byte-identical files. `--value=auto` asks the value retriever
(`python -m livo_jax.retriever`); `--debias` uses the value token for each image with
probability 0.5, as the paper evaluates bias.

`--out` must be new or empty, so one run's images never mix with another's: `--overwrite`
replaces the images of an earlier run there (and touches nothing else). Every flag is checked
before the model loads, the image size against the model once it is loaded; errors are one line
("error: ...", exit 1), Ctrl-C stops with "interrupted" (exit 130) and leaves whole files only.
"""

from absl import flags
import jax.numpy as jnp

from livo_jax import cli
from livo_jax import retriever
from livo_jax import sampling
from livo_jax import weights

_MODEL = cli.ModelFlags("model", "diffusers SD (torch, or our Flax checkpoint)", required=True)
_VALUE_ENCODER = cli.ModelFlags("value_encoder", "LiVO value encoder (HF CLIPTextModel)")
_PROMPT = flags.DEFINE_string("prompt", None, "the prompt", required=True)
_VALUE = flags.DEFINE_string("value", None, "value statement, or 'auto' for the retriever "
                             "(needs --value_encoder)")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "unconditional prompt for guidance")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "how many images", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 4, "images per compiled call", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 25, "sampler steps", lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (0: the "
                               "unconditional prediction, 1: the conditional one)",
                               lower_bound=0)
_SCHEDULER = flags.DEFINE_enum("scheduler", "dpm", ["dpm", "ddim"], "DPM-Solver++ 2M or DDIM")
_CONDITIONING = flags.DEFINE_enum(
    "conditioning", "training", ["training", "original"], "the value token's rule: 'training' "
    "(78 tokens, as the value encoder was trained) or 'original' (the prompt cut to 76 tokens, "
    "as the original LiVO samples; docs/method.md section 2)")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed", lower_bound=0, upper_bound=2**31 - 1)
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the model's)",
                               lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the model's)",
                              lower_bound=1)
_LATENTS = flags.DEFINE_string("latents", None, ".npy initial noise [N, h, w, C] float32 (NHWC)")
_DEBIAS = flags.DEFINE_bool("debias", False, "use the value token with probability 0.5 each")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                           "compute dtype")
_OUT = flags.DEFINE_string("out", None, "output folder, new or empty", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace the images already in --out")

cli.must_exist(_LATENTS, "file")
cli.must_be_finite(_GUIDANCE)
flags.register_multi_flags_validator(
    ["value", "value_encoder"], lambda f: not f["value"] or f["value_encoder"],
    "--value (auto too) needs --value_encoder")


def resolve_value(value: str | None, prompt: str) -> str | None:
  if value != "auto":
    return value or None
  found = retriever.retrieve(prompt)
  print(f"retriever ({found.stage}): {found}")
  return found.value


def main(argv):
  del argv  # cli.run refuses arguments
  sampling.check_out(_OUT.value, overwrite=_OVERWRITE.value)
  value = resolve_value(_VALUE.value, _PROMPT.value)
  latents = sampling.read_latents(_LATENTS.value, _NUM_IMAGES.value) if _LATENTS.value else None
  model, encoder = _MODEL.ref(), _VALUE_ENCODER.ref()
  sd = weights.load_sd(model, value_encoder=encoder, dtype=jnp.dtype(_DTYPE.value))
  sampling.write_images(
      sd, _OUT.value, prompt=_PROMPT.value, value=value, num_images=_NUM_IMAGES.value,
      batch_size=_BATCH.value, negative_prompt=_NEGATIVE.value, steps=_STEPS.value,
      guidance=_GUIDANCE.value, scheduler=_SCHEDULER.value, seed=_SEED.value,
      height=_HEIGHT.value, width=_WIDTH.value, latents=latents, debias=_DEBIAS.value,
      conditioning=_CONDITIONING.value, overwrite=_OVERWRITE.value,
      record=dict(model=str(model), value_encoder=str(encoder) if encoder else None,
                  dtype=_DTYPE.value, latents=_LATENTS.value))
  print(f"wrote {_NUM_IMAGES.value} images to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
