"""Seconds per image for DPM-Solver++ sampling: our compiled loop against diffusers' pipeline.

  python bench/sampling.py                       # medium random SD, 256 px, batch 2, 25 steps

Both sides load the same random diffusers folder and start from the same latents; prints one
JSON object with the median seconds per image of each side after warm-up, the ratio
torch / flax (> 1 means ours is faster), our compile time, and the mean pixel difference.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import diffusers
import jax
import numpy as np
import torch

from livo_jax import sampling
from timing import median_seconds

# The random SD folder is built the way the tests build theirs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import tiny_sd  # pylint: disable=g-import-not-at-top,wrong-import-position
from presets import MEDIUM  # pylint: disable=g-import-not-at-top,wrong-import-position

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  root = os.path.join(tempfile.mkdtemp(), "medium-sd")
  torch_pipe = tiny_sd.make_sd_folder(root, std=0.05, **MEDIUM)
  torch_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      torch_pipe.scheduler.config)
  torch_pipe.set_progress_bar_config(disable=True)
  sd = sampling.load_pipeline(root)
  prompts = ["a red circle on a blue square"] * args.batch
  latents = np.random.default_rng(0).standard_normal((args.batch, 32, 32, 4)).astype(np.float32)

  def run_torch():
    with torch.inference_mode():
      images = torch_pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5,
                          latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                          output_type="np").images
    return np.round(images * 255)

  run_ours = lambda: sampling.generate(sd, prompts, steps=args.steps, latents=latents)
  start = time.perf_counter()
  run_ours()
  first_call = time.perf_counter() - start
  flax_seconds, ours = median_seconds(run_ours, args.repeats)
  run_torch()  # warm-up
  torch_seconds, reference = median_seconds(run_torch, args.repeats)
  print(json.dumps({
      "benchmark": "sampling_dpm", "batch": args.batch, "steps": args.steps,
      "image_size": int(ours.shape[1]), "unet": MEDIUM["unet"]["block_out_channels"],
      "torch_seconds_per_image": round(torch_seconds / args.batch, 3),
      "flax_seconds_per_image": round(flax_seconds / args.batch, 3),
      "speedup_flax_over_torch": round(torch_seconds / flax_seconds, 3),
      "flax_compile_seconds": round(first_call - flax_seconds, 2),
      "mean_abs_pixel_difference": float(np.abs(ours - reference).mean()),
      "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
  }, indent=2))


if __name__ == "__main__":
  main()
