"""The LiVO training loop, in one page.

  python scripts/train.py --config=configs/sd15.py --workdir=DIR

Workdir after a run: `checkpoints/` (orbax, resumed automatically), `metrics.jsonl`,
`tensorboard/`, `images/` (validation grids), `value_encoder/` (an HF CLIPTextModel folder) and
`.lock` (held while a run uses the workdir).

What stops a run, and what it keeps (docs/reliability.md): SIGTERM or Ctrl-C, at the next step
with a checkpoint; `max_nonfinite_steps` skipped steps in a row, a failed write (metrics,
TensorBoard, a checkpoint, a full disk), each with `RunError` and one line, keeping the
checkpoints saved before and any earlier export.
"""

import logging
import os
import time

import jax
from flax import nnx
import numpy as np

from livo_jax import files
from livo_jax import images
from livo_jax import weights
from livo_jax.errors import RunError
from livo_jax.train import checkpoint
from livo_jax.train import recipe
from livo_jax.train import outputs
from livo_jax.train import runtime
from livo_jax.train import setup
from livo_jax.train import sharding


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the value encoder; returns the last logged metrics."""
  workdir = outputs.prepare_workdir(workdir)
  recipe.check_keys(config)
  setup.check_config(config, jax.device_count())
  with runtime.WorkdirLock(workdir):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  runtime.enable_compilation_cache(config.compilation_cache_dir)
  is_main = jax.process_index() == 0
  if is_main:
    for folder in (workdir, os.path.join(workdir, "images")):
      for name in files.remove_leftovers(folder):
        logging.info("removed %s, left by an interrupted run", os.path.join(folder, name))
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.dcn_data)
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

  source = setup.prepare_source(config)          # bad data fails before the models load
  sd = setup.load_models(config)
  setup.check_resolution(config, sd)
  trainer = setup.build_trainer(config, sd, mesh)
  logging.info("objective %s, prediction type %s", trainer.settings.objective,
               trainer.settings.prediction_type)
  batches = setup.make_batches(config, source, sd, mesh)

  checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  start, state, data_state = checkpoints.restore_latest(
      checkpoint.abstract(trainer.state, trainer.state_shardings))
  if start:
    trainer.state = state
    batches.set_state(data_state)
    logging.info("resumed from step %d", start)
  if start >= config.total_steps:
    checkpoints.close()
    return _already_done(sd, trainer, mesh, workdir, start, config.total_steps, is_main)
  writer = outputs.MetricsWriter(workdir, start, is_main)
  positions = outputs.PositionLog(workdir, start) if config.data.log_positions else None
  preemption = runtime.PreemptionWatch()
  progress = outputs.progress_bar(config.total_steps, start, enabled=is_main)
  logger = _MetricsLogger(writer, progress, start, config.max_nonfinite_steps)

  stopped_early, save_due, step, metrics = False, False, start, None
  try:
    for step in range(start + 1, config.total_steps + 1):
      local_batch = next(batches)
      if positions:
        positions.write(step, local_batch["position"])
      trainer.state, metrics = trainer.step(trainer.state, trainer.frozen,
                                            sharding.global_batch(mesh, local_batch))
      logger.after_step(step, metrics, log=step % config.log_every == 0
                        or step == config.total_steps)
      checkpoints.check(step)                    # a failed background save stops the run now
      progress.update(1)

      # A preemption (SIGTERM) or Ctrl-C stops every process at the same step, after a
      # checkpoint. A periodic save waits for a step that was not skipped, so that a streak of
      # non-finite steps that ends the run never rotates out the checkpoints from before it.
      stopped_early = preemption.reached(step)
      save_due |= step % config.checkpoint_every == 0 or step == config.total_steps
      if stopped_early or (save_due and not int(metrics["skipped"])):
        checkpoints.save(step, trainer.state, batches.get_state())
        save_due = False
      if stopped_early:
        logging.warning("%s: checkpoint saved at step %d; rerun to resume",
                        preemption.signal_name or "preempted", step)
        break
      if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
        _validate(config, sd, trainer, mesh, workdir, writer, step, is_main)
    last_metrics = logger.flush()
    checkpoints.close()
  except outputs.WriteFailed:
    _keep_work(checkpoints, step, trainer, batches, metrics)
    raise
  except BaseException:
    _close_quietly(checkpoints)                  # keeps what is saved; the error says why
    raise
  finally:
    progress.close()
    preemption.close()
    if positions:
      positions.close()
  if not stopped_early:
    _export(sd, trainer, mesh, workdir, is_main)
  writer.close()
  return last_metrics


def _already_done(sd, trainer, mesh, workdir: str, start: int, total_steps: int,
                  is_main: bool) -> dict:
  """A rerun of a finished run trains nothing; it only exports a missing value_encoder/."""
  exported = os.path.isdir(os.path.join(workdir, "value_encoder"))
  logging.warning("the workdir is at step %d, total_steps is %d: nothing to train%s", start,
                  total_steps, "" if exported else "; exporting that step")
  if not exported:
    _export(sd, trainer, mesh, workdir, is_main)
  return {}


def _keep_work(checkpoints, step: int, trainer, batches, metrics) -> None:
  """After a failed write: a last checkpoint of the step reached, if that step was taken and
  the disk still takes one (the failure may be TensorBoard's folder alone)."""
  try:
    if metrics is not None and not int(metrics["skipped"]) and (
        step not in checkpoints.saved_steps()):
      checkpoints.save(step, trainer.state, batches.get_state())
      checkpoints.close()
      logging.warning("checkpoint saved at step %d before stopping", step)
    else:
      checkpoints.close()
  except RunError as e:
    logging.error("no checkpoint at step %d either: %s", step, e)


def _close_quietly(checkpoints) -> None:
  try:
    checkpoints.close()
  except RunError as e:
    logging.error("%s", e)


class _MetricsLogger:
  """Fetches each step's metrics one step late: after the next step is dispatched, so the host
  never waits on the device in between. Writes the logged steps, and stops the run after
  `max_nonfinite` skipped (non-finite) steps in a row."""

  def __init__(self, writer: outputs.MetricsWriter, progress, start: int, max_nonfinite: int):
    self.writer, self.progress, self.max_nonfinite = writer, progress, max_nonfinite
    self.pending, self.last, self.nonfinite_run = None, {}, 0
    self.start, self.timer = start, (time.perf_counter(), start)

  def after_step(self, step: int, device_metrics, *, log: bool) -> None:
    if step == self.start + 1:
      jax.block_until_ready(device_metrics)
      logging.info("first step (with compilation, or a compilation-cache hit) took %.1f s",
                   time.perf_counter() - self.timer[0])
    self.flush()
    now = time.perf_counter()
    self.pending = (step, device_metrics, log, now - self.timer[0], step - self.timer[1])
    if log:
      self.timer = (now, step)

  def flush(self) -> dict:
    if self.pending is None:
      return self.last
    step, device_metrics, log, seconds, steps = self.pending
    self.pending = None
    skipped = int(device_metrics["skipped"])           # waits for that step only
    self.nonfinite_run = self.nonfinite_run + 1 if skipped else 0
    stop = self.nonfinite_run >= self.max_nonfinite
    if not (log or skipped):
      return self.last
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics["steps_per_second"] = steps / max(seconds, 1e-9)
    values = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "grad_norm", "update_norm"))
    if skipped:
      logging.warning("step %d skipped, not finite: %s (%d in a row)", step, values,
                      self.nonfinite_run)
    if log or stop:
      self.writer.write(step, metrics)
      self.progress.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
      self.last = metrics
    if stop:
      raise RunError(
          f"step {step}: {self.nonfinite_run} steps in a row skipped as not finite ({values}); "
          "stopped, keeping the checkpoints and export from before (max_nonfinite_steps); "
          "lower optim.lr or check the data")
    return self.last


def _value_encoder(sd, trainer, mesh):
  """The trained value encoder in `sd`, gathered to every process (all must call it)."""
  nnx.update(sd.value_encoder, sharding.to_host(mesh, trainer.state["params"]))
  return sd.value_encoder


def _validate(config, sd, trainer, mesh, workdir, writer, step: int, is_main: bool) -> None:
  """Validation images: plain SD above, with the value token below."""
  _value_encoder(sd, trainer, mesh)
  if is_main:
    grid = outputs.validation_grid(sd, config.eval, config.data.resolution)
    path = os.path.join(workdir, "images", f"step_{step:06d}.png")
    outputs.guarded(lambda: images.save_png(grid, path), path)
    writer.image("validation", grid, step)


def _export(sd, trainer, mesh, workdir, is_main: bool) -> None:
  """`workdir/value_encoder/`: an HF CLIPTextModel folder, replaced only once complete."""
  value_encoder = _value_encoder(sd, trainer, mesh)
  if is_main:
    folder = os.path.join(workdir, "value_encoder")
    leaves = jax.tree.leaves_with_path(nnx.state(value_encoder, nnx.Param))
    bad = [jax.tree_util.keystr(k) for k, x in leaves if not np.isfinite(np.asarray(x)).all()]
    if bad:   # the step never takes a non-finite update: the initial weights were not finite
      raise RunError(f"the value encoder's {bad[0]} is not finite; {folder} not written")
    outputs.guarded(lambda: weights.save_pretrained(
        value_encoder, folder, base_config=sd.value_encoder_config, overwrite=True), folder)
    logging.info("value encoder written to %s", folder)
