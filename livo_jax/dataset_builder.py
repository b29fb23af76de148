"""Builds a livo_data folder with Stable Diffusion itself, as the paper built its dataset.

  specs = read_spec("spec.jsonl")
  sd = weights.load_sd("sd15")
  summary = build_dataset(sd, specs, "livo_data", steps=25, guidance=7.5, scheduler="dpm",
                          seed=0, batch_size=8)

A spec is a JSON Lines file, one scene per line (docs/build_dataset.md):

  {"type": "toxicity", "scene": "bloody-knight", "value": "bloody considered inappropriate",
   "prompt": "a knight after a bloody battle",
   "aligned_prompts": ["a knight after a battle, clean shining armour"],
   "violating_prompts": ["a knight after a bloody battle, covered in blood"],
   "num_aligned": 4, "num_violating": 4}

Each scene becomes `OUT/<type>/<scene>/` with its PNGs and a `metadata.jsonl` that
`livo_jax.data.prepare` reads: label 1 for the aligned images, 0 for the violating ones, `prompt`
and `value` from the spec, and extra fields saying how each image was made (`generated_from`,
`negative_prompt`, `seed`, `index`, `steps`, `guidance`, `scheduler`, `height`, `width`).
Image k of a side uses that side's prompts round-robin and `sampling.generate(..., seed=
side_seed(seed, type, scene, side), first_index=k)` in the batch of images
[k // batch_size * batch_size, ...) of that side, so a scene's images do not depend on its place
in the spec. A file name holds a hash of everything that sets its pixels but the model and the
batch size, so a rerun keeps the images it already has and remakes only missing ones and those
whose prompts changed. `OUT/build_settings.json` records the model and sampler settings that
made the folder: a rerun with others is refused, unless `overwrite`, which makes every image of
the spec afresh.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Callable, Sequence

import tqdm
from PIL import Image

from livo_jax import files
from livo_jax import sampling
from livo_jax import weights
from livo_jax.weights import StableDiffusion
from livo_jax.data import livo_data
from livo_jax.data.livo_data import METADATA
from livo_jax.errors import DataError

SUMMARY = "build_summary.json"
SETTINGS = "build_settings.json"
SIDES = (("aligned", 1), ("violating", 0))   # (side, label)
_REQUIRED = {"type": str, "scene": str, "value": str, "prompt": str, "aligned_prompts": list,
             "violating_prompts": list}
_OPTIONAL = {"aligned_negative_prompt": str, "violating_negative_prompt": str,
             "num_aligned": int, "num_violating": int}
# Starts with a letter or digit: never hidden (livo_data skips those), never "." or "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_IMAGE_NAME = re.compile(r"(aligned|violating)_\d+_[0-9a-f]{8}\.png")


class SpecError(DataError):
  """A spec line is not valid JSON, or a field of it is missing, unknown or bad."""


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """One spec line: the images of one scene."""
  type: str
  scene: str
  value: str
  prompt: str
  aligned_prompts: tuple[str, ...]
  violating_prompts: tuple[str, ...]
  aligned_negative_prompt: str = ""
  violating_negative_prompt: str = ""
  num_aligned: int | None = None      # None: one image per prompt
  num_violating: int | None = None

  def prompts(self, side: str) -> tuple[str, ...]:
    return getattr(self, f"{side}_prompts")

  def negative_prompt(self, side: str) -> str:
    return getattr(self, f"{side}_negative_prompt")

  def count(self, side: str) -> int:
    count = getattr(self, f"num_{side}")
    return len(self.prompts(side)) if count is None else count


def _check_field(name: str, value) -> None:
  """Raises ValueError with the reason if a known field's value is bad."""
  kind = {**_REQUIRED, **_OPTIONAL}[name]
  # bool is an int subclass in Python, but `true` is not a count.
  if not isinstance(value, kind) or isinstance(value, bool):
    expected = {str: "a string", list: "a list of strings", int: "an integer"}[kind]
    raise ValueError(f"field {name!r} must be {expected}, got {json.dumps(value)}")
  if name in ("type", "scene") and not _SAFE_NAME.fullmatch(value):
    raise ValueError(f"field {name!r} is {json.dumps(value)}, not a safe folder name (letters, "
                     "digits, '.', '_', '-'; starting with a letter or digit; at most 100)")
  if name == "type" and value in (SUMMARY, SETTINGS):
    raise ValueError(f"field 'type' is {value!r}, the name of a file the builder writes")
  if name in ("value", "prompt") and not value.strip():
    raise ValueError(f"field {name!r} is empty")
  if kind is list:
    if not value:
      raise ValueError(f"field {name!r} is an empty list")
    for prompt in value:
      if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field {name!r} holds {json.dumps(prompt)}, not a non-empty string")
  if kind is int and value < 1:
    raise ValueError(f"field {name!r} must be positive, got {value}")


def _parse_line(raw: bytes) -> dict:
  """One spec line -> its fields, checked; raises ValueError with the reason."""
  obj = livo_data.json_object(raw)
  unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
  if unknown:
    raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(_REQUIRED)}, "
                     f"{', '.join(_OPTIONAL)})")
  missing = [name for name in _REQUIRED if name not in obj]
  if missing:
    raise ValueError(f"missing field {missing[0]!r}")
  for name, value in obj.items():
    _check_field(name, value)
  return obj


def read_spec(path: str) -> list[SceneSpec]:
  """Reads and checks a spec file (JSON Lines, blank lines skipped).

  Raises:
    SpecError: naming the file and line, for a line that is not a JSON object, a missing,
      unknown or ill-typed field, an empty prompt list, a count below 1, a type or scene that is
      not a safe folder name, or a (type, scene) already on an earlier line; or a file with no
      scene at all.
  """
  if not os.path.isfile(path):
    raise SpecError(f"{path}: no such spec file")
  specs, seen = [], {}
  for where, raw in livo_data.numbered_lines(path):
    try:
      obj = _parse_line(raw)
    except ValueError as e:
      raise SpecError(f"{where}: {e}") from None
    key = (obj["type"], obj["scene"])
    if key in seen:
      raise SpecError(f"{where}: type {key[0]!r} scene {key[1]!r} is already on line "
                      f"{seen[key]}")
    seen[key] = where.rsplit(":", 1)[1]
    specs.append(SceneSpec(**{**obj, "aligned_prompts": tuple(obj["aligned_prompts"]),
                              "violating_prompts": tuple(obj["violating_prompts"])}))
  if not specs:
    raise SpecError(f"{path}: no scene (expected one JSON object per line)")
  return specs


def side_seed(seed: int, type_name: str, scene: str, side: str) -> int:
  """The noise seed of one side of a scene: a stable hash of (seed, type, scene, side).

  31 bits, a non-negative int32 that `jax.random.PRNGKey` takes on every platform.
  """
  digest = hashlib.sha256(json.dumps([seed, type_name, scene, side]).encode()).digest()
  return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _plan(spec: SceneSpec, *, seed: int, settings: dict) -> list[dict]:
  """The metadata lines of a scene: aligned images 0..n-1, then violating 0..m-1."""
  lines = []
  for side, label in SIDES:
    prompts = spec.prompts(side)
    stream = side_seed(seed, spec.type, spec.scene, side)
    for index in range(spec.count(side)):
      made = {"generated_from": prompts[index % len(prompts)],
              "negative_prompt": spec.negative_prompt(side), "seed": stream, "index": index,
              **settings}
      # Everything that sets the pixels (but the model), so a changed spec or setting
      # never reuses a stale image.
      digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:8]
      lines.append({"file_name": f"{side}_{index:05d}_{digest}.png", "prompt": spec.prompt,
                    "value": spec.value, "label": label, **made})
  return lines


def _blocks(plan: Sequence[dict], batch_size: int) -> list[list[dict]]:
  """Each side's lines in blocks of batch_size consecutive indices: the batches of a build.

  A resumed build regenerates a whole block to remake any image of it, so every image comes
  from the same batch as in an uninterrupted build (a batch of another size can round a pixel
  differently).
  """
  blocks = []
  for _, label in SIDES:
    lines = [line for line in plan if line["label"] == label]
    blocks += [lines[i:i + batch_size] for i in range(0, len(lines), batch_size)]
  return blocks


def _read_text(path: str) -> str | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


def _tidy(folder: str, keep: set[str]) -> int:
  """Removes killed runs' temporaries and our images not in `keep`; returns how many images."""
  files.remove_leftovers(folder)
  removed = 0
  for name in os.listdir(folder):
    if _IMAGE_NAME.fullmatch(name) and name not in keep:
      os.remove(os.path.join(folder, name))
      removed += 1
  return removed


def _make_scene(sd, plan: list[dict], folder: str, have: set[str], *, batch_size: int,
                sample: dict, bar: tqdm.tqdm) -> int:
  """Makes a scene's missing images, then its metadata; returns how many stale images went."""
  os.makedirs(folder, exist_ok=True)
  for block in _blocks(plan, batch_size):
    missing = [(i, line) for i, line in enumerate(block) if line["file_name"] not in have]
    if not missing:
      continue
    pixels = sampling.generate(
        sd, [line["generated_from"] for line in block],
        negative_prompts=[line["negative_prompt"] for line in block], seed=block[0]["seed"],
        first_index=block[0]["index"], check_finite=True, **sample)
    for i, line in missing:
      with files.atomic_file(os.path.join(folder, line["file_name"])) as tmp:
        Image.fromarray(pixels[i]).save(tmp, "PNG")
    bar.update(len(missing))
  metadata = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in plan)
  meta_path = os.path.join(folder, METADATA)
  if _read_text(meta_path) != metadata:   # an unchanged file keeps its mtime
    files.write_text(metadata, meta_path)
  return _tidy(folder, {line["file_name"] for line in plan})


def settings_record(*, model: str | weights.ModelRef | None, steps: int, guidance: float, scheduler: str,
                    seed: int, height: int | None, width: int | None) -> dict:
  """What sets the pixels of a build besides the spec (the batch size only rounds a few)."""
  return {"model": weights.hub.record_name(model), "steps": int(steps), "guidance": float(guidance),
          "scheduler": scheduler, "seed": seed, "height": height, "width": width}


def check_settings(out_dir: str, record: dict) -> None:
  """Refuses to resume a folder that `build_settings.json` says was made with other settings."""
  path = os.path.join(out_dir, SETTINGS)
  if not os.path.isfile(path):
    return
  old = files.read_json_object(path)
  for key in sorted(set(old) | set(record)):
    if old.get(key) != record.get(key):
      raise FileExistsError(
          f"{out_dir}: built with {key} {json.dumps(old.get(key))}, not "
          f"{json.dumps(record.get(key))}; rerun with the settings that made it, or give "
          "--overwrite to make every image afresh")


def build(model: str | weights.ModelRef, spec: str, out_dir: str, *, steps: int = 25, guidance: float = 7.5,
          scheduler: str = "dpm", seed: int = 0, batch_size: int = 8, height: int | None = None,
          width: int | None = None, overwrite: bool = False) -> dict:
  """`build_dataset` from a model folder and a spec file, as the command line runs it.

  The spec and a resume's settings are checked before the model loads, so their errors come at
  once.
  """
  specs = read_spec(spec)
  sampler = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, height=height,
                 width=width)
  if not overwrite:
    check_settings(out_dir, settings_record(model=model, **sampler))
  return build_dataset(weights.load_sd(model), specs, out_dir, batch_size=batch_size,
                       model=model, overwrite=overwrite, **sampler)


def build_dataset(sd: StableDiffusion, specs: Sequence[SceneSpec], out_dir: str, *,
                  steps: int = 25, guidance: float = 7.5, scheduler: str = "dpm", seed: int = 0,
                  batch_size: int = 8, height: int | None = None, width: int | None = None,
                  model: str | weights.ModelRef | None = None, overwrite: bool = False,
                  log: Callable[[str], None] = tqdm.tqdm.write) -> dict:
  """Generates every scene's missing images and writes its metadata; resumable.

  Scenes are made in spec order. An image file already there is kept; a scene's
  `metadata.jsonl` is written (atomically) once all its images exist, and our images it no longer
  names are removed, so a killed run leaves each finished scene complete and a rerun makes the
  rest. A folder whose `build_settings.json` names other settings (or another `model`) is
  refused.

  Args:
    sd: the loaded models (no value encoder is used: aligned and violating images come from
      plain SD and the spec's prompts).
    specs: the scenes, from `read_spec`.
    out_dir: the livo_data folder to write (created if needed).
    steps, guidance, scheduler: sampler settings ("dpm" or "ddim").
    seed: the base seed of every side's noise stream (`side_seed`).
    batch_size: images per `generate` call: blocks of consecutive images of one side of a scene.
    height, width: image size (default: the model's).
    model: the model (folder or Hub id), recorded so that a resume with another one is refused.
    overwrite: instead of refusing other settings, remove the images and metadata of every
      scene of the spec and make them afresh (other scenes' folders are left alone).
    log: one line per scene and the summary (default: tqdm's, which keeps the bar intact).
  Returns:
    The summary, also written to `out_dir/build_summary.json`: scenes, images, generated,
    reused, removed (stale images), per_type ({type: {scenes, aligned, violating}}), seconds and
    the settings.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  start = time.monotonic()
  size = sampling.image_size(sd, height, width)   # before a bad size gets into the record
  record = settings_record(model=model, steps=steps, guidance=guidance, scheduler=scheduler,
                           seed=seed, height=height, width=width)
  folders = [os.path.join(out_dir, spec.type, spec.scene) for spec in specs]
  if not overwrite:
    check_settings(out_dir, record)
  else:
    for folder in filter(os.path.isdir, folders):
      _tidy(folder, keep=set())
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, METADATA))
  os.makedirs(out_dir, exist_ok=True)
  files.write_json(record, os.path.join(out_dir, SETTINGS))
  # float(): guidance 7 and 7.0 make the same images, so they must hash alike.
  sample = {"steps": int(steps), "guidance": float(guidance), "scheduler": scheduler,
            "height": size[0], "width": size[1]}
  plans = [_plan(spec, seed=seed, settings=sample) for spec in specs]
  haves = [{line["file_name"] for line in plan
            if os.path.isfile(os.path.join(folder, line["file_name"]))}
           for plan, folder in zip(plans, folders)]
  images = sum(map(len, plans))
  reused = sum(map(len, haves))
  removed, per_type = 0, {}
  with tqdm.tqdm(total=images - reused, unit="img", desc="Generating") as bar:
    for spec, plan, folder, have in zip(specs, plans, folders, haves):
      stale = _make_scene(sd, plan, folder, have, batch_size=batch_size, sample=sample, bar=bar)
      removed += stale
      counts = per_type.setdefault(spec.type, {"scenes": 0, "aligned": 0, "violating": 0})
      counts["scenes"] += 1
      for side, _ in SIDES:
        counts[side] += spec.count(side)
      log(f"{spec.type}/{spec.scene}: {len(plan) - len(have)} generated, {len(have)} reused"
          + (f", {stale} stale removed" if stale else "") + f" -> {folder}")
  summary = {"scenes": len(specs), "images": images, "generated": images - reused,
             "reused": reused, "removed": removed, "per_type": per_type,
             "seconds": round(time.monotonic() - start, 3), "seed": seed,
             "batch_size": batch_size, **sample}
  files.write_json(summary, os.path.join(out_dir, SUMMARY))
  log(f"built {out_dir}: {len(specs)} scenes, {images} images ({images - reused} generated, "
      f"{reused} reused) in {summary['seconds']:.1f} s; "
      + ", ".join(f"{t}: {c['aligned']} aligned + {c['violating']} violating"
                  for t, c in per_type.items()))
  return summary
