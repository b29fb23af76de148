"""Reads and validates a raw livo_data folder (docs/method.md §3).

  TRAIN_DIR/<type_dir>/<scene_dir>/metadata.jsonl   one JSON object per line:
      {"file_name": ..., "prompt": ..., "value": ..., "label": 1 (aligned) | 0 (violating)}
  TRAIN_DIR/<type_dir>/<scene_dir>/<file_name>      the images (jpg/png)

A scene is a folder holding a `metadata.jsonl`; folders are walked in sorted order (hidden ones
skipped). `scan` checks every line and really decodes every image; each problem names the
metadata file and line. A `file_name` is a path relative to its scene folder that stays inside
the data folder, symbolic links resolved. With `skip_bad`, bad lines are counted and left out
instead, and so is a scene left with aligned but no violating images.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Callable, Iterator

import tqdm
from PIL import Image

from livo_jax.errors import DataError

METADATA = "metadata.jsonl"
# Part of every fingerprint: bump it when what `prepare` writes changes.
FORMAT_VERSION = 1
_FIELDS = ("file_name", "prompt", "value")  # str fields; `label` is checked apart
MAX_REASONS = 10  # skip reasons kept and logged


@dataclasses.dataclass(frozen=True)
class Record:
  """One valid metadata line."""
  path: str         # image path relative to train_dir
  prompt: str
  value: str
  label: int        # 1 aligned, 0 violating
  scene: int        # index into Scan.scenes
  extra: str        # the line's other fields, as a JSON object
  where: str        # "metadata path:line", for messages


@dataclasses.dataclass(frozen=True)
class Scan:
  """The valid records of a livo_data folder, in folder and line order."""
  train_dir: str
  records: list[Record]
  scenes: list[str]        # each scene's metadata file, relative to train_dir
  skipped: int             # metadata lines left out (skip_bad)
  skip_reasons: list[str]  # the first MAX_REASONS of them

  @property
  def num_aligned(self) -> int:
    return sum(r.label for r in self.records)


def _walk(train_dir: str) -> Iterator[tuple[str, list[str]]]:
  """(folder relative to train_dir, its file names) in sorted order, hidden entries skipped."""
  for folder, dirs, files in os.walk(train_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    rel = os.path.relpath(folder, train_dir)
    yield ("" if rel == "." else rel), sorted(f for f in files if not f.startswith("."))


def fingerprint(train_dir: str, *, skip_bad: bool) -> str:
  """A hash of the metadata files' bytes, every other file's size and mtime, and the options.

  Cheap (no image is opened), so an unchanged folder is recognised without re-validating it.
  """
  h = hashlib.sha256(f"livo_data format {FORMAT_VERSION} skip_bad={skip_bad}\n".encode())
  for rel, files in _walk(train_dir):
    for name in files:
      path = os.path.join(train_dir, rel, name)
      if name == METADATA:
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        h.update(f"{os.path.join(rel, name)} {digest}\n".encode())
      else:
        try:
          stat = os.stat(path)
          state = f"{stat.st_size} {stat.st_mtime_ns}"
        except OSError:  # a dangling link: `scan` reports it if a line names it
          state = "unreadable"
        h.update(f"{os.path.join(rel, name)} {state}\n".encode())
  return h.hexdigest()[:16]


def json_object(raw: bytes) -> dict:
  """One line of a jsonl file -> its JSON object; raises ValueError with the reason.

  (Also the dataset tool's spec reader: both name the file and line around the reason.)
  """
  try:
    obj = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 ({e.reason})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def numbered_lines(path: str) -> Iterator[tuple[str, bytes]]:
  """("<path>:<line number>", raw line) for each non-blank line of a jsonl file."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if raw.strip():
        yield f"{path}:{number}", raw


def _parse_line(raw: bytes) -> dict:
  """One metadata line -> its fields; raises ValueError with the reason."""
  obj = json_object(raw)
  for field in _FIELDS + ("label",):
    if field not in obj:
      raise ValueError(f"missing field {field!r}")
  for field in _FIELDS:
    if not isinstance(obj[field], str):
      raise ValueError(f"field {field!r} must be a string, got {json.dumps(obj[field])}")
  label = obj["label"]
  # bool is an int subclass in Python, but `true` is not a label.
  if isinstance(label, bool) or not isinstance(label, int) or label not in (0, 1):
    raise ValueError(f"field 'label' must be 0 (violating) or 1 (aligned), got {json.dumps(label)}")
  return obj


def _check_inside(root: str, scene_dir: str, file_name: str) -> None:
  """A metadata line names a file of the data folder (`root`, resolved), not any file at all.

  Raises ValueError with the reason for an absolute file_name, or one that leads outside (with
  `..`, or through a symbolic link).
  """
  if os.path.isabs(file_name):
    raise ValueError(f"field 'file_name' must be relative to its scene folder, got "
                     f"{json.dumps(file_name)}")
  target = os.path.realpath(os.path.join(scene_dir, file_name))
  if os.path.commonpath([root, target]) != root:
    raise ValueError(f"field 'file_name' {json.dumps(file_name)} leads outside the data folder "
                     f"(to {target})")


def _check_image(path: str) -> str | None:
  """None if the image decodes fully, else why not."""
  if not os.path.isfile(path):
    return f"image {path} is missing"
  try:
    with Image.open(path) as image:
      image.verify()   # checksums and structure, without decoding pixels
    with Image.open(path) as image:
      image.convert("RGB")   # a truncated file only fails here
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds on bad files
    return f"image {path} is unreadable or corrupt ({type(e).__name__}: {e})"
  return None


class _Problems:
  """Raises the first problem, or with skip_bad counts them and keeps the first few."""

  def __init__(self, skip_bad: bool):
    self.skip_bad = skip_bad
    self.count = 0
    self.reasons = []

  def add(self, where: str, reason: str, lines: int = 1):
    message = f"{where}: {reason}"
    if not self.skip_bad:
      raise DataError(message)
    self.count += lines
    if len(self.reasons) < MAX_REASONS:
      self.reasons.append(message)


def scan(train_dir: str, *, skip_bad: bool = False, log: Callable[[str], None] = print) -> Scan:
  """Validates a livo_data folder; raises DataError at the first problem unless skip_bad."""
  train_dir = os.path.abspath(train_dir)
  if not os.path.isdir(train_dir):
    raise DataError(f"{train_dir}: no such folder")
  root = os.path.realpath(train_dir)
  problems = _Problems(skip_bad)
  parsed = []  # the lines that parse, as Records
  scenes = []
  for rel, files in _walk(train_dir):
    if METADATA not in files:
      continue
    meta = os.path.join(train_dir, rel, METADATA)
    scenes.append(os.path.join(rel, METADATA))
    for where, raw in numbered_lines(meta):
      try:
        obj = _parse_line(raw)
        _check_inside(root, os.path.join(train_dir, rel), obj["file_name"])
      except ValueError as e:
        problems.add(where, str(e))
        continue
      extra = {k: v for k, v in obj.items() if k not in _FIELDS + ("label",)}
      parsed.append(Record(
          path=os.path.normpath(os.path.join(rel, obj["file_name"])), prompt=obj["prompt"],
          value=obj["value"], label=obj["label"], scene=len(scenes) - 1,
          extra=json.dumps(extra, ensure_ascii=False, sort_keys=True), where=where))
  if not scenes:
    raise DataError(f"{train_dir}: no {METADATA} found "
                    f"(expected <type_dir>/<scene_dir>/{METADATA})")

  good = []
  # PIL decodes outside the GIL, so threads check images in parallel; map keeps line order.
  with concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
    checks = pool.map(_check_image, [os.path.join(train_dir, r.path) for r in parsed])
    for record, problem in zip(parsed, tqdm.tqdm(checks, total=len(parsed), unit="img",
                                                 desc="Checking images", leave=False)):
      if problem:
        try:
          problems.add(record.where, problem)
        except DataError:
          pool.shutdown(cancel_futures=True)
          raise
      else:
        good.append(record)

  records, kept_scenes = _drop_scenes_without_violating(train_dir, good, scenes, problems)
  if not any(r.label for r in records):
    raise DataError(f"{train_dir}: no aligned (label 1) images"
                    + (f" left after skipping {problems.count} bad samples" if problems.count
                       else ""))
  if problems.count:
    log(f"livo_data: skipped {problems.count} bad samples of {train_dir}; first reasons:\n  "
        + "\n  ".join(problems.reasons))
  return Scan(train_dir=train_dir, records=records, scenes=kept_scenes,
              skipped=problems.count, skip_reasons=problems.reasons)


def _drop_scenes_without_violating(train_dir, records, scenes, problems):
  """Scenes with aligned images need a violating one to pair them with.

  Returns the records of the scenes kept (renumbered) and those scenes' metadata paths; scenes
  with no records at all are dropped silently (an empty file is not an error).
  """
  aligned, violating = [0] * len(scenes), [0] * len(scenes)
  for r in records:
    (aligned if r.label else violating)[r.scene] += 1
  new_index, kept = {}, []
  for s, meta in enumerate(scenes):
    if aligned[s] and not violating[s]:
      problems.add(os.path.join(train_dir, meta),
                   f"scene has {aligned[s]} aligned images but no violating image to pair them "
                   "with", lines=aligned[s])
    elif aligned[s] or violating[s]:
      new_index[s] = len(kept)
      kept.append(meta)
  return ([dataclasses.replace(r, scene=new_index[r.scene]) for r in records
           if r.scene in new_index], kept)
