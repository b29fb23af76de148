"""Seconds per step of what a user runs: `scripts/train.py --config=configs/sd15.py` as shipped.

  python bench/user_path.py                           # small SD, 256 px, batch 4 (64x64 latents)
  python bench/user_path.py --preset=sd15 --resolution=128 --batch=2    # SD 1.5's architecture
  python bench/user_path.py --set=model.remat=blocks --set=data.cache_latents=False ...

Builds a random SD folder (--preset, bench/presets.py) and a synthetic livo_data folder at
--resolution, then runs the training script in fresh processes for --short and --long steps, the
recipe's own defaults plus only what sizes the run (the folders, resolution, batch, step count,
no validation images) and the compilation cache off. Each run prepares its own copy of the
dataset and its caches, so both carry the same fixed costs (start-up, loading, caching,
compilation, the final checkpoint and export) and a step costs
(t_long - t_short) / (long - short). The torch original's step on the same folder and shape is
bench/train_step.py's (`--side=torch`: the VAE on both images and the text encoder in every step,
four UNet calls, autograd), the median of --repeats steps in a warm process; ours includes
everything the training loop adds per step (data, logging, metrics).

Prints one JSON object: each run's wall seconds and the `auto` choices it logged, our seconds
per step, torch's, and torch / ours (> 1: ours is faster). Expected on a 2-core CPU (2026-12-02,
docs/performance.md): see the user-path table there.
"""

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from presets import PRESETS  # pylint: disable=g-import-not-at-top,wrong-import-position

_PRESET = flags.DEFINE_enum("preset", "small", sorted(PRESETS), "random SD shape")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "image height = width")
_BATCH = flags.DEFINE_integer("batch", 4, "preference pairs per step (config.batch_size)")
_SHORT = flags.DEFINE_integer("short", 4, "steps of the short run")
_LONG = flags.DEFINE_integer("long", 12, "steps of the long run")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE: a config override for both runs")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed torch steps (after 1 warm-up)")
_TORCH = flags.DEFINE_bool("torch", True, "also time the torch original's step")
_FOLDER = flags.DEFINE_string("folder", None, "an SD folder to use instead of a fresh random one")


def make_data(root: str, resolution: int) -> str:
  """Two scenes of 4 aligned and 4 violating images each."""
  from livo_data_fixture import write_livo_data  # pylint: disable=g-import-not-at-top
  scenes = (("0-career", "doctor", "gender equality", "a photo of a doctor", 4, 4),
            ("0-career", "nurse", "gender equality", "a photo of a nurse", 4, 4))
  return write_livo_data(root, scenes, size=(resolution, resolution))


def train_run(folder: str, train_dir: str, root: str, steps: int) -> dict:
  """One `scripts/train.py` process; its wall seconds and the `auto` choices it logged."""
  workdir = os.path.join(root, f"run{steps}")
  overrides = {"model.pretrained": folder, "data.train_dir": train_dir,
               "data.cache_dir": os.path.join(workdir, "prepared"),
               "data.resolution": _RESOLUTION.value, "batch_size": _BATCH.value,
               "total_steps": steps, "eval.every": 0, "compilation_cache_dir": ""}
  for item in _SET.value:
    key, _, value = item.partition("=")
    overrides[key] = value
  command = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
             f"--config={os.path.join(ROOT, 'configs', 'sd15.py')}", f"--workdir={workdir}"]
  command += [f"--config.{k}={v}" for k, v in overrides.items()]
  start = time.perf_counter()
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise RuntimeError(f"{steps}-step run failed (exit {out.returncode}): "
                       + (out.stderr.strip().splitlines() or ["no output"])[-1])
  auto = dict(re.findall(r"\] (\S+) auto: (\S+)", out.stderr))
  return dict(seconds=seconds, auto=auto)


def torch_step(folder: str) -> dict:
  """bench/train_step.py's torch side on `folder`: the original's step, median seconds."""
  command = [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--side=torch",
             f"--folder={folder}", f"--resolution={_RESOLUTION.value}",
             f"--batch={_BATCH.value}", "--warmup=1", f"--repeats={_REPEATS.value}"]
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    return dict(error=(out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
  return json.loads(lines[-1][len("RESULT "):])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _LONG.value <= _SHORT.value:
    raise app.UsageError(f"--long={_LONG.value} must exceed --short={_SHORT.value}")
  root = tempfile.mkdtemp(prefix="user_path-")
  folder = _FOLDER.value
  if not folder:
    import tiny_sd  # pylint: disable=g-import-not-at-top
    folder = os.path.join(root, _PRESET.value)
    tiny_sd.make_sd_folder(folder, std=0.02, **PRESETS[_PRESET.value])
  train_dir = make_data(os.path.join(root, "livo_data"), _RESOLUTION.value)

  runs = {steps: train_run(folder, train_dir, root, steps) for steps in (_SHORT.value, _LONG.value)}
  ours = (runs[_LONG.value]["seconds"] - runs[_SHORT.value]["seconds"]) / (
      _LONG.value - _SHORT.value)
  result = dict(benchmark="user_path", preset=_PRESET.value, resolution=_RESOLUTION.value,
                batch=_BATCH.value, overrides=_SET.value, auto=runs[_LONG.value]["auto"],
                runs={f"{s}_steps_seconds": r["seconds"] for s, r in runs.items()},
                step_seconds=ours)
  if _TORCH.value:
    result["torch"] = torch_step(folder)
    if "step_seconds" in result["torch"]:
      result["speedup_over_torch"] = result["torch"]["step_seconds"] / ours
  print(json.dumps(dict(result, cpu=platform.processor() or platform.machine(),
                        cores=os.cpu_count(), date=time.strftime("%Y-%m-%d")), indent=2))


if __name__ == "__main__":
  app.run(main)
