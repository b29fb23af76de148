"""What a run writes besides checkpoints: its record, metrics, TensorBoard, W&B, grids, exports.

  workdir/config.json         the run record of the first start: the resolved config, the command
                              line, versions, devices and the training data's value statements
  workdir/resumes/T-stepN.json  the record of each later start (a resume), T its UTC time
  workdir/metrics.jsonl       one JSON object per logged step (process 0)
  workdir/tensorboard/        the same scalars, the validation grids, the records as text/hparams
  workdir/wandb/              W&B's own files (`report_to` wandb)
  workdir/images/step_N.png   validation grids: plain SD above, with the value token below
  workdir/data_positions/     which stream positions each process read (`data.log_positions`)
  value_encoder/README.md     the model card of an export (`model_card`)

Lines after the step a run resumes from are dropped first: those steps are about to be redone
(and a line a kill tore, with a warning). A write that fails (a full disk) raises `WriteFailed`
naming the file.
"""

import collections
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import time

import jax
import numpy as np

from livo_jax import files
from livo_jax import images
from livo_jax import losses
from livo_jax import sampling
from livo_jax.errors import ConfigError, RunError

REPORT_TO = ("tensorboard", "wandb")
RECORD = "config.json"
RESUMES = "resumes"
HPARAMS_METRICS = ("loss", "gap_w", "gap_l")   # the scalars TensorBoard's HParams tab shows


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


def record_start(workdir: str, config, start_step: int, source) -> dict:
  """Writes the run record of this start before its first step, and returns it.

  The first start's goes to `config.json`, which is never rewritten; each later start's to
  `resumes/<UTC time>-step<N>.json`, with a warning naming every setting that differs from the
  previous start's. All records of a workdir share the first one's run id (W&B's).
  """
  records = read_records(workdir)
  record = run_record(config, start_step, source, records[0]["run"]["id"] if records else None)
  if records:
    _warn_changes(records[-1], record)
    stamp = record["run"]["time"].replace("-", "").replace(":", "")   # 20250612T101502Z
    path = os.path.join(workdir, RESUMES, f"{stamp}-step{start_step}.json")
    guarded(lambda: os.makedirs(os.path.dirname(path), exist_ok=True), path)
  else:
    path = os.path.join(workdir, RECORD)
  guarded(lambda: files.write_json(record, path), path)
  return record


def run_record(config, start_step: int, source, run_id: str | None = None) -> dict:
  """What a start of a run is: the resolved config, where, when and how it started, and its
  data (`describe_data`)."""
  return {
      "config": json.loads(files.json_text(config.to_dict())),
      "run": {"id": run_id or secrets.token_hex(4), "start_step": start_step,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": socket.gethostname(), "cwd": os.getcwd(), "argv": sys.argv,
              # The package's own version (the layer rule lets no module import the package).
              "livo_jax": sys.modules["livo_jax"].__version__, "jax": jax.__version__,
              "processes": jax.process_count(), "devices": jax.device_count(),
              "device_kind": jax.devices()[0].device_kind},
      "data": describe_data(source)}


def describe_data(source) -> dict:
  """A prepared dataset's folder and sizes, and the value statements of its aligned images with
  how many images each has: what a model card names as the values trained on."""
  values = collections.Counter(source.aligned(i)["value"] for i in range(len(source)))
  return {"prepared": source.directory, "aligned_images": len(source),
          "scenes": source.num_scenes, "skipped": source.skipped,
          "values": dict(sorted(values.items()))}


def read_records(workdir: str) -> list[dict]:
  """The run records of a workdir, oldest first."""
  paths = [os.path.join(workdir, RECORD)]
  folder = os.path.join(workdir, RESUMES)
  if os.path.isdir(folder):
    paths += [os.path.join(folder, name) for name in sorted(os.listdir(folder))
              if name.endswith(".json")]
  return [files.read_json_object(path) for path in paths if os.path.isfile(path)]


def record_of_step(workdir: str, step: int) -> dict | None:
  """The record of the start that trained `step`: the latest one that began before it."""
  before = [r for r in read_records(workdir) if r["run"]["start_step"] < step]
  return before[-1] if before else None


def _warn_changes(previous: dict, record: dict) -> None:
  before, after = _compared(previous), _compared(record)
  changes = [f"{key} {files.json_text(before.get(key))} -> {files.json_text(after.get(key))}"
             for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]
  if changes:
    logging.warning("resuming at step %d with other settings than the previous start (at step "
                    "%d, %s): %s", record["run"]["start_step"], previous["run"]["start_step"],
                    previous["run"]["time"], ", ".join(changes))


def _compared(record: dict) -> dict:
  return {**flatten(record["config"]), "prepared data": record["data"]["prepared"]}


def flatten(tree: dict, prefix: str = "") -> dict:
  """Nested dicts as one: {"optim": {"lr": 1e-6}} -> {"optim.lr": 1e-6}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def logged_metrics(workdir: str, step: int) -> dict | None:
  """The last line of metrics.jsonl at or before `step`, or None."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  last = None
  with open(path, encoding="utf-8") as f:
    for line in f:
      metrics = json.loads(line)
      if metrics["step"] <= step:
        last = metrics
  return last


def model_card(record: dict, step: int, metrics: dict | None) -> str:
  """The README.md of an exported value encoder: the base model, the values trained on, the
  recipe and the metrics of the last logged step, then the whole config. Like the weights, it
  is the same for the same training (no times, hosts or speeds)."""
  config, data = record["config"], record["data"]
  model, loss, optim = config["model"], config["loss"], config["optim"]
  base = f"`{model['pretrained']}`"
  if model.get("revision"):
    base += f" (revision `{model['revision']}`)"
  init = (f"`{model['value_encoder_init']}`" if model["value_encoder_init"]
          else "the base model's text encoder")
  # A record from before `loss.margins` existed trained with the absolute ones.
  hyperparameters = losses.objective(loss["name"], loss.get("margins", "absolute")).hyperparameters
  margins = ", ".join(f"{k} {loss[k]:g}" for k in hyperparameters)
  objective = f"{loss['name']} ({margins})" if margins else loss["name"]
  values = "\n".join(f"- {value} ({count} aligned images)"
                     for value, count in data["values"].items())
  if metrics:   # steps_per_second tells the machine, not the model
    logged = "\n".join(f"- {key} {'not finite' if value is None else format(value, '.6g')}"
                       for key, value in metrics.items() if key not in ("step", "steps_per_second"))
    logged = f"## Metrics at step {metrics['step']}\n\n{logged}"
  else:
    logged = "## Metrics\n\nNo step was logged up to this one."
  run = record["run"]
  return f"""---
library_name: transformers
tags:
- livo
- stable-diffusion
- value-alignment
---

# LiVO value encoder, step {step}

A CLIP text encoder trained with LiVO (ACM MM 2024) by livo-jax {run["livo_jax"]}. It turns a
value statement into the token put in front of a frozen Stable Diffusion's prompt states
(`scripts/generate.py --value_encoder=FOLDER --value=...`). `transformers.CLIPTextModel` and
`transformers.AutoTokenizer` load this folder with `from_pretrained`.

- base model (frozen): {base}
- initialised from: {init}
- step {step} of {config["total_steps"]} of run `{run["id"]}`

## Values trained on

{values}

{data["aligned_images"]} aligned images in {data["scenes"]} scenes of
`{config["data"]["train_dir"]}`.

## Recipe

- objective: {objective}
- optimizer: AdamW, lr {optim["lr"]:g}, schedule {optim["schedule"]}, warmup
  {optim["warmup_steps"]} steps, weight decay {optim["weight_decay"]:g}, gradient clipping
  {optim["max_grad_norm"]:g}
- batch: {config["batch_size"]} pairs
- steps: {config["total_steps"]}
- resolution: {config["data"]["resolution"]} px
- dtype: {config["dtype"]} (the frozen nets; the value encoder trains in float32)
- seed: {config["seed"]}

{logged}

<details><summary>The whole config</summary>

```json
{json.dumps(config, indent=2, ensure_ascii=False)}
```

</details>
"""


class MetricsWriter:
  """metrics.jsonl, plus TensorBoard and W&B as `report_to` says, from process 0 only.

  metrics.jsonl and TensorBoard are written synchronously in the calling thread, so a full disk
  or a lost permission raises `WriteFailed` naming the file at once (a writer thread that dies
  would leave the run waiting on its queue forever); W&B sends from a process of its own. The
  run record (`record_start`) goes to both as well.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool, *,
               report_to: tuple[str, ...] = ("tensorboard",), record: dict | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = self.wandb = None
    if not enabled:
      return
    truncate_jsonl(self.path, resume_step)
    if "tensorboard" in report_to:
      folder = os.path.join(workdir, "tensorboard")
      self.tensorboard = guarded(lambda: TensorBoard(folder, purge_step=resume_step + 1), folder)
      if record:
        self.tensorboard.record(record)
    if "wandb" in report_to:
      self.wandb = WandB(workdir, record)

  def _sinks(self) -> list:
    return [sink for sink in (self.tensorboard, self.wandb) if sink]

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    line = files.json_text(dict(step=step, **metrics)) + "\n"

    def append():
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    guarded(append, self.path)
    for sink in self._sinks():
      sink.scalars(metrics, step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    for sink in self._sinks():
      sink.image(name, image, step)

  def close(self) -> None:
    for sink in self._sinks():
      sink.close()


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

  def record(self, record: dict) -> None:
    """A run record as text (`run_record`) and as hparams, at the step the start began from."""
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    step = record["run"]["start_step"]
    text = json.dumps(record, indent=2, ensure_ascii=False)
    self._summary(summary.text("run_record", "    " + text.replace("\n", "\n    ")), step)
    hparams = {key: value if isinstance(value, (bool, int, float, str)) else files.json_text(value)
               for key, value in flatten(record["config"]).items()}
    experiment, session_start, _ = summary.hparams(hparams, dict.fromkeys(HPARAMS_METRICS))
    self._summary(experiment, step)
    self._summary(session_start, step)

  def _summary(self, proto, step: int) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=proto))

  def _write(self, event) -> None:
    def write():
      self._events.write_event(event)
      self._events.flush()
    guarded(write, self.folder)

  def close(self) -> None:
    guarded(self._events.close, self.folder)


class WandB:
  """A Weights & Biases run (`report_to` wandb): one per workdir, its id the run record's, so
  every later start resumes it. W&B keeps only steps above the last it has: the steps a resume
  redoes are in metrics.jsonl and TensorBoard, not W&B."""

  def __init__(self, workdir: str, record: dict):
    import wandb  # pylint: disable=g-import-not-at-top  (optional; check_report_to found it)
    self._wandb = wandb
    try:
      self.run = wandb.init(project=record["config"]["wandb_project"], dir=workdir,
                            name=os.path.basename(workdir), id=record["run"]["id"],
                            resume="allow")
    except Exception as e:  # pylint: disable=broad-except  (wandb raises many kinds)
      raise RunError(f"report_to wandb: wandb.init failed: {' '.join(str(e).split())} "
                     "(WANDB_MODE=offline logs without a server)") from e
    self.run.config.update(record["config"], allow_val_change=True)

  def scalars(self, metrics: dict, step: int) -> None:
    self.run.log(dict(metrics), step=step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    self.run.log({name: self._wandb.Image(image)}, step=step)

  def close(self) -> None:
    self.run.finish()


def check_report_to(report_to: str) -> tuple[str, ...]:
  """`report_to`'s writers, checked at the door: "none", or names of `REPORT_TO` joined by
  commas; wandb only where the package is installed."""
  names = tuple(dict.fromkeys(name.strip() for name in report_to.split(",")))
  if names == ("none",):
    return ()
  for name in names:
    if name not in REPORT_TO:
      raise ConfigError(f"report_to = {report_to!r}: {name!r} is not one of {REPORT_TO} "
                        "(comma-separated), or 'none'")
  if "wandb" in names:
    try:
      import wandb  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ConfigError(f"report_to = {report_to!r}: the wandb package is not installed "
                        "(pip install wandb)") from e
  return names


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
