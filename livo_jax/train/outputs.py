"""What a run writes besides checkpoints: metrics, TensorBoard, validation grids, progress.

  workdir/metrics.jsonl       one JSON object per logged step (process 0)
  workdir/tensorboard/        the same scalars, and the validation grids
  workdir/images/step_N.png   validation grids: plain SD above, with the value token below
  workdir/data_positions/     which stream positions each process read (`data.log_positions`)

Lines after the step a run resumes from are dropped first: those steps are about to be redone.
"""

import json
import os
import tempfile

import jax
import numpy as np

from livo_jax import files
from livo_jax import images
from livo_jax import sampling
from livo_jax.errors import ConfigError


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
  """Drops the lines of a step-keyed jsonl file after `resume_step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [l for l in lines if l.strip() and json.loads(l)["step"] <= resume_step]
  if len(kept) != len(lines):
    files.write_text("".join(kept), path)


class MetricsWriter:
  """metrics.jsonl + TensorBoard, from process 0 only."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    truncate_jsonl(self.path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(files.json_text(dict(step=step, **metrics)) + "\n")
    for name, value in metrics.items():
      self.tensorboard.add_scalar(name, value, step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    if self.enabled:
      self.tensorboard.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()


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
    self._file.write(json.dumps(dict(step=step, positions=positions.tolist())) + "\n")

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
