"""The trainer under faults: non-finite steps, a full disk, two runs on one workdir, Ctrl-C,
kill -9, and damaged resume state. Real subprocesses and real faults (a NaN forced through the
config, a size-limited tmpfs, a torn file); docs/reliability.md lists each with its test.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from livo_jax import train
from livo_jax.errors import RunError
from livo_jax.train import outputs
from livo_data_fixture import write_livo_data
from train_fixtures import load_config, train_command

RUN = {"total_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  return write_livo_data(str(tmp_path_factory.mktemp("livo_data")), size=(20, 16))


@pytest.fixture(scope="module")
def common(sd_folder, train_dir, tmp_path_factory):
  """Overrides every run here shares: one prepared-data cache and one compilation cache, so
  only the first process compiles the step."""
  return {"data.cache_dir": str(tmp_path_factory.mktemp("prepared")),
          "compilation_cache_dir": str(tmp_path_factory.mktemp("compiled")), **RUN}


@pytest.fixture(scope="module")
def make_config(sd_folder, train_dir, common):
  """In-process runs leave JAX's compilation cache off (it is a process-wide setting)."""
  return lambda **overrides: load_config(
      sd_folder, train_dir, **{**common, "compilation_cache_dir": "", **overrides})


@pytest.fixture(scope="module")
def finished(make_config, tmp_path_factory):
  """A 4-step run: checkpoints 2 and 4, an export. Tests copy it before damaging it."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.train(make_config(), workdir)
  return workdir


def copy_of(workdir: str, tmp_path) -> str:
  target = str(tmp_path / "workdir")
  shutil.copytree(workdir, target)
  return target


def command(workdir, sd_folder, train_dir, common, **overrides):
  return train_command(workdir, sd_folder, train_dir, **{**common, **overrides})


def read_metrics(workdir: str) -> list[dict]:
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def file_bytes(folder: str) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_for(predicate, timeout_s: float, what: str, process=None):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return
    if process is not None and process.poll() is not None:
      raise AssertionError(f"the run ended (rc {process.returncode}) before {what}: "
                           f"{process.stderr.read()[-3000:]}")
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def test_nonfinite_steps_stop_the_run_and_keep_good_work(finished, sd_folder, train_dir, common,
                                                         tmp_path):
  """lr 1e30 from step 5: every update overflows, each step is skipped with the weights
  unchanged, and the third in a row stops the run with exit 1 and one line. Checkpoints 2 and
  4 and the export are untouched; metrics.jsonl stays strict JSON."""
  workdir = copy_of(finished, tmp_path)
  kept = {name: file_bytes(os.path.join(workdir, name))
          for name in ("checkpoints", "value_encoder")}
  out = subprocess.run(command(workdir, sd_folder, train_dir, common, total_steps=12,
                               **{"optim.lr": 1e30}),
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  assert error_lines(out.stderr) == [error_lines(out.stderr)[0]]
  assert error_lines(out.stderr)[0].startswith(
      "error: step 7: 3 steps in a row skipped as not finite"), out.stderr[-2000:]
  assert "update_norm inf" in out.stderr and "Traceback" not in out.stderr
  assert {name: file_bytes(os.path.join(workdir, name)) for name in kept} == kept
  metrics = read_metrics(workdir)
  assert [(m["step"], m["skipped"], m["skipped_steps"]) for m in metrics[4:]] == [
      (5, 1, 1), (6, 1, 2), (7, 1, 3)]


def test_a_skipped_step_leaves_the_weights_unchanged(make_config):
  """In the step itself: a NaN batch gives a skipped step with params and optimizer state
  bit-equal to before, and the next finite batch trains again."""
  import jax  # pylint: disable=g-import-not-at-top
  from livo_jax.train import setup, sharding  # pylint: disable=g-import-not-at-top
  config = make_config()
  sd = setup.load_models(config)
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  trainer = setup.build_trainer(config, sd, mesh, donate=False)
  rng = np.random.default_rng(0)
  batch = {"pixels_w": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32),
           "pixels_l": rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32),
           "prompt_ids": np.ones((4, 77), np.int32), "value_ids": np.ones((4, 77), np.int32)}
  bad = dict(batch, pixels_w=np.full_like(batch["pixels_w"], np.nan))
  before = jax.device_get(trainer.state)
  state, metrics = trainer.step(trainer.state, trainer.frozen, bad)
  after = jax.device_get(state)
  assert int(metrics["skipped"]) == 1 and int(after["skipped_steps"]) == 1
  assert not np.isfinite(float(metrics["loss"]))
  for key in ("params", "opt_state"):
    for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
      np.testing.assert_array_equal(x, y)
  assert int(after["step"]) == 1   # the step and the noise stream move on
  state, metrics = trainer.step(state, trainer.frozen, batch)
  assert int(metrics["skipped"]) == 0 and int(jax.device_get(state)["skipped_steps"]) == 1


@pytest.fixture
def small_disk(tmp_path):
  """Mounts a 16 MB tmpfs at the path given; unmounted after the test."""
  mounted = []

  def mount(path, size="16m"):
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True, check=False).returncode:
      pytest.skip("cannot mount a tmpfs here")
    mounted.append(path)
    return str(path)
  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: str) -> str:
  """Writes a file into `folder` until its file system has no byte left."""
  path = os.path.join(folder, "filler")
  with open(path, "wb", buffering=0) as f:   # unbuffered: nothing left to fail at close
    with pytest.raises(OSError):
      while True:
        f.write(b"\0" * 65536)
  return path


def run_until(args: list[str], ready, what: str, then) -> subprocess.CompletedProcess:
  """Starts a run, calls `then()` once `ready()`, and waits (at most 2 minutes) for its end."""
  run = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    wait_for(ready, 300, what, run)
    then()
    _, stderr = run.communicate(timeout=120)
  finally:
    run.kill()
  return subprocess.CompletedProcess(args, run.returncode, "", stderr)


def test_a_full_disk_stops_the_run_at_once(sd_folder, train_dir, common, small_disk, tmp_path):
  """The workdir on a 16 MB tmpfs, filled up once checkpoint 2 is written: the background save
  of checkpoint 4 fails, and the run stops no later than the next save (it used to go on to
  it and print ~1,100 lines) with one line; once space is back a rerun resumes from 2."""
  workdir = os.path.join(small_disk(tmp_path / "disk"), "workdir")
  args = command(workdir, sd_folder, train_dir, common, total_steps=1000, checkpoint_every=2,
                 log_every=1000)
  filler = []
  out = run_until(args, lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "2")),
                  "checkpoint 2", lambda: filler.append(fill(os.path.dirname(workdir))))
  assert out.returncode == 1, out.stderr[-3000:]
  lines = error_lines(out.stderr)
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines[0].startswith(f"error: {workdir}/checkpoints: checkpoint save failed (noticed "
                             "at step "), lines[0]
  assert int(lines[0].split("noticed at step ")[1].split(")")[0]) <= 6
  assert "No space left on device" in lines[0]
  os.remove(filler[0])
  out = subprocess.run(command(workdir, sd_folder, train_dir, common, total_steps=4),
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2" in out.stderr


def test_a_full_tensorboard_folder_keeps_a_last_checkpoint(sd_folder, train_dir, common,
                                                           small_disk, tmp_path):
  """Only `tensorboard/` full (its own 1 MB tmpfs), no checkpoint due for 1000 steps: the run
  stops with one line naming the folder, after saving the step it reached (complete: orbax
  finalised it; resuming from such a folder is shown by the other tests)."""
  workdir = str(tmp_path / "workdir")
  tensorboard = small_disk(os.path.join(workdir, "tensorboard"), size="1m")
  args = command(workdir, sd_folder, train_dir, common, total_steps=1000, checkpoint_every=1000)
  out = run_until(args, lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")),
                  "the first metrics", lambda: fill(tensorboard))
  assert out.returncode == 1, out.stderr[-3000:]
  assert error_lines(out.stderr) == [
      f"error: {tensorboard}: cannot write: No space left on device"], out.stderr[-3000:]
  saved = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(saved) == 1 and saved[0].isdigit(), saved
  assert f"checkpoint saved at step {saved[0]} before stopping" in out.stderr
  assert os.path.exists(os.path.join(workdir, "checkpoints", saved[0], "_CHECKPOINT_METADATA"))


def test_a_failed_metrics_write_names_the_file(tmp_path):
  """/dev/full gives ENOSPC on every write: the writers raise RunError naming the path, in the
  calling thread (TensorBoard's writer thread used to die and leave the run hanging)."""
  writer = outputs.MetricsWriter(str(tmp_path), 0, True)
  writer.write(1, {"loss": 1.0})
  os.remove(writer.path)
  os.symlink("/dev/full", writer.path)
  with pytest.raises(RunError, match="metrics.jsonl: cannot write: No space left on device"):
    writer.write(2, {"loss": 1.0})
  # The open event file now writes to /dev/full too.
  events = writer.tensorboard._events._py_recordio_writer._writer  # pylint: disable=protected-access
  full = os.open("/dev/full", os.O_WRONLY)
  os.dup2(full, events.fileno())
  os.close(full)
  with pytest.raises(RunError, match="tensorboard: cannot write: No space left on device"):
    writer.tensorboard.scalars({"loss": 1.0}, 2)


def test_one_run_per_workdir_and_ctrl_c_saves(finished, sd_folder, train_dir, common, tmp_path):
  """Run A holds the workdir: run B refuses with one line naming A's host and pid, before any
  model loads. Ctrl-C stops A at the next step with a checkpoint. A run killed with -9 while it
  holds the lock leaves no stale lock: the next one starts, says so, and resumes from the
  Ctrl-C checkpoint."""
  workdir = copy_of(finished, tmp_path)
  long_run = dict(total_steps=100000, checkpoint_every=100000)
  a = subprocess.Popen(command(workdir, sd_folder, train_dir, common, **long_run),
                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    wait_for(lambda: len(read_metrics(workdir)) > 6, 300, "run A's steps", a)
    b = subprocess.run(command(workdir, sd_folder, train_dir, common, **long_run),
                       capture_output=True, text=True, timeout=120, check=False)
    assert b.returncode == 1
    assert error_lines(b.stderr) == [
        f"error: {workdir}/.lock: the workdir is in use by {os.uname().nodename} pid {a.pid} "
        + error_lines(b.stderr)[0].split(f"pid {a.pid} ")[1]], b.stderr[-2000:]
    assert "aligned images" not in b.stderr   # refused before the data and models
    a.send_signal(signal.SIGINT)
    _, stderr = a.communicate(timeout=120)
  finally:
    a.kill()
  assert a.returncode == 0, stderr[-3000:]
  assert "Traceback" not in stderr and "SIGINT: checkpoint saved at step" in stderr
  interrupted_at = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert interrupted_at > 6

  c = subprocess.Popen(command(workdir, sd_folder, train_dir, common, **long_run),
                       stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  try:
    lock = os.path.join(workdir, ".lock")
    wait_for(lambda: os.path.exists(lock) and f"pid {c.pid}" in open(lock).read(), 300,
             "run C's lock", c)
  finally:
    c.kill()
    c.wait()
  assert c.returncode == -signal.SIGKILL
  d = subprocess.run(command(workdir, sd_folder, train_dir, common,
                             total_steps=interrupted_at + 1),
                     capture_output=True, text=True, timeout=600, check=False)
  assert d.returncode == 0, d.stderr[-3000:]
  assert f"pid {c.pid}" in d.stderr and "ended without releasing the workdir" in d.stderr
  assert f"resumed from step {interrupted_at}" in d.stderr
  assert not os.path.exists(os.path.join(workdir, ".lock"))   # released


def test_resume_heals_damaged_state(finished, make_config, tmp_path, caplog):
  """A torn last metrics line, a truncated file in checkpoint 4, an empty step folder 6 and a
  dead process's temporary: each is reported, the unreadable checkpoints are moved aside (not
  deleted), and the run resumes from checkpoint 2 to the same weights as the straight run."""
  workdir = copy_of(finished, tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 1.')                      # a kill mid-line
  os.makedirs(os.path.join(workdir, "checkpoints", "6"))   # a kill before anything was written
  shard = max((os.path.join(root, name) for root, _, names in
               os.walk(os.path.join(workdir, "checkpoints", "4", "state")) for name in names),
              key=os.path.getsize)
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  leftover = os.path.join(workdir, ".value_encoder.tmp-999999999-0123abcd")
  os.makedirs(leftover)
  shutil.rmtree(os.path.join(workdir, "value_encoder"))

  with caplog.at_level(logging.INFO):
    train.train(make_config(), workdir)
  log = caplog.text
  assert "metrics.jsonl: dropped unreadable line(s) 5" in log
  assert "checkpoint 6 cannot be restored" in log and "checkpoint 4 cannot be restored" in log
  assert "resumed from step 2" in log
  assert not os.path.exists(leftover)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert len(os.listdir(os.path.join(workdir, "unreadable_checkpoints"))) == 2
  assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4]
  assert (file_bytes(os.path.join(workdir, "value_encoder"))
          == file_bytes(os.path.join(finished, "value_encoder")))


def test_a_finished_run_trains_nothing(finished, make_config, tmp_path, caplog):
  """Rerun with total_steps below the workdir's step: it says so and changes nothing."""
  workdir = copy_of(finished, tmp_path)
  before = file_bytes(workdir)
  with caplog.at_level(logging.INFO):
    train.train(make_config(total_steps=2), workdir)
  assert "the workdir is at step 4, total_steps is 2: nothing to train" in caplog.text
  after = file_bytes(workdir)
  assert after == before


def test_nonfinite_weights_are_never_exported(finished, make_config, tmp_path):
  """The export's own check: weights that are not finite (here set by hand; the step never
  takes such an update) raise RunError and leave the existing value_encoder/ as it was."""
  import jax  # pylint: disable=g-import-not-at-top
  from livo_jax.train import loop, setup, sharding  # pylint: disable=g-import-not-at-top
  workdir = copy_of(finished, tmp_path)
  before = file_bytes(os.path.join(workdir, "value_encoder"))
  config = make_config()
  sd = setup.load_models(config)
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  trainer = setup.build_trainer(config, sd, mesh, donate=False)
  trainer.state["params"] = jax.tree.map(lambda x: x * np.nan, trainer.state["params"])
  folder = os.path.join(workdir, "value_encoder")
  with pytest.raises(RunError, match="is not finite; .*value_encoder not written"):
    loop._export(sd, trainer, mesh, folder, card="unused")  # pylint: disable=protected-access
  assert file_bytes(os.path.join(workdir, "value_encoder")) == before
