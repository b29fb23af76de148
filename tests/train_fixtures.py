"""The trainer's test config: configs/sd15.py scaled down to the tiny SD of tiny_sd."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# The recipe on the tiny model: fp32, 16 px, batch 4, no eval images, no compilation cache.
TINY = {"model.remat": "none", "dtype": "float32", "data.resolution": 16, "data.num_threads": 1,
        "batch_size": 4, "total_steps": 4, "checkpoint_every": 2, "eval.every": 0,
        "eval.steps": 3, "compilation_cache_dir": ""}


def config_module(name: str):
  """Imports configs/<name>.py (configs/ is not a package, as in big_vision)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_overrides(sd_folder: str, train_dir: str, **overrides) -> dict:
  return {"model.pretrained": sd_folder, "data.train_dir": train_dir, **TINY, **overrides}


def load_config(sd_folder: str, train_dir: str = "unused", **overrides):
  """configs/sd15.py with `tiny_overrides` applied, as `--config.KEY=VALUE` flags would."""
  config = config_module("sd15").get_config()
  for key, value in tiny_overrides(sd_folder, train_dir, **overrides).items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def train_command(workdir: str, sd_folder: str, train_dir: str, **overrides) -> list[str]:
  """The `scripts/train.py` command line of the same tiny config."""
  flags = [f"--config.{k}={v}" for k, v in tiny_overrides(sd_folder, train_dir,
                                                            **overrides).items()]
  return [sys.executable, os.path.join(REPO, "scripts", "train.py"),
          "--config=" + os.path.join(CONFIGS, "sd15.py"), f"--workdir={workdir}", *flags]


def assert_losses_follow(ours: list[dict], reference: list[dict]):
  """The four MSE curves to 1e-6; the hinge loss to 5e-4.

  The hinge multiplies error differences by beta = 1000: one float32 ulp of an error (~1e-7 of
  ~1.4) already moves it by ~1e-4, whatever the batch split or summation order. (The float64
  parity test in test_losses.py holds the loss formula itself to 1e-5.)
  """
  assert [m["step"] for m in ours] == [m["step"] for m in reference[:len(ours)]]
  for got, want in zip(ours, reference):
    for key in ("loss_theta_w", "loss_ref_w", "loss_theta_l", "loss_ref_l"):
      assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)
    assert got["loss"] == pytest.approx(want["loss"], rel=5e-4), got["step"]
