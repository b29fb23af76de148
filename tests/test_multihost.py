"""Multi-process training and preemption, with real processes and signals.

- Two processes on this machine (loopback coordinator, 2 CPU devices each, each process a DCN
  "slice" of the data axis: `mesh.dcn_data=2`) against one process with 4 devices, same global
  batch and seed: the same losses and weights, and each process reads its own disjoint half of
  every batch.
- SIGTERM mid-run leaves a checkpoint and a clean exit; resuming ends with the weights of an
  uninterrupted run.
- The TPU-pod launcher's --dry-run prints the commands it would run.
"""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import safetensors.numpy

from livo_jax import train
from livo_data_fixture import write_livo_data
from train_fixtures import REPO, assert_losses_follow, load_config, train_command

RUN = {"batch_size": 8, "total_steps": 8, "checkpoint_every": 4, "data.log_positions": True}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
  return write_livo_data(str(tmp_path_factory.mktemp("livo_data")), size=(20, 16))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("prepared"))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")   # conftest's flags too


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def weights(workdir: str) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(os.path.join(workdir, "value_encoder", "model.safetensors"))


def check(process: subprocess.Popen, timeout: float = 600) -> None:
  _, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr[-3000:]


def test_two_processes_equal_one(sd_folder, train_dir, cache, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  command = lambda workdir: train_command(workdir, sd_folder, train_dir,
                                          **{"data.cache_dir": cache, **RUN})
  port = free_port()
  workers = [subprocess.Popen(
      command(multi) + ["--config.mesh.dcn_data=2", f"--coordinator_address=localhost:{port}",
                        "--num_processes=2", f"--process_id={i}"],
      env=cpu_env(2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  for worker in workers:
    check(worker)
  check(subprocess.Popen(command(single), env=cpu_env(4), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True))

  ours, reference = read_jsonl(f"{multi}/metrics.jsonl"), read_jsonl(f"{single}/metrics.jsonl")
  assert [m["step"] for m in ours] == list(range(1, 9))
  assert_losses_follow(ours, reference)
  # Weights to 1e-6 absolute (they are ~0.1; 8 AdamW steps of lr 1e-6 move them by <= 8e-6).
  final, expected = weights(multi), weights(single)
  for key, value in expected.items():
    np.testing.assert_allclose(final[key], value, rtol=0, atol=1e-6, err_msg=key)

  # Only process 0 wrote metrics and the export; each process logged what it read.
  per_process = [read_jsonl(f"{multi}/data_positions/process_{i}.jsonl") for i in range(2)]
  everything = read_jsonl(f"{single}/data_positions/process_0.jsonl")
  for step in range(8):
    halves = [set(p[step]["positions"]) for p in per_process]
    assert not halves[0] & halves[1]
    assert len(halves[0]) == len(halves[1]) == 4
    assert halves[0] | halves[1] == set(everything[step]["positions"])


def test_sigterm_saves_and_resume_matches_uninterrupted(sd_folder, train_dir, cache, tmp_path):
  interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
  overrides = {"data.cache_dir": cache, "batch_size": 4, "checkpoint_every": 1000,
               "log_every": 1}
  run = subprocess.Popen(
      train_command(interrupted, sd_folder, train_dir, **overrides, total_steps=100_000),
      env=cpu_env(1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(interrupted, "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3):
    assert run.poll() is None and time.monotonic() < deadline, "the run ended early"
    time.sleep(0.2)
  run.send_signal(signal.SIGTERM)
  _, stderr = run.communicate(timeout=120)
  assert run.returncode == 0, stderr[-3000:]
  assert "SIGTERM: checkpoint saved at step" in stderr
  saved = [int(s) for s in os.listdir(os.path.join(interrupted, "checkpoints"))]
  assert len(saved) == 1 and 3 <= saved[0] < 100_000
  assert not os.path.exists(os.path.join(interrupted, "value_encoder"))

  total = saved[0] + 3
  check(subprocess.Popen(
      train_command(interrupted, sd_folder, train_dir, **overrides, total_steps=total),
      env=cpu_env(1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  train.train(load_config(sd_folder, train_dir, **overrides, total_steps=total), straight)
  for key, value in weights(straight).items():
    np.testing.assert_array_equal(weights(interrupted)[key], value, err_msg=key)
  assert [m["step"] for m in read_jsonl(metrics)] == list(range(1, total + 1))


def test_launcher_dry_run_prints_every_command():
  out = subprocess.run(
      ["bash", os.path.join(REPO, "scripts", "launch_tpu_pod.sh"), "--dry-run", "--create",
       "--name=livo-pod", "--zone=us-east5-a", "--accelerator=v5litepod-8",
       "--project=my-project", "--workdir=/mnt/shared/livo", "--",
       "--config.model.pretrained=/mnt/sd15", "--config.batch_size=64"],
      capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  tpu = "gcloud compute tpus tpu-vm"
  for expected in (
      f"{tpu} create livo-pod --zone=us-east5-a --project=my-project "
      "--accelerator-type=v5litepod-8",
      f"{tpu} scp",
      "--worker=all",
      "pip install -r requirements.txt",
      "jax[tpu]",
      "python scripts/train.py --config=configs/sd15.py --workdir=/mnt/shared/livo "
      "--distributed --config.model.pretrained=/mnt/sd15 --config.batch_size=64",
      "pkill -TERM -f scripts/train.py"):
    assert expected in text, expected
  # A dry run runs nothing: every command line is printed, none executed.
  assert all(line.startswith(("+ ", "#")) or not line.strip() for line in text.splitlines())


def test_launcher_refuses_missing_arguments():
  out = subprocess.run(["bash", os.path.join(REPO, "scripts", "launch_tpu_pod.sh"), "--dry-run"],
                       capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode != 0 and "--name" in out.stderr
