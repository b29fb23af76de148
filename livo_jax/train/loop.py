"""The LiVO training loop, in one page.

  python scripts/train.py --config=configs/sd15.py --workdir=DIR

Workdir after a run: `checkpoints/` (orbax, resumed automatically), `metrics.jsonl`,
`tensorboard/`, `images/` (validation grids) and `value_encoder/` (an HF CLIPTextModel folder).
"""

import logging
import os
import time

import jax
from flax import nnx

from livo_jax import images
from livo_jax import weights
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
  runtime.enable_compilation_cache(config.compilation_cache_dir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.dcn_data)
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

  source = setup.prepare_source(config)          # bad data fails before the models load
  sd = setup.load_models(config)
  trainer = setup.build_trainer(config, sd, mesh)
  logging.info("objective %s, prediction type %s", trainer.settings.objective,
               trainer.settings.prediction_type)
  batches = setup.make_batches(config, source, sd, mesh)

  checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  start = checkpoints.latest_step() or 0
  if start:
    trainer.state, data_state = checkpoints.restore(
        start, checkpoint.abstract(trainer.state, trainer.state_shardings))
    batches.set_state(data_state)
    logging.info("resumed from step %d", start)
  writer = outputs.MetricsWriter(workdir, start, is_main)
  positions = outputs.PositionLog(workdir, start) if config.data.log_positions else None
  preemption = runtime.PreemptionWatch()
  progress = outputs.progress_bar(config.total_steps, start, enabled=is_main)
  logger = _MetricsLogger(writer, progress, start)

  stopped_early = False
  for step in range(start + 1, config.total_steps + 1):
    local_batch = next(batches)
    if positions:
      positions.write(step, local_batch["position"])
    trainer.state, metrics = trainer.step(trainer.state, trainer.frozen,
                                          sharding.global_batch(mesh, local_batch))
    logger.after_step(step, metrics, log=step % config.log_every == 0
                      or step == config.total_steps)
    progress.update(1)

    # A preemption (SIGTERM) stops every process at the same step, after a checkpoint.
    stopped_early = preemption.reached(step)
    if step % config.checkpoint_every == 0 or step == config.total_steps or stopped_early:
      checkpoints.save(step, trainer.state, batches.get_state())
    if stopped_early:
      logging.warning("preempted: checkpoint saved at step %d; rerun to resume", step)
      break
    if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
      _validate(config, sd, trainer, mesh, workdir, writer, step, is_main)

  last_metrics = logger.flush()
  progress.close()
  preemption.close()
  checkpoints.close()
  if not stopped_early:
    _export(sd, trainer, mesh, workdir, is_main)
  writer.close()
  if positions:
    positions.close()
  return last_metrics


class _MetricsLogger:
  """Writes each logged step's metrics one step late: they are fetched after the next step is
  dispatched, so the host never waits on the device in between."""

  def __init__(self, writer: outputs.MetricsWriter, progress, start: int):
    self.writer, self.progress = writer, progress
    self.pending, self.last = None, {}
    self.start, self.timer = start, (time.perf_counter(), start)

  def after_step(self, step: int, device_metrics, *, log: bool) -> None:
    if step == self.start + 1:
      jax.block_until_ready(device_metrics)
      logging.info("first step (with compilation, or a compilation-cache hit) took %.1f s",
                   time.perf_counter() - self.timer[0])
    self.flush()
    if log:
      now = time.perf_counter()
      self.pending = (step, device_metrics, now - self.timer[0], step - self.timer[1])
      self.timer = (now, step)

  def flush(self) -> dict:
    if self.pending is not None:
      step, device_metrics, seconds, steps = self.pending
      metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      metrics["steps_per_second"] = steps / max(seconds, 1e-9)
      self.writer.write(step, metrics)
      self.progress.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
      self.pending, self.last = None, metrics
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
    images.save_png(grid, os.path.join(workdir, "images", f"step_{step:06d}.png"))
    writer.image("validation", grid, step)


def _export(sd, trainer, mesh, workdir, is_main: bool) -> None:
  """`workdir/value_encoder/`: an HF CLIPTextModel folder, replaced only once complete."""
  value_encoder = _value_encoder(sd, trainer, mesh)
  if is_main:
    folder = os.path.join(workdir, "value_encoder")
    weights.save_pretrained(value_encoder, folder, base_config=sd.value_encoder_config,
                            overwrite=True)
    logging.info("value encoder written to %s", folder)
