"""Training checkpoints (orbax) with automatic resume.

A checkpoint holds the whole train state (value-encoder params, optimizer state, step, RNG) and
the data iterator's state, so a resumed run continues with exactly the batches and noise it
would have seen. Restores go straight onto the target shardings (abstract arrays), so a run can
resume on another mesh.

Faults: the temporaries of a save that a kill interrupted are removed at the next start; a
checkpoint that cannot be restored (a truncated file, an empty step folder) is moved to
`workdir/unreadable_checkpoints/` with a warning and the one before it is used; a save that fails
in the background (a full disk) raises `RunError` at the next `check()`, that is, the next step.
"""

import logging
import os
import re
import shutil
import sys
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from livo_jax.errors import RunError


class _QuietBackgroundFailures(logging.Filter):
  """Drops the error records orbax (through absl's logger) and asyncio log, each with a
  traceback, for every part of a failed background save."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio":   # "Task/Future exception was never retrieved"
      return not _from_orbax(record.exc_info[2] if record.exc_info else None)
    return _ORBAX not in record.pathname


_ORBAX = f"{os.sep}orbax{os.sep}"


def _from_orbax(tb) -> bool:
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _quiet_background_failures() -> None:
  """Once per process: the noise of a failed background save goes, since the failure reaches
  the loop as one `RunError` (`check`, `save`, `close`), which is what the user sees.

  When one write of a save fails (a full disk), orbax logs every failed part with a traceback,
  then closes that save's event loop while tensorstore's other writes are still in flight; each
  of those reports an unraisable "Event loop is closed" RuntimeError, and asyncio logs its
  unretrieved results, some after the manager is closed. A failed restore (a truncated file)
  leaves orbax coroutines that report their own exceptions when collected. Only those are
  dropped.
  """
  if getattr(sys.unraisablehook, "livo_jax", False):
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_QuietBackgroundFailures())
  previous = sys.unraisablehook

  def hook(unraisable):
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    code = getattr(unraisable.object, "cr_code", None)   # an orbax coroutine left pending
    if not (closed_loop or (code is not None and _ORBAX in code.co_filename)):
      previous(unraisable)
  hook.livo_jax = True
  sys.unraisablehook = hook


class Checkpoints:
  """`workdir/checkpoints`: save every N steps, keep the last K, restore the latest readable."""

  def __init__(self, directory: str, *, keep: int | None = None, read_only: bool = False):
    """`read_only`: for restores only, leaving alone what a live run is writing (the export).
    (orbax's own `read_only` only adds a warning to that, on every use.)"""
    self.directory = os.path.abspath(directory)
    _quiet_background_failures()
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict | None]:
    """(step, state, data state) of the newest checkpoint that restores; (0, None, None) when
    there is none. Unreadable newer ones are moved aside (never deleted) with a warning."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        self._set_aside(step, e)
        continue
      return step, state, data_state
    return 0, None, None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable step folder out of orbax's sight, so the run can redo that step."""
    cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    if jax.process_index() == 0:
      folder = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
      os.makedirs(folder, exist_ok=True)
      target = os.path.join(folder, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      shutil.move(os.path.join(self.directory, str(step)), target)
      logging.warning("checkpoint %d cannot be restored (%s); moved to %s, using the one before",
                      step, cause, target)
    _sync(f"set aside checkpoint {step}")
    self._manager.reload()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Starts an asynchronous save; training goes on while it is written."""
    self.check(step)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))))
    except Exception as e:  # pylint: disable=broad-except  (also an earlier save's failure)
      raise RunError(f"{self.directory}: checkpoint save failed (noticed at step {step}): "
                     f"{_cause(e)}") from e

  def check(self, step: int) -> None:
    """Raises `RunError` if a background save has failed since the last call."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise RunError(f"{self.directory}: checkpoint save failed (noticed at step {step}): "
                     f"{_cause(e)}") from e

  def saved_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at `step`, placed as `abstract_state`'s shardings say, and the data state."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    if restored["data"] is None:
      raise RunError(f"checkpoint {step} has no data state")
    return restored["state"], restored["data"]

  def close(self) -> None:
    """Waits for pending saves; `RunError` if one failed."""
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise RunError(f"{self.directory}: checkpoint save failed: {_cause(e)}") from e
    finally:
      self._manager.close()


def _cause(error: BaseException) -> str:
  """The innermost cause of an orbax error, on one line: an OSError's reason and file, or
  tensorstore's reason and the first file it names (without its long spec)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  if isinstance(error, OSError) and error.strerror:
    return error.strerror + (f": {error.filename}" if error.filename else "")
  text = re.sub(r"\s*\[[a-z_]+=.*$", "", " ".join(str(error).split()))   # tensorstore's spec
  path = re.search(r'"(/[^"]+)"', text)
  reason = text.rsplit(": ", 1)[-1]
  return (f"{reason}: {path[1]}" if path else text)[:300]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
