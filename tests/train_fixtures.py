"""The trainer's test config: configs/sd15.py scaled down to the tiny SD of tiny_sd."""

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def config_module(name: str):
  """Imports configs/<name>.py (configs/ is not a package, as in big_vision)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(sd_folder: str, train_dir: str = "unused", **overrides):
  """The recipe on the tiny model: fp32, 16 px, batch 4, no eval images unless asked."""
  config = config_module("sd15").get_config()
  config.model.pretrained = sd_folder
  config.model.remat = False
  config.dtype = "float32"
  config.data.train_dir = train_dir
  config.data.resolution = 16
  config.data.num_threads = 1
  config.batch_size = 4
  config.total_steps = 4
  config.checkpoint_every = 2
  config.eval.every = 0
  config.eval.steps = 3
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config
