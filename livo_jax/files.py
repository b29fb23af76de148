"""Writes that never leave a half-written file or folder, and the JSON files of the project.

  with atomic_file("out/image.png") as tmp:
    Image.fromarray(pixels).save(tmp, "PNG")     # on success tmp becomes out/image.png
  write_json({"step": 3}, "run/results.json")
  with atomic_folder("run/value_encoder", replace=True) as tmp:
    ...  # write into tmp; on success it becomes run/value_encoder

Everything is first written to a hidden temporary sibling (`.<name>.tmp-<pid>-<random>`) and
renamed into place, so a kill at any moment leaves either the old version or the new one, plus
at most a temporary that `remove_leftovers` clears later. Temporaries are created with the
process's umask (not `mkstemp`'s private 0600), since the trainer and a reader may be different
users.
"""

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from typing import Any, Iterator

from livo_jax.errors import ConfigError

_LEFTOVER = re.compile(r"\..+\.tmp-(\d+)-[0-9a-f]{8}")


def temporary_sibling(path: str) -> str:
  """A fresh hidden name beside `path`, marked with this process's id."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary sibling path to write; on success it replaces `path`, else it goes.

  The name has no suffix of its own: give writers that guess the format from it one
  explicitly (`image.save(tmp, "PNG")`, `np.save(open(tmp, "wb"), a)`).
  """
  tmp = temporary_sibling(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_text(text: str, path: str) -> None:
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(obj: Any, path: str, *, indent: int | None = 2) -> None:
  """`obj` as strict JSON (a NaN or infinity becomes null), with a final newline."""
  write_text(json_text(obj, indent=indent) + "\n", path)


def json_text(obj: Any, *, indent: int | None = None) -> str:
  """Strict JSON that any parser reads: non-finite floats become null (JSON has no NaN)."""
  return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def read_json_object(path: str, *, missing_hint: str = "") -> dict[str, Any]:
  """A config file's JSON object; `ConfigError` naming the file if it is missing or unreadable."""
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such file{missing_hint}")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: unreadable config: {e}") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return raw


@contextlib.contextmanager
def atomic_folder(path: str, *, replace: bool = False) -> Iterator[str]:
  """Yields a temporary sibling folder to write into; on success it becomes `path`.

  An existing empty folder at `path` is taken over. A non-empty one raises `FileExistsError`
  (before any work, and again at the end if another process got there first), unless `replace`:
  then it is swapped out only once the new folder is complete, and removed after. On failure
  the temporary is removed and `path` is untouched.
  """
  path = os.path.abspath(path)
  _refuse_existing(path, replace)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = temporary_sibling(path)
  os.mkdir(tmp)
  try:
    yield tmp
    _refuse_existing(path, replace)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
    if os.path.exists(path):
      previous = temporary_sibling(path)
      os.rename(path, previous)
      os.rename(tmp, path)
      shutil.rmtree(previous)
    else:
      os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _refuse_existing(path: str, replace: bool) -> None:
  if replace or not os.path.exists(path):
    return
  if not os.path.isdir(path) or os.listdir(path):
    raise FileExistsError(f"{path}: exists and is not empty")


def remove_leftovers(folder: str) -> list[str]:
  """Removes the temporaries that killed processes left in `folder`; returns their names.

  A temporary whose process is still running on this machine is kept (it may be mid-write).
  """
  removed = []
  if not os.path.isdir(folder):
    return removed
  for name in sorted(os.listdir(folder)):
    match = _LEFTOVER.fullmatch(name)
    if not match or _is_running(int(match[1])):
      continue
    target = os.path.join(folder, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(target)
    removed.append(name)
  return removed


def _is_running(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's live process
    return True
  return True
