r"""Evaluates base SD against LiVO with the paper's protocol and writes a report.

  python scripts/evaluate.py --task=bias --attribute=gender --prompts=eval/career.jsonl \
      --model=sd15 --value_encoder=livo/value_encoder --clip=clip-vit-large-patch14 \
      --out=eval_out/career

  LIVO_VLM_API_KEY=... python scripts/evaluate.py --task=toxicity --kind=bloody \
      --prompts=eval/bloody.jsonl --model=sd15 --value_encoder=livo/value_encoder \
      --clip=clip-vit-large-patch14 --vlm_url=http://localhost:8000/v1 --out=eval_out/bloody

Generates 50 images per prompt and variant (seed 42, DPM-Solver++ 25 steps, guidance 7.5),
judges them, and writes `results/*.jsonl`, `results/summary.json` and `report.md` under `--out`.
`--model`, `--value_encoder`, `--clip` and `--llava` take a folder or a Hugging Face Hub repo
id (with `--NAME_subfolder`, `--NAME_revision`, `--NAME_variant`; docs/weights.md).
`--images_base` / `--images_livo` take existing image folders (`<prompt index>/<image
index>.png`) instead of generating.

A rerun resumes into its `--out`: the images already there are kept, and only the missing ones
are generated (prompts may be added at the end, or left out with `--max_prompts`). A rerun with
settings other than those that made the images (model, value encoder, dtype, seed, steps,
guidance, size, images per prompt, prompts and values) is refused; `--overwrite` deletes those
images and starts afresh. The VLM's API key is read from the environment variable that
`--vlm_api_key_env` names, never from the command line. Every flag is checked before a model
loads; errors are one line ("error: ...", exit 1), Ctrl-C stops with "interrupted" (exit 130)
and leaves whole files only.
"""

import os

from absl import flags

from livo_jax import cli
from livo_jax import conditioning
from livo_jax.errors import ConfigError
from livo_jax.eval import evaluate
from livo_jax.eval import vlm

_TASK = flags.DEFINE_enum("task", None, list(evaluate.TASKS), "what to measure", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "eval jsonl (a 'prompt' field per line)",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (a rerun resumes into it)",
                           required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "regenerate images that --out holds from "
                               "other settings, instead of refusing")
_CLIP = cli.ModelFlags("clip", "HF CLIPModel (the judge)", required=True)
_MODEL = cli.ModelFlags("model", "SD to generate with")
_VALUE_ENCODER = cli.ModelFlags("value_encoder", "LiVO value encoder (needs --model)")
_IMAGES_BASE = flags.DEFINE_string("images_base", None, "existing base images folder")
_IMAGES_LIVO = flags.DEFINE_string("images_livo", None, "existing LiVO images folder")
_ATTRIBUTE = flags.DEFINE_enum("attribute", "gender", ["gender", "race"], "bias attribute")
_KIND = flags.DEFINE_string("kind", "nudity", "toxicity kind (nudity, bloody, zombie)")
_VALUE_SOURCE = flags.DEFINE_enum(
    "value_source", "truth", ["truth", "file", "auto"],
    "LiVO's value: the task's own, the jsonl 'value' field, or the retriever")
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 50, "images per prompt",
                                          lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 42, "noise seed", lower_bound=0, upper_bound=2**31 - 1)
_STEPS = flags.DEFINE_integer("steps", 25, "DPM-Solver++ steps", lower_bound=1)
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale",
                               lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 10, "images per compiled sampling call",
                              lower_bound=1)
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the model's)",
                               lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the model's)",
                              lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                           "sampling dtype")
_CONDITIONING = flags.DEFINE_enum(
    "conditioning", "training", list(conditioning.RULES), "the value token's rule: 'training' "
    "(78 tokens, as the value encoder was trained) or 'original' (the prompt cut to 76 tokens, "
    "as the paper sampled its numbers; docs/sampling.md)")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", None, "evaluate only the first N prompts",
                                    lower_bound=1)
_VLM_URL = flags.DEFINE_string("vlm_url", None, "OpenAI-compatible VLM endpoint (toxicity)")
_VLM_MODEL = flags.DEFINE_string("vlm_model", "llava-1.5-7b", "model name at the endpoint")
_VLM_API_KEY_ENV = flags.DEFINE_string("vlm_api_key_env", "LIVO_VLM_API_KEY",
                                       "environment variable holding the endpoint's API key "
                                       "(unset: no key)")
_LLAVA = cli.ModelFlags("llava", "transformers LLaVA as the toxicity judge (needs torch)")
_INCEPTION = flags.DEFINE_string("inception", None,
                                 "FID Inception weights (pt_inception-2015-12-05-*.pth or "
                                 ".safetensors): adds Inception Score and FID")

for _flag, _kind in ((_PROMPTS, "file"), (_IMAGES_BASE, "folder"), (_IMAGES_LIVO, "folder"),
                     (_INCEPTION, "file")):
  cli.must_exist(_flag, _kind)
cli.must_be_finite(_GUIDANCE)
flags.register_validator("kind", lambda kind: bool(kind.strip()), "must not be empty")
flags.register_validator("vlm_model", lambda model: bool(model.strip()), "must not be empty")
flags.register_validator("vlm_url",
                         lambda url: url is None or url.startswith(("http://", "https://")),
                         "must be an http:// or https:// URL")
flags.register_multi_flags_validator(
    ["value_encoder", "model"], lambda f: not f["value_encoder"] or f["model"],
    "--value_encoder needs --model (it generates the LiVO images)")
flags.register_multi_flags_validator(
    ["model", "images_base", "images_livo"], lambda f: any(f.values()),
    "nothing to evaluate: give --model (and --value_encoder) or --images_base/--images_livo")
flags.register_multi_flags_validator(
    ["vlm_url", "llava"], lambda f: not (f["vlm_url"] and f["llava"]),
    "give one VLM judge: --vlm_url or --llava")


def api_key() -> str | None:
  """The VLM's key from the environment; a variable named on the command line must be set."""
  key = os.environ.get(_VLM_API_KEY_ENV.value) or None
  if key is None and flags.FLAGS["vlm_api_key_env"].present:
    raise ConfigError(f"--vlm_api_key_env: the environment variable "
                      f"{_VLM_API_KEY_ENV.value!r} is not set")
  return key


def main(argv):
  del argv  # cli.run refuses arguments
  images = {variant: folder for variant, folder in
            (("base", _IMAGES_BASE.value), ("livo", _IMAGES_LIVO.value)) if folder}
  summary = evaluate.evaluate(evaluate.EvalConfig(
      task=_TASK.value, prompts=_PROMPTS.value, out=_OUT.value, clip=_CLIP.ref(),
      model=_MODEL.ref(), value_encoder=_VALUE_ENCODER.ref(), images=images,
      attribute=_ATTRIBUTE.value, kind=_KIND.value, value_source=_VALUE_SOURCE.value,
      generation=evaluate.Generation(
          images_per_prompt=_IMAGES_PER_PROMPT.value, seed=_SEED.value, steps=_STEPS.value,
          guidance=_GUIDANCE.value, batch_size=_BATCH.value, height=_HEIGHT.value,
          width=_WIDTH.value, conditioning=_CONDITIONING.value),
      dtype=_DTYPE.value, max_prompts=_MAX_PROMPTS.value,
      vlm_url=_VLM_URL.value, vlm_model=_VLM_MODEL.value, vlm_api_key=api_key(),
      llava=_LLAVA.ref(), inception=_INCEPTION.value, overwrite=_OVERWRITE.value))
  for variant, values in summary.items():
    print(variant + ": " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
  print(f"report: {_OUT.value}/report.md")


if __name__ == "__main__":
  cli.run(main, user_errors=(vlm.JudgeError,))
