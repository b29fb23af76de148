"""What a run writes besides checkpoints: metrics, TensorBoard, validation grids, progress.

  workdir/metrics.jsonl       one JSON object per logged step (process 0)
  workdir/tensorboard/        the same scalars, and the validation grids
  workdir/images/step_N.png   validation grids: plain SD above, with the value token below
  workdir/data_positions/     which stream positions each process read (`data.log_positions`)

Lines after the step a run resumes from are dropped first: those steps are about to be redone
(and a line a kill tore, with a warning). A write that fails (a full disk) raises `WriteFailed`
naming the file.
"""

import json
import logging
import os
import tempfile
import time

import jax
import numpy as np

from livo_jax import files
from livo_jax import images
from livo_jax import sampling
from livo_jax.errors import ConfigError, RunError


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and proves it writable, before any compute."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be written: {e}") from e
  return workdir


def truncate_jsonl(path: str, resume_step: int) -> None:
  """Drops the lines of a step-keyed jsonl file after `resume_step`, and lines that do not parse
  (a line torn by a kill), with a warning naming them."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.readlines()
  kept, torn = [], []
  for number, line in enumerate(lines, 1):
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      if line.strip():
        torn.append(number)
      continue
    if step <= resume_step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if torn:
    logging.warning("%s: dropped unreadable line(s) %s", path, ", ".join(map(str, torn)))
  if kept != lines:
    files.write_text("".join(kept), path)


class MetricsWriter:
  """metrics.jsonl + TensorBoard, from process 0 only.

  Both are written synchronously in the calling thread, so a full disk or a lost permission
  raises `WriteFailed` naming the file at once (a writer thread that dies would leave the run
  waiting on its queue forever).
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    truncate_jsonl(self.path, resume_step)
    self.tensorboard = guarded(lambda: TensorBoard(os.path.join(workdir, "tensorboard"),
                                                    purge_step=resume_step + 1),
                                os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    line = files.json_text(dict(step=step, **metrics)) + "\n"

    def append():
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    guarded(append, self.path)
    self.tensorboard.scalars(metrics, step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    if self.enabled:
      self.tensorboard.image(name, image, step)

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()


class TensorBoard:
  """A TensorBoard event file written in the caller's thread, flushed at every write.

  `purge_step`: TensorBoard hides the events of earlier files from this step on (what a resumed
  run redoes).
  """

  def __init__(self, folder: str, purge_step: int | None = None):
    from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self.folder, self._event_pb2 = folder, event_pb2
    # A skipped step's NaN is logged on purpose; tensorboardX would warn at every one.
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    os.makedirs(folder, exist_ok=True)
    self._events = event_file_writer.EventsWriter(os.path.join(folder, "events"))
    if purge_step is not None:
      self._write(event_pb2.Event(step=purge_step, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START)))

  def scalars(self, metrics: dict, step: int) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    for name, value in metrics.items():
      self._summary(summary.scalar(name, float(value)), step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._summary(summary.image(name, image, dataformats="HWC"), step)

  def _summary(self, proto, step: int) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=proto))

  def _write(self, event) -> None:
    def write():
      self._events.write_event(event)
      self._events.flush()
    guarded(write, self.folder)

  def close(self) -> None:
    guarded(self._events.close, self.folder)


class WriteFailed(RunError):
  """A run's output could not be written (a full disk, a lost permission)."""


def guarded(write, path: str):
  """Runs `write()`; an OSError becomes `WriteFailed` naming `path`."""
  try:
    return write()
  except OSError as e:
    raise WriteFailed(f"{path}: cannot write: {e.strerror or e}") from e


class PositionLog:
  """`data_positions/process_<i>.jsonl`: which stream positions this process read at each step
  (`data.log_positions`), to audit the data split between processes."""

  def __init__(self, workdir: str, resume_step: int):
    folder = os.path.join(workdir, "data_positions")
    os.makedirs(folder, exist_ok=True)
    self.path = os.path.join(folder, f"process_{jax.process_index()}.jsonl")
    truncate_jsonl(self.path, resume_step)
    self._file = open(self.path, "a")  # pylint: disable=consider-using-with

  def write(self, step: int, positions: np.ndarray) -> None:
    line = json.dumps(dict(step=step, positions=positions.tolist())) + "\n"
    guarded(lambda: self._file.write(line), self.path)

  def close(self) -> None:
    self._file.close()


def check_eval(eval_config) -> None:
  """The `eval` keys, checked before anything loads."""
  statements = eval_config.value_statements
  if eval_config.every and len(statements) not in (1, len(eval_config.prompts)):
    raise ConfigError(f"eval.value_statements has {len(statements)} entries: give one value, "
                      f"or one per eval.prompts entry ({len(eval_config.prompts)})")


def validation_grid(sd, eval_config, size: int) -> np.ndarray:
  """Plain SD (top row) and with the value token (bottom row), same prompts and seeds."""
  prompts = list(eval_config.prompts)
  values = list(eval_config.value_statements)
  if len(values) == 1:
    values = values * len(prompts)
  common = dict(steps=eval_config.steps, guidance=eval_config.guidance, scheduler="ddim",
                seed=eval_config.seed, height=size, width=size)
  plain = sampling.generate(sd, prompts, **common)
  valued = sampling.generate(sd, prompts, values, **common)
  return images.grid([plain, valued])


def progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", disable=not enabled,
              dynamic_ncols=True, desc="train")
