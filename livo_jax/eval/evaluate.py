"""The paper's evaluation in one run: generate (or read) images, judge them, write a report.

Per prompt of an eval jsonl file, `images_per_prompt` images are generated for each variant with
DPM-Solver++ (seed 42, 25 steps, guidance 7.5 by default):
- `base`: plain SD;
- `livo`: SD with the value encoder; for bias the first half of each prompt's images use the
  value token and the second half do not, as the paper does; for toxicity all do.
Image i of a prompt starts from the same noise in both variants.

Judging: bias counts CLIP zero-shot attributes per prompt (discrepancies D1, D2); toxicity flags
images with CLIP zero-shot or a VLM endpoint (toxic ratio); both report the CLIP score, and
Inception Score / FID (LiVO against base) when the FID Inception weights are given.

Layout under `out`: `images/<variant>/<prompt index>/<image index>.png` (kept between runs, so a
rerun only generates what is missing), `results/<variant>_<task>.jsonl` (one line per prompt),
`results/summary.json`, `grids/`, and `report.md`.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from livo_jax import retriever
from livo_jax import sampling
from livo_jax.eval import judges
from livo_jax.eval import metrics
from livo_jax.eval import report
from livo_jax.eval.llava import LlavaJudge
from livo_jax.eval.vlm import VLMJudge
from livo_jax.models.inception import load_fid_inception

TASKS = ("bias", "toxicity")
VARIANTS = ("base", "livo")
TRUTH_VALUES = {"gender": "gender equality", "race": "racial equality"}
GRID_PROMPTS = 4   # prompts shown in the report
GRID_IMAGES = 8    # images per grid


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  task: str                              # "bias" or "toxicity"
  prompts: str                           # eval jsonl: {"prompt": ..., ["value": ...]}
  out: str
  clip: str                              # HF CLIPModel folder (ViT-L/14 in the paper)
  model: str | None = None               # SD folder; None: images must exist under `images`
  value_encoder: str | None = None       # adds the `livo` variant
  images: Mapping[str, str] = dataclasses.field(default_factory=dict)  # variant -> folder
  attribute: str = "gender"              # bias: "gender" or "race"
  kind: str = "nudity"                   # toxicity: "nudity", "bloody", "zombie", ...
  value_source: str = "truth"            # "truth" (the task's value), "file" or "auto"
  images_per_prompt: int = 50
  seed: int = 42
  steps: int = 25
  guidance: float = 7.5
  batch_size: int = 10
  height: int | None = None
  width: int | None = None
  dtype: str = "float32"
  max_prompts: int | None = None
  vlm_url: str | None = None             # toxicity: judge with a VLM endpoint instead of CLIP
  vlm_model: str = "llava-1.5-7b"
  vlm_api_key: str | None = None
  llava: str | None = None               # toxicity: judge with a local LLaVA folder (torch)
  inception: str | None = None           # FID Inception weights: adds IS and FID


def read_prompts(path: str, *, need_value: bool = False) -> list[dict[str, Any]]:
  """The records of an eval jsonl file; errors name the file and line."""
  records = []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{where}: needs a string field 'prompt'")
      if need_value and not isinstance(record.get("value"), str):
        raise ValueError(f"{where}: needs a string field 'value' (value_source='file')")
      records.append(record)
  if not records:
    raise ValueError(f"{path}: no prompts")
  return records


def value_for(config: EvalConfig, record: Mapping[str, Any]) -> str | None:
  """The value statement the `livo` variant uses for a prompt."""
  if config.value_source == "file":
    return record["value"]
  if config.value_source == "auto":
    return retriever.retrieve(record["prompt"]).value
  if config.task == "bias":
    return TRUTH_VALUES[config.attribute]
  return f"{config.kind} considered inappropriate"


def uses_value(config: EvalConfig, index: int) -> bool:
  """Bias: the paper's half with, half without the value token; toxicity: always."""
  return config.task != "bias" or index < config.images_per_prompt // 2


def image_paths(folder: str, prompt_index: int, n: int) -> list[str]:
  return [os.path.join(folder, f"{prompt_index:04d}", f"{i:02d}.png") for i in range(n)]


def generate_missing(config: EvalConfig, sd, records, variant: str, folder: str) -> None:
  """Generates the images of `variant` that are not on disk yet."""
  n = config.images_per_prompt
  for p, record in enumerate(tqdm.tqdm(records, desc=f"generate {variant}", unit="prompt")):
    paths = image_paths(folder, p, n)
    value = value_for(config, record) if variant == "livo" else None
    for start in range(0, n, config.batch_size):
      batch = range(start, min(start + config.batch_size, n))
      if all(os.path.exists(paths[i]) for i in batch):
        continue
      images = sampling.generate(
          sd, [record["prompt"]] * len(batch),
          [value if uses_value(config, i) else None for i in batch],
          steps=config.steps, guidance=config.guidance, seed=config.seed,
          height=config.height, width=config.width, first_index=start)
      os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
      for i, image in zip(batch, images):
        if not os.path.exists(paths[i]):
          Image.fromarray(image).save(paths[i])


def load_images(paths: list[str]) -> list[np.ndarray]:
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{len(missing)} images missing, e.g. {missing[0]} "
                            "(give --model to generate them)")
  return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def evaluate(config: EvalConfig) -> dict[str, dict[str, float]]:
  """Runs the evaluation; returns {variant: {metric: value}} and writes the files above."""
  if config.task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
  records = read_prompts(config.prompts, need_value=config.value_source == "file")
  records = records[:config.max_prompts] if config.max_prompts else records
  folders = {v: config.images.get(v, os.path.join(config.out, "images", v)) for v in VARIANTS}
  variants = [v for v in VARIANTS if v in config.images
              or (config.model and (v == "base" or config.value_encoder))]
  if not variants:
    raise ValueError("nothing to evaluate: give --model (and --value_encoder) or image folders")
  if config.model:
    sd = sampling.load_pipeline(config.model, config.value_encoder,
                                dtype=jnp.dtype(config.dtype))
    for variant in variants:
      if variant not in config.images:
        generate_missing(config, sd, records, variant, folders[variant])

  judge = judges.CLIPJudge(config.clip)
  vlm, vlm_name = None, None
  if config.task == "toxicity" and config.vlm_url and config.llava:
    raise ValueError("give one VLM judge: an endpoint (vlm_url) or a LLaVA folder (llava)")
  if config.task == "toxicity" and config.vlm_url:
    vlm = VLMJudge(config.vlm_url, config.vlm_model, api_key=config.vlm_api_key)
    vlm_name = f"VLM {config.vlm_model} at {config.vlm_url}"
  elif config.task == "toxicity" and config.llava:
    vlm, vlm_name = LlavaJudge(config.llava), f"LLaVA {config.llava}"
  inception = None
  if config.inception:
    inception = load_fid_inception(config.inception)

  results_dir = os.path.join(config.out, "results")
  os.makedirs(results_dir, exist_ok=True)
  summary, features, grids = {}, {}, []
  for variant in variants:
    rows, pool, logits = [], [], []
    for p, record in enumerate(tqdm.tqdm(records, desc=f"judge {variant}", unit="prompt")):
      paths = image_paths(folders[variant], p, config.images_per_prompt)
      images = load_images(paths)
      row = {"prompt": record["prompt"], "images": paths,
             "clip_score": metrics.clip_score(*judge.paired_features(
                 images, [record["prompt"]] * len(images)))}
      if variant == "livo":
        row["value"] = value_for(config, record)
      if config.task == "bias":
        counts = judge.attribute_counts(images, record["prompt"], config.attribute)
        row["counts"] = dict(zip(judges.ATTRIBUTES[config.attribute], counts.tolist()))
        row["d1"], row["d2"] = metrics.discrepancy(counts)
      else:
        toxic = (np.array([j.toxic for j in vlm.judge_many(images, config.kind)]) if vlm
                 else judge.toxic(images, config.kind))
        row["toxic"] = toxic.tolist()
        row["toxicity_ratio"] = metrics.toxicity_ratio(toxic)
      if inception is not None:
        f, l = _inception_outputs(inception, images)
        pool.append(f)
        logits.append(l)
      rows.append(row)
      if p < GRID_PROMPTS:
        grid = os.path.join("grids", f"{variant}_{p:04d}.png")
        report.save_grid(images[:GRID_IMAGES], os.path.join(config.out, grid))
        grids.append((variant, record["prompt"], grid))
    _write_jsonl(rows, os.path.join(results_dir, f"{variant}_{config.task}.jsonl"))
    task_metrics = ("d1", "d2") if config.task == "bias" else ("toxicity_ratio",)
    summary[variant] = {m: float(np.mean([r[m] for r in rows]))
                        for m in task_metrics + ("clip_score",)}
    if inception is not None:
      features[variant] = np.concatenate(pool)
      all_logits = np.concatenate(logits)
      splits = min(10, len(all_logits))
      summary[variant]["inception_score"], _ = metrics.inception_score(all_logits, splits)
  if "base" in features and "livo" in features:
    summary["livo"]["fid_vs_base"] = metrics.fid_from_features(features["livo"],
                                                               features["base"])

  with open(os.path.join(results_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  settings = {"task": config.task, "prompts": f"{config.prompts} ({len(records)} prompts)",
              "images per prompt": config.images_per_prompt, "seed": config.seed,
              "sampler": f"DPM-Solver++ {config.steps} steps, guidance {config.guidance}",
              "judge": vlm_name or f"CLIP zero-shot ({config.clip})"}
  settings.update({"attribute": config.attribute} if config.task == "bias"
                  else {"kind": config.kind})
  report.write_report(
      os.path.join(config.out, "report.md"), f"LiVO evaluation: {config.task}", summary,
      {"d1": True, "d2": True, "toxicity_ratio": True, "clip_score": False,
       "inception_score": False, "fid_vs_base": True}, settings, grids)
  return summary


def _inception_outputs(inception, images, batch_size: int = 16):
  pool, logits = [], []
  for start in range(0, len(images), batch_size):
    f, l = inception(jnp.asarray(np.stack(images[start:start + batch_size])))
    pool.append(np.asarray(f))
    logits.append(np.asarray(l))
  return np.concatenate(pool), np.concatenate(logits)


def _write_jsonl(rows, path: str) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
