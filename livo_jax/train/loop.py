"""The LiVO training loop, in one page, and the export of any of its checkpoints.

  python scripts/train.py --config=configs/sd15.py --workdir=DIR
  python tools/export_value_encoder.py --workdir=DIR --step=N --out=OUT

Workdir after a run: `config.json` and `resumes/` (the run records), `checkpoints/` (orbax,
resumed automatically), `metrics.jsonl`, `tensorboard/`, `images/` (validation grids),
`value_encoder/` (an HF CLIPTextModel folder with the tokenizer and a model card) and `.lock`
(held while a run uses the workdir). Progress goes to the log: a bar on a terminal, else a
metrics line every `log_every` steps, at most one per 30 s.

What stops a run, and what it keeps (docs/reliability.md): SIGTERM or Ctrl-C, at the next step
with a checkpoint; `max_nonfinite_steps` skipped steps in a row, a failed write (metrics,
TensorBoard, a checkpoint, a full disk), each with `RunError` and one line, keeping the
checkpoints saved before and any earlier export.
"""

import copy
import logging
import os
import sys
import time

import jax
from flax import nnx
import numpy as np

from livo_jax import files
from livo_jax import images
from livo_jax import weights
from livo_jax.errors import ConfigError, RunError
from livo_jax.train import checkpoint
from livo_jax.train import recipe
from livo_jax.train import outputs
from livo_jax.train import runtime
from livo_jax.train import setup
from livo_jax.train import sharding

_LINE_SECONDS = 30     # at most one metrics line per this many seconds (the last step's always)
_LINE_METRICS = ("loss", "gap_w", "gap_l", "grad_norm", "lr")   # those the objective has


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the value encoder; returns the last logged metrics."""
  workdir = outputs.prepare_workdir(workdir)
  recipe.check_keys(config)
  setup.resolve_auto(config)
  setup.check_config(config, jax.device_count())
  outputs.check_report_to(config.report_to)
  with runtime.WorkdirLock(workdir):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict:
  runtime.enable_compilation_cache(config.compilation_cache_dir)
  is_main = jax.process_index() == 0
  if is_main:
    for folder in (workdir, os.path.join(workdir, "images"),
                   os.path.join(workdir, outputs.RESUMES)):
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
    saved = checkpoints.saved_steps()
    checkpoints.close()
    return _already_done(config, source, sd, trainer, mesh, workdir, start, saved, is_main)
  record = outputs.record_start(workdir, config, start, source) if is_main else None
  writer = outputs.MetricsWriter(workdir, start, is_main,
                                 report_to=outputs.check_report_to(config.report_to),
                                 record=record)
  positions = outputs.PositionLog(workdir, start) if config.data.log_positions else None
  preemption = runtime.PreemptionWatch()
  interactive = is_main and sys.stderr.isatty()     # a terminal gets a bar, a log file lines
  progress = outputs.progress_bar(config.total_steps, start, enabled=interactive)
  logger = _MetricsLogger(writer, progress, start, config.total_steps,
                          config.max_nonfinite_steps, lines=is_main and not interactive)

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
    _export(sd, trainer, mesh, os.path.join(workdir, "value_encoder"),
            _card(workdir, record, step) if is_main else None)
  writer.close()
  return last_metrics


def _already_done(config, source, sd, trainer, mesh, workdir: str, start: int,
                  saved: list[int], is_main: bool) -> dict:
  """A rerun of a finished run trains nothing; it only exports a missing value_encoder/."""
  folder = os.path.join(workdir, "value_encoder")
  exported = os.path.isdir(folder)
  logging.warning(
      "the workdir is at step %d, total_steps is %d: nothing to train%s; the checkpoints of "
      "steps %s export with: python tools/export_value_encoder.py --workdir=%s --step=N "
      "--out=DIR", start, config.total_steps, "" if exported else "; exporting that step",
      ", ".join(map(str, saved)), workdir)
  if not exported:
    card = None
    if is_main:   # a workdir older than run records has none: the card tells this config
      record = outputs.record_of_step(workdir, start) or outputs.run_record(config, start, source)
      card = _card(workdir, record, start)
    _export(sd, trainer, mesh, folder, card)
  return {}


def export(workdir: str, step: int | None, out: str, *, overwrite: bool = False) -> int:
  """Writes the value encoder of the workdir's checkpoint `step` (None: the latest) to `out`, as
  the run's own export would have at that step: the same weights, bit for bit, the tokenizer
  and a model card of the config the run had then. Returns the step."""
  workdir = os.path.abspath(workdir)
  checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    saved = checkpoints.saved_steps()
    step = saved[-1] if step is None and saved else step
    if step not in saved:
      raise ConfigError(f"{checkpoints.directory}: no checkpoint" + (f" of step {step}; the "
                        f"steps saved are {', '.join(map(str, saved))}" if saved else "s"))
    record = outputs.record_of_step(workdir, step)
    if record is None:
      raise ConfigError(f"{os.path.join(workdir, outputs.RECORD)}: no run record of step {step} "
                        "(runs write one at their start)")
    if not overwrite and os.path.isdir(out) and os.listdir(out):
      raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
    config = recipe.sd15()
    config.update(_tuples(record["config"]))
    sd = setup.load_models(config)
    mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
    trainer = setup.build_trainer(config, sd, mesh, donate=False)
    trainer.state, _ = checkpoints.restore(
        step, checkpoint.abstract(trainer.state, trainer.state_shardings))
  finally:
    checkpoints.close()
  _export(sd, trainer, mesh, out, _card(workdir, record, step), overwrite=overwrite)
  return step


def _tuples(tree):
  """A record's config as the recipe holds it: JSON's lists as tuples."""
  if isinstance(tree, dict):
    return {key: _tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(value) for value in tree)
  return tree


def _card(workdir: str, record: dict, step: int) -> str:
  return outputs.model_card(record, step, outputs.logged_metrics(workdir, step))


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

  def __init__(self, writer: outputs.MetricsWriter, progress, start: int, total: int,
               max_nonfinite: int, *, lines: bool):
    self.writer, self.progress, self.max_nonfinite = writer, progress, max_nonfinite
    self.pending, self.last, self.nonfinite_run = None, {}, 0
    self.start, self.total, self.timer = start, total, (time.perf_counter(), start)
    self.lines, self.last_line, self.first_done = lines, -float("inf"), None

  def after_step(self, step: int, device_metrics, *, log: bool) -> None:
    if step == self.start + 1:
      jax.block_until_ready(device_metrics)
      self.first_done = (time.perf_counter(), step)
      logging.info("first step (with compilation, or a compilation-cache hit) took %.1f s",
                   self.first_done[0] - self.timer[0])
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
      self._line(step, metrics)
    if stop:
      raise RunError(
          f"step {step}: {self.nonfinite_run} steps in a row skipped as not finite ({values}); "
          "stopped, keeping the checkpoints and export from before (max_nonfinite_steps); "
          "lower optim.lr or check the data")
    return self.last

  def _line(self, step: int, metrics: dict) -> None:
    """`step 120/15000: loss 0.6931, ..., steps/s 1.93, eta 2:08:40` (eta: from the mean rate
    since the first step, which compiles)."""
    now = time.perf_counter()
    if not self.lines or (now - self.last_line < _LINE_SECONDS and step < self.total):
      return
    self.last_line = now
    values = [f"{k} {metrics[k]:.4g}" for k in _LINE_METRICS if k in metrics]
    values.append(f"steps/s {metrics['steps_per_second']:.3g}")
    since, first = self.first_done
    if step > first and step < self.total:
      seconds = round((self.total - step) * (now - since) / (step - first))
      values.append(f"eta {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")
    logging.info("step %d/%d: %s", step, self.total, ", ".join(values))


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


def _export(sd, trainer, mesh, folder: str, card: str | None, *, overwrite: bool = True) -> None:
  """`folder`: an HF CLIPTextModel folder with SD's tokenizer and the model card `card`,
  replaced only once complete. Every process calls it; the one given a card writes."""
  value_encoder = _value_encoder(sd, trainer, mesh)
  if card is None:
    return
  leaves = jax.tree.leaves_with_path(nnx.state(value_encoder, nnx.Param))
  bad = [jax.tree_util.keystr(k) for k, x in leaves if not np.isfinite(np.asarray(x)).all()]
  if bad:   # the step never takes a non-finite update: the initial weights were not finite
    raise RunError(f"the value encoder's {bad[0]} is not finite; {folder} not written")

  def add_files(tmp):
    # A tokenizer saves the truncation and padding of its last call: save a fresh one's.
    tokenizer = copy.deepcopy(sd.tokenizer)
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.save_pretrained(tmp)
    files.write_text(card, os.path.join(tmp, "README.md"))
  outputs.guarded(lambda: weights.save_pretrained(
      value_encoder, folder, base_config=sd.value_encoder_config, overwrite=overwrite,
      add_files=add_files), folder)
  logging.info("value encoder written to %s", folder)
