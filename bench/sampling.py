"""Seconds per image for DPM-Solver++ sampling: our compiled loop against diffusers' pipeline.

  python bench/sampling.py                        # CPU: medium random SD, 256 px, batch 2
  python bench/sampling.py --preset=sd15 --resolution=512 --batch=8   # GPU: SD 1.5, fp16/bf16

Both sides load the same random diffusers folder and start from the same latents (25 steps,
CFG 7.5). On a GPU diffusers runs in fp16 with SDPA attention and ours in bf16 (--dtype); on a
CPU both in fp32. Prints one JSON object with the median seconds per image of each side after
warm-up, the images per second, the ratio torch / flax (> 1 means ours is faster), our compile
time, and the mean pixel difference (large in 16-bit: fp16 and bf16 round differently).
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
import jax.numpy as jnp
import numpy as np
import torch

from livo_jax import sampling
from timing import median_seconds

# The random SD folder is built the way the tests build theirs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import tiny_sd  # pylint: disable=g-import-not-at-top,wrong-import-position
from presets import PRESETS  # pylint: disable=g-import-not-at-top,wrong-import-position

def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
  parser.add_argument("--resolution", type=int, default=256, help="image height = width")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="", help="ours: float32 or bfloat16 ('': bf16 on GPU)")
  args = parser.parse_args()
  cuda = torch.cuda.is_available()
  dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")

  root = os.path.join(tempfile.mkdtemp(), f"{args.preset}-sd")
  torch_pipe = tiny_sd.make_sd_folder(root, std=0.05, **PRESETS[args.preset])
  torch_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      torch_pipe.scheduler.config)
  torch_pipe.set_progress_bar_config(disable=True)
  if cuda:
    torch_pipe = torch_pipe.to("cuda", torch.float16)
  sd = sampling.load_pipeline(root, dtype=jnp.dtype(dtype))
  prompts = ["a red circle on a blue square"] * args.batch
  size = args.resolution // 8
  latents = np.random.default_rng(0).standard_normal((args.batch, size, size, 4)).astype(
      np.float32)

  def run_torch():
    start = torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(torch_pipe.device,
                                                                torch_pipe.dtype)
    with torch.inference_mode():
      images = torch_pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5,
                          height=args.resolution, width=args.resolution, latents=start,
                          output_type="np").images   # a host copy: waits for the GPU
    return np.round(images * 255)

  run_ours = lambda: sampling.generate(sd, prompts, steps=args.steps, latents=latents)
  start = time.perf_counter()
  run_ours()
  first_call = time.perf_counter() - start
  flax_seconds, ours = median_seconds(run_ours, args.repeats)
  del sd
  run_torch()  # warm-up
  torch_seconds, reference = median_seconds(run_torch, args.repeats)
  print(json.dumps({
      "benchmark": "sampling_dpm", "preset": args.preset, "batch": args.batch,
      "steps": args.steps, "image_size": int(ours.shape[1]),
      "unet": PRESETS[args.preset]["unet"]["block_out_channels"],
      "torch_dtype": str(torch_pipe.dtype), "flax_dtype": dtype,
      "torch_images_per_second": round(args.batch / torch_seconds, 3),
      "flax_images_per_second": round(args.batch / flax_seconds, 3),
      "torch_seconds_per_image": round(torch_seconds / args.batch, 3),
      "flax_seconds_per_image": round(flax_seconds / args.batch, 3),
      "speedup_flax_over_torch": round(torch_seconds / flax_seconds, 3),
      "flax_compile_seconds": round(first_call - flax_seconds, 2),
      "mean_abs_pixel_difference": float(np.abs(ours - reference).mean()),
      "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
  }, indent=2))


if __name__ == "__main__":
  main()
