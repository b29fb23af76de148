r"""Evaluates base SD against LiVO with the paper's protocol and writes a report.

  python scripts/evaluate.py --task=bias --attribute=gender --prompts=eval/career.jsonl \
      --model=sd15 --value_encoder=livo/value_encoder --clip=clip-vit-large-patch14 \
      --out=eval_out/career

  python scripts/evaluate.py --task=toxicity --kind=bloody --prompts=eval/bloody.jsonl \
      --model=sd15 --value_encoder=livo/value_encoder --clip=clip-vit-large-patch14 \
      --vlm_url=http://localhost:8000/v1 --out=eval_out/bloody

Generates 50 images per prompt and variant (seed 42, DPM-Solver++ 25 steps, guidance 7.5;
images already on disk are kept), judges them, and writes `results/*.jsonl`,
`results/summary.json` and `report.md` under `--out`. `--images_base` / `--images_livo` take
existing image folders (`<prompt index>/<image index>.png`) instead of generating.
"""

from absl import app
from absl import flags

from livo_jax.eval import evaluate

_TASK = flags.DEFINE_enum("task", None, list(evaluate.TASKS), "what to measure", required=True)
_PROMPTS = flags.DEFINE_string("prompts", None, "eval jsonl (a 'prompt' field per line)",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_CLIP = flags.DEFINE_string("clip", None, "HF CLIPModel folder (the judge)", required=True)
_MODEL = flags.DEFINE_string("model", None, "SD folder to generate with")
_VALUE_ENCODER = flags.DEFINE_string("value_encoder", None, "LiVO value encoder folder")
_IMAGES_BASE = flags.DEFINE_string("images_base", None, "existing base images folder")
_IMAGES_LIVO = flags.DEFINE_string("images_livo", None, "existing LiVO images folder")
_ATTRIBUTE = flags.DEFINE_enum("attribute", "gender", ["gender", "race"], "bias attribute")
_KIND = flags.DEFINE_string("kind", "nudity", "toxicity kind (nudity, bloody, zombie)")
_VALUE_SOURCE = flags.DEFINE_enum(
    "value_source", "truth", ["truth", "file", "auto"],
    "LiVO's value: the task's own, the jsonl 'value' field, or the retriever")
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 50, "images per prompt")
_SEED = flags.DEFINE_integer("seed", 42, "noise seed")
_STEPS = flags.DEFINE_integer("steps", 25, "DPM-Solver++ steps")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
_BATCH = flags.DEFINE_integer("batch_size", 10, "images per compiled sampling call")
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the model's)")
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: the model's)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "sampling dtype")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", None, "evaluate only the first N prompts")
_VLM_URL = flags.DEFINE_string("vlm_url", None, "OpenAI-compatible VLM endpoint (toxicity)")
_VLM_MODEL = flags.DEFINE_string("vlm_model", "llava-1.5-7b", "model name at the endpoint")
_VLM_API_KEY = flags.DEFINE_string("vlm_api_key", None, "API key for the endpoint")
_LLAVA = flags.DEFINE_string("llava", None, "local transformers LLaVA folder as the toxicity "
                             "judge (needs torch)")
_INCEPTION = flags.DEFINE_string("inception", None,
                                 "FID Inception weights (pt_inception-2015-12-05-*.pth or "
                                 ".safetensors): adds Inception Score and FID")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  images = {variant: folder for variant, folder in
            (("base", _IMAGES_BASE.value), ("livo", _IMAGES_LIVO.value)) if folder}
  summary = evaluate.evaluate(evaluate.EvalConfig(
      task=_TASK.value, prompts=_PROMPTS.value, out=_OUT.value, clip=_CLIP.value,
      model=_MODEL.value, value_encoder=_VALUE_ENCODER.value, images=images,
      attribute=_ATTRIBUTE.value, kind=_KIND.value, value_source=_VALUE_SOURCE.value,
      generation=evaluate.Generation(
          images_per_prompt=_IMAGES_PER_PROMPT.value, seed=_SEED.value, steps=_STEPS.value,
          guidance=_GUIDANCE.value, batch_size=_BATCH.value, height=_HEIGHT.value,
          width=_WIDTH.value),
      dtype=_DTYPE.value, max_prompts=_MAX_PROMPTS.value,
      vlm_url=_VLM_URL.value, vlm_model=_VLM_MODEL.value, vlm_api_key=_VLM_API_KEY.value,
      llava=_LLAVA.value, inception=_INCEPTION.value))
  for variant, values in summary.items():
    print(variant + ": " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
  print(f"report: {_OUT.value}/report.md")


if __name__ == "__main__":
  app.run(main)
