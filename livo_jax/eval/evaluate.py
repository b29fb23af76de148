"""The paper's evaluation in one run: generate (or read) images, judge them, write a report.

  tasks = [Task("bias", prompts, values, choices=("male", "female"))]
  summary = run(tasks, Judges(attribute=clip, fidelity=clip), "out", sd=sd)

Per prompt of each task, `images_per_prompt` images are generated for each variant with
DPM-Solver++ (seed 42, 25 steps, guidance 7.5 by default):
- `base`: plain SD;
- `livo`: SD with the value encoder; for bias the first half of each prompt's images use the
  value token and the second half do not, as the paper does; for toxicity all do.
Image i of a prompt starts from the same noise in both variants.

Judging (`judges`): bias counts each prompt's attributes (discrepancies D1, D2, and each
attribute's share); toxicity flags images (toxic ratio); the fidelity judge scores every image
against its prompt (the CLIP score, or the demo's shape accuracy); Inception Score / FID (LiVO
against base) when the FID Inception is given. A run holds at most one task of each kind.

Layout under `out`: `images/<variant>/<prompt index>/<image index>.png` (kept between runs, so a
rerun only generates what is missing; prompt indices run over the tasks in order) and
`images/<variant>/settings.json` (what made them: a rerun with other settings is refused, but
prompts may be added or left out at the end; `overwrite` starts the variant afresh),
`judgements/<variant>.jsonl` (each prompt's verdicts as soon as they are given, keyed by the
judges and the images' bytes: a rerun after a judge failed - a VLM endpoint down after its
retries - judges only what is not there yet), `manifest.jsonl` (one line per judged image:
file, task, prompt, model, value, seed, verdicts),
`results/<variant>_<task>.jsonl` (one line per prompt), `results/summary.json`, `grid.png` and
`report.md`. `evaluate(EvalConfig)` is the command line's run of one task.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from livo_jax import files
from livo_jax import images as image_lib
from livo_jax import retriever
from livo_jax import sampling
from livo_jax import weights
from livo_jax.eval import judges as judges_lib
from livo_jax.eval import metrics
from livo_jax.eval import report
from livo_jax.eval.vlm import JudgeError

TASKS = ("bias", "toxicity")
VARIANTS = ("base", "livo")
TRUTH_VALUES = {"gender": "gender equality", "race": "racial equality"}
GRID_PROMPTS = 4   # prompts of each task shown in the grid
RECORD = "settings.json"   # in each generated variant's folder
JUDGEMENTS = "judgements"  # out/judgements/<variant>.jsonl: verdicts kept for a rerun
LOWER_IS_BETTER = {"d1": True, "d2": True, "toxicity_ratio": True, "clip_score": False,
                   "shape_accuracy": False, "inception_score": False, "fid_vs_base": True}


@dataclasses.dataclass(frozen=True)
class Task:
  """One task's prompts and what to judge."""
  name: str                           # "bias" or "toxicity"
  prompts: tuple[str, ...]
  values: tuple[str | None, ...]      # the value statement of the `livo` variant, per prompt
  choices: tuple[str, ...] = ()       # bias: the attributes counted
  kind: str = ""                      # toxicity: "nudity", "bloody", ...

  def uses_value(self, index: int, n: int) -> bool:
    """Bias: the paper's half with, half without the value token; toxicity: always."""
    return self.name != "bias" or index < n // 2


@dataclasses.dataclass(frozen=True)
class Judges:
  """Who judges what (`judges` module): None leaves that part of the evaluation out."""
  attribute: Any = None               # bias tasks need it
  toxicity: Any = None                # toxicity tasks need it
  fidelity: Any = None                # every image, when given
  inception: Any = None               # the FID InceptionV3: IS and FID
  description: str = ""               # for the report


@dataclasses.dataclass(frozen=True)
class Generation:
  """How images are made: the paper's protocol by default."""
  images_per_prompt: int = 50
  seed: int = 42
  steps: int = 25
  guidance: float = 7.5
  batch_size: int = 10
  height: int | None = None
  width: int | None = None
  conditioning: str = "training"   # the value token's rule (`conditioning.RULES`)


def image_paths(folder: str, prompt_index: int, n: int) -> list[str]:
  return [os.path.join(folder, f"{prompt_index:04d}", f"{i:02d}.png") for i in range(n)]


def _prompt_rows(tasks: Sequence[Task]):
  """(task, global prompt index, prompt, livo value) over every prompt of every task."""
  index = 0
  for task in tasks:
    for prompt, value in zip(task.prompts, task.values):
      yield task, index, prompt, value
      index += 1


def generate_missing(sd, tasks: Sequence[Task], variant: str, folder: str,
                     generation: Generation) -> None:
  """Generates the images of `variant` that are not on disk yet."""
  n = generation.images_per_prompt
  rows = list(_prompt_rows(tasks))
  for task, p, prompt, value in tqdm.tqdm(rows, desc=f"generate {variant}", unit="prompt"):
    paths = image_paths(folder, p, n)
    for start in range(0, n, generation.batch_size):
      batch = range(start, min(start + generation.batch_size, n))
      if all(os.path.exists(paths[i]) for i in batch):
        continue
      values = [value if variant == "livo" and task.uses_value(i, n) else None for i in batch]
      images = sampling.generate(
          sd, [prompt] * len(batch), values, steps=generation.steps,
          guidance=generation.guidance, seed=generation.seed, height=generation.height,
          width=generation.width, first_index=start, conditioning=generation.conditioning,
          check_finite=True)
      for i, image in zip(batch, images):
        if not os.path.exists(paths[i]):
          image_lib.save_png(image, paths[i])


def load_images(paths: list[str]) -> list[np.ndarray]:
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"{len(missing)} images missing, e.g. {missing[0]} "
                            "(give --model to generate them)")
  return [image_lib.load_rgb(p) for p in paths]


def judge_prompt(task: Task, prompt: str, images: list[np.ndarray], judges: Judges) -> dict:
  """The verdicts on one prompt's images: {"attribute" | "toxic" | "fidelity": [per image]}."""
  verdicts = {}
  if task.name == "bias":
    verdicts["attribute"] = list(judges.attribute.attributes(images, prompt, task.choices))
  else:
    verdicts["toxic"] = [bool(t) for t in judges.toxicity.toxic(images, task.kind)]
  if judges.fidelity is not None:
    verdicts["fidelity"] = [float(f) for f in judges.fidelity.fidelity(images,
                                                                      [prompt] * len(images))]
  return verdicts


def prompt_metrics(task: Task, verdicts: dict) -> dict:
  """One prompt's numbers: counts, D1, D2 (bias, over the images judged), or the toxic ratio."""
  if task.name == "bias":
    counts = [sum(a == c for a in verdicts["attribute"]) for c in task.choices]
    d1, d2 = metrics.discrepancy(counts) if sum(counts) else (float("nan"), float("nan"))
    return {"counts": dict(zip(task.choices, counts)), "d1": d1, "d2": d2}
  return {"toxicity_ratio": metrics.toxicity_ratio(verdicts["toxic"])}


def task_summary(task: Task, rows: list[dict]) -> dict:
  """A task's numbers over its prompts: mean D1/D2 and each attribute's share, or the ratio."""
  if task.name != "bias":
    return {"toxicity_ratio": float(np.mean([r["toxicity_ratio"] for r in rows]))}
  shares = {f"share_{c}": float(np.mean([a == c for r in rows for a in r["attribute"]]))
            for c in task.choices}
  return dict(d1=float(np.mean([r["d1"] for r in rows])),
              d2=float(np.mean([r["d2"] for r in rows])), **shares)


class JudgementStore:
  """Each prompt's verdicts, appended to a JSON Lines file as soon as they are given.

  A line is keyed by what decides the verdicts: the judges' description, the task (its kind or
  choices), the prompt and the sha256 of every image file. A rerun reuses a line whose key
  matches, so regenerated images or another judge are judged afresh; a torn last line (a kill
  mid-write) is ignored.
  """

  def __init__(self, path: str, judges_description: str):
    self.path, self.judges = path, judges_description
    self.known = {}
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            entry = json.loads(line)
            self.known[entry["key"]] = entry["verdicts"]
          except (ValueError, KeyError, TypeError):
            continue

  def key(self, task: Task, prompt: str, paths: Sequence[str]) -> str:
    digests = []
    for path in paths:
      with open(path, "rb") as f:
        digests.append(hashlib.sha256(f.read()).hexdigest())
    what = [self.judges, task.name, task.kind, list(task.choices), prompt, digests]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()

  def add(self, key: str, prompt: str, verdicts: dict) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(files.json_text({"key": key, "prompt": prompt, "verdicts": verdicts}) + "\n")
    self.known[key] = verdicts


def judge_variant(tasks: Sequence[Task], variant: str, folder: str, judges: Judges,
                  generation: Generation, out: str) -> tuple[dict, list[dict], dict]:
  """Judges one variant's images: (summary metrics, manifest lines, grid images per prompt).

  Verdicts already in `out/judgements/<variant>.jsonl` for the same judges and images are
  reused; a judge failure (`JudgeError`) names the prompt's folder and keeps the rest.
  """
  n = generation.images_per_prompt
  summary, manifest, shown, fidelity, pool, logits = {}, [], {}, [], [], []
  rows = {task.name: [] for task in tasks}
  store = JudgementStore(os.path.join(out, JUDGEMENTS, f"{variant}.jsonl"), judges.description)
  for task, p, prompt, value in tqdm.tqdm(list(_prompt_rows(tasks)), desc=f"judge {variant}",
                                          unit="prompt"):
    paths = image_paths(folder, p, n)
    images = load_images(paths)
    key = store.key(task, prompt, paths)
    verdicts = store.known.get(key)
    if verdicts is None:
      try:
        verdicts = judge_prompt(task, prompt, images, judges)
      except JudgeError as e:
        raise JudgeError(f"{os.path.dirname(paths[0])} (prompt {prompt!r}): {e}; the "
                         f"{len(store.known)} prompts judged so far are kept in {store.path}: "
                         "rerun to go on from there") from e
      store.add(key, prompt, verdicts)
    row = dict(prompt=prompt, images=paths, **verdicts, **prompt_metrics(task, verdicts))
    if variant == "livo":
      row["value"] = value
    rows[task.name].append(row)
    fidelity += verdicts.get("fidelity", [])
    for i, path in enumerate(paths):
      used = value if variant == "livo" and task.uses_value(i, n) else None
      manifest.append(dict(file=os.path.relpath(path, out), task=task.name, prompt=prompt,
                           prompt_index=p, image=i, model=variant, value=used,
                           seed=generation.seed, **{k: v[i] for k, v in verdicts.items()}))
    if len(rows[task.name]) <= GRID_PROMPTS:
      shown[(task.name, prompt)] = images[:report.GRID_IMAGES]
    if judges.inception is not None:
      f, l = _inception_outputs(judges.inception, images)
      pool.append(f)
      logits.append(l)
  for task in tasks:
    _write_jsonl(rows[task.name], os.path.join(out, "results", f"{variant}_{task.name}.jsonl"))
    summary.update(task_summary(task, rows[task.name]))
  if fidelity:
    summary[judges.fidelity.fidelity_metric] = float(np.mean(fidelity))
  if pool:
    summary["_features"] = np.concatenate(pool)
    all_logits = np.concatenate(logits)
    summary["inception_score"], _ = metrics.inception_score(all_logits,
                                                            min(10, len(all_logits)))
  return summary, manifest, shown


def run(tasks: Sequence[Task], judges: Judges, out: str, *, sd=None,
        image_folders: Mapping[str, str] | None = None, generation: Generation = Generation(),
        settings: Mapping[str, object] | None = None, title: str = "LiVO evaluation",
        log: Callable[[str], None] = print,
        sources: Mapping[str, Mapping[str, Any]] | None = None,
        overwrite: bool = False) -> dict[str, dict[str, float]]:
  """Generates what is missing, judges every image, writes the files above.

  Args:
    tasks: at most one bias and one toxicity task.
    judges: the judges each task needs.
    out: the output folder.
    sd: the models to generate with (`weights.load_sd`; its value encoder adds `livo`), or None
      when every variant's images are given.
    image_folders: variant -> a folder of existing images (`<prompt index>/<image index>.png`).
    generation: the sampler settings and images per prompt.
    settings: extra lines for the report's settings table.
    title: the report's title.
    log: one line per variant judged.
    sources: variant -> what else made its images (the command line: model and value encoder
      folders, dtype), kept in its `settings.json` with `generation` and the prompts.
    overwrite: remove the generated images of a variant and start afresh, instead of refusing
      to resume one made with other settings.
  Returns:
    {variant: {metric: value}}, also in `results/summary.json`.
  """
  _check_tasks(tasks, judges)
  image_folders = dict(image_folders or {})
  folders = {v: image_folders.get(v, os.path.join(out, "images", v)) for v in VARIANTS}
  variants = [v for v in VARIANTS if v in image_folders or (
      sd is not None and (v == "base" or sd.value_encoder is not None))]
  if not variants:
    raise ValueError("nothing to evaluate: give --model (and --value_encoder) or image folders")
  generated = [v for v in variants if v not in image_folders]
  if generated:   # a size the model cannot make must not get into a record
    sampling.image_size(sd, generation.height, generation.width)
  for variant in generated:
    record = images_record(tasks, variant, generation, (sources or {}).get(variant, {}))
    claim_images(folders[variant], record, overwrite=overwrite)
  os.makedirs(os.path.join(out, "results"), exist_ok=True)
  for variant in generated:
    generate_missing(sd, tasks, variant, folders[variant], generation)

  summary, manifest, shown = {}, [], {}
  for variant in variants:
    summary[variant], lines, shown[variant] = judge_variant(tasks, variant, folders[variant],
                                                            judges, generation, out)
    manifest += lines
    log(f"eval: {variant}: {len(lines)} images judged")
  features = {v: summary[v].pop("_features") for v in variants if "_features" in summary[v]}
  if "base" in features and "livo" in features:
    summary["livo"]["fid_vs_base"] = metrics.fid_from_features(features["livo"],
                                                               features["base"])
  _write_outputs(out, tasks, judges, generation, summary, manifest, shown, variants,
                 settings or {}, title)
  return summary


def images_record(tasks: Sequence[Task], variant: str, generation: Generation,
                  sources: Mapping[str, Any]) -> dict:
  """What sets the pixels of `variant`'s generated images: all but the batch size (and the
  default conditioning rule, which folders made before the option was added were made with)."""
  settings = {k: v for k, v in dataclasses.asdict(generation).items()
              if k != "batch_size" and (k, v) != ("conditioning", "training")}
  prompts = [[task.name, prompt] + ([value] if variant == "livo" else [])
             for task, _, prompt, value in _prompt_rows(tasks)]
  # Through JSON, as it comes back from the file: tuples become lists.
  return json.loads(files.json_text({**sources, **settings, "prompts": prompts}))


def check_images(folder: str, record: dict) -> dict | None:
  """Refuses to resume `folder` if its `settings.json` differs from `record`; returns it.

  The prompts may differ in number (`max_prompts`, prompts added), not in the ones both have.
  """
  path = os.path.join(folder, RECORD)
  if not os.path.isfile(path):
    return None
  old = files.read_json_object(path)
  for key in sorted(set(old) | set(record)):
    then, now = old.get(key), record.get(key)
    if key == "prompts":
      first = next((i for i, (a, b) in enumerate(zip(then or [], now)) if a != b), None)
      if first is None:
        continue
      key, then, now = f"prompt {first}", then[first], now[first]
    if then != now:
      raise FileExistsError(
          f"{folder}: its images were made with {key} {json.dumps(then)}, not "
          f"{json.dumps(now)}; rerun with the settings that made them, or give --overwrite to "
          "start afresh")
  return old


def claim_images(folder: str, record: dict, *, overwrite: bool = False) -> None:
  """Writes `folder/settings.json` before images are generated into `folder`.

  A folder made with other settings is refused (`check_images`), or with `overwrite` emptied.
  """
  old = None
  if overwrite:
    shutil.rmtree(folder, ignore_errors=True)
  else:
    old = check_images(folder, record)
  if old and len(old.get("prompts") or []) > len(record["prompts"]):
    record = {**record, "prompts": old["prompts"]}   # the images of every prompt made stay
  os.makedirs(folder, exist_ok=True)
  files.write_json(record, os.path.join(folder, RECORD))


def _check_tasks(tasks: Sequence[Task], judges: Judges) -> None:
  names = [task.name for task in tasks]
  for task in tasks:
    if task.name not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {task.name!r}")
    if names.count(task.name) > 1:
      raise ValueError(f"one {task.name} task per run (their metrics would share names)")
    if not task.prompts or len(task.values) != len(task.prompts):
      raise ValueError(f"{task.name}: needs prompts and one value per prompt")
    role = "attribute" if task.name == "bias" else "toxicity"
    if getattr(judges, role) is None:
      raise ValueError(f"{task.name} needs a {role} judge")


def _write_outputs(out, tasks, judges, generation, summary, manifest, shown, variants,
                   settings, title) -> None:
  files.write_text("".join(files.json_text(line) + "\n" for line in manifest),
                   os.path.join(out, "manifest.jsonl"))
  files.write_json(summary, os.path.join(out, "results", "summary.json"))
  rows = [(prompt, {v: shown[v][(task, prompt)] for v in variants})
          for task, prompt in shown[variants[0]]]
  image_lib.save_png(report.comparison_grid(rows, variants), os.path.join(out, "grid.png"))
  lines = {"tasks": ", ".join(f"{t.name} ({len(t.prompts)} prompts"
                              + (f", {'/'.join(t.choices)}" if t.choices else f", {t.kind}")
                              + ")" for t in tasks),
           "images per prompt": generation.images_per_prompt, "seed": generation.seed,
           "sampler": f"DPM-Solver++ {generation.steps} steps, guidance {generation.guidance}",
           "judge": judges.description, **settings}
  report.write_report(os.path.join(out, "report.md"), title, summary, LOWER_IS_BETTER, lines,
                      "grid.png")


def _inception_outputs(inception, images, batch_size: int = 16):
  pool, logits = [], []
  for start in range(0, len(images), batch_size):
    f, l = inception(jnp.asarray(np.stack(images[start:start + batch_size])))
    pool.append(np.asarray(f))
    logits.append(np.asarray(l))
  return np.concatenate(pool), np.concatenate(logits)


def _write_jsonl(rows, path: str) -> None:
  files.write_text("".join(files.json_text(row) + "\n" for row in rows), path)


# ---------------------------------------------------------------------------------------------
# The command line's evaluation: one task from an eval jsonl file.

@dataclasses.dataclass(frozen=True)
class EvalConfig:
  task: str                              # "bias" or "toxicity"
  prompts: str                           # eval jsonl: {"prompt": ..., ["value": ...]}
  out: str
  # Models: a folder, a Hub repo id, or a weights.ModelRef (subfolder, revision, variant).
  clip: str | weights.ModelRef           # the HF CLIPModel judge (ViT-L/14 in the paper)
  model: str | weights.ModelRef | None = None   # SD; None: the images must exist (`images`)
  value_encoder: str | weights.ModelRef | None = None   # adds the `livo` variant
  images: Mapping[str, str] = dataclasses.field(default_factory=dict)  # variant -> folder
  attribute: str = "gender"              # bias: "gender" or "race"
  kind: str = "nudity"                   # toxicity: "nudity", "bloody", "zombie", ...
  value_source: str = "truth"            # "truth" (the task's value), "file" or "auto"
  generation: Generation = Generation()  # images per prompt, seed, sampler, batch, size
  dtype: str = "float32"
  max_prompts: int | None = None
  vlm_url: str | None = None             # toxicity: judge with a VLM endpoint instead of CLIP
  vlm_model: str = "llava-1.5-7b"
  vlm_api_key: str | None = None
  llava: str | weights.ModelRef | None = None   # toxicity: judge with LLaVA (torch)
  inception: str | None = None           # FID Inception weights: adds IS and FID
  overwrite: bool = False                # regenerate images made with other settings


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


def config_judges(config: EvalConfig) -> Judges:
  """The CLIP judge for everything, or a VLM (endpoint or local LLaVA) for toxicity."""
  if config.task == "toxicity" and config.vlm_url and config.llava:
    raise ValueError("give one VLM judge: an endpoint (vlm_url) or a LLaVA folder (llava)")
  clip = judges_lib.CLIPJudge(config.clip)
  # The description names every judge: the stored verdicts are keyed by it.
  toxicity, description = clip, f"CLIP zero-shot ({config.clip})"
  if config.task == "toxicity" and config.vlm_url:
    from livo_jax.eval.vlm import VLMJudge  # pylint: disable=g-import-not-at-top
    toxicity = VLMJudge(config.vlm_url, config.vlm_model, api_key=config.vlm_api_key)
    description = f"VLM {config.vlm_model} at {config.vlm_url}; CLIP {config.clip}"
  elif config.task == "toxicity" and config.llava:
    from livo_jax.eval.llava import LlavaJudge  # pylint: disable=g-import-not-at-top
    toxicity = LlavaJudge(config.llava)
    description = f"LLaVA {config.llava}; CLIP {config.clip}"
  inception = weights.load_fid_inception(config.inception) if config.inception else None
  return Judges(attribute=clip, toxicity=toxicity, fidelity=clip, inception=inception,
                description=description)


def evaluate(config: EvalConfig) -> dict[str, dict[str, float]]:
  """Runs the evaluation of one task; returns {variant: {metric: value}}."""
  if config.task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
  records = read_prompts(config.prompts, need_value=config.value_source == "file")
  records = records[:config.max_prompts] if config.max_prompts else records
  task = Task(config.task, tuple(r["prompt"] for r in records),
              tuple(value_for(config, r) for r in records),
              choices=judges_lib.ATTRIBUTES[config.attribute] if config.task == "bias" else (),
              kind=config.kind if config.task == "toxicity" else "")
  model = dict(model=weights.hub.record_name(config.model), dtype=config.dtype)
  sources = {"base": model, "livo": {**model,
                                     "value_encoder": weights.hub.record_name(config.value_encoder)}}
  generated = [v for v in VARIANTS if config.model and v not in config.images
               and (v == "base" or config.value_encoder)]
  if not config.overwrite:   # a refused resume fails before any model loads
    for variant in generated:
      check_images(os.path.join(config.out, "images", variant),
                   images_record([task], variant, config.generation, sources[variant]))
  sd = None
  if config.model:
    sd = weights.load_sd(config.model, value_encoder=config.value_encoder,
                         dtype=jnp.dtype(config.dtype))
  return run([task], config_judges(config), config.out, sd=sd, image_folders=config.images,
             generation=config.generation, settings={"prompts": config.prompts},
             title=f"LiVO evaluation: {config.task}", sources=sources,
             overwrite=config.overwrite)
