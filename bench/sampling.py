"""Seconds per image for DPM-Solver++ sampling: our compiled loop against diffusers' pipeline.

  python bench/sampling.py                        # CPU: medium random SD, 256 px, batch 2
  python bench/sampling.py --preset=sd15 --resolution=512 --batch=8   # GPU: SD 1.5, fp16/bf16

Both sides load the same random diffusers folder and start from the same latents (25 steps,
CFG 7.5). On a GPU diffusers runs in fp16 with SDPA attention and ours in bf16 (--dtype); on a
CPU both in fp32. Prints one JSON object with the median seconds per image of each side after
warm-up, the images per second, the ratio torch / flax (> 1 means ours is faster), our compile
time, the mean pixel difference (large in 16-bit: fp16 and bf16 round differently) and
`attention_impl_used`: how many of our traced attention calls ran each implementation
(`livo_jax.models.attention.record`; see bench/train_step.py).
"""

import functools
import json
import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from livo_jax import sampling
from livo_jax import weights
from livo_jax.models import attention
from timing import median_seconds

# The random SD folder is built the way the tests build theirs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import tiny_sd  # pylint: disable=g-import-not-at-top,wrong-import-position
from presets import PRESETS  # pylint: disable=g-import-not-at-top,wrong-import-position

_PRESET = flags.DEFINE_enum("preset", "medium", sorted(PRESETS), "random SD shape (presets.py)")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "image height = width")
_BATCH = flags.DEFINE_integer("batch", 2, "images per call")
_STEPS = flags.DEFINE_integer("steps", 25, "sampler steps")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per side")
_DTYPE = flags.DEFINE_string("dtype", "", "ours: float32 or bfloat16 ('': bf16 on GPU)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cuda = torch.cuda.is_available()
  dtype = _DTYPE.value or ("bfloat16" if jax.default_backend() == "gpu" else "float32")

  root = os.path.join(tempfile.mkdtemp(), f"{_PRESET.value}-sd")
  torch_pipe = tiny_sd.make_sd_folder(root, std=0.05, **PRESETS[_PRESET.value])
  torch_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      torch_pipe.scheduler.config)
  torch_pipe.set_progress_bar_config(disable=True)
  if cuda:
    torch_pipe = torch_pipe.to("cuda", torch.float16)
  sd = weights.load_sd(root, dtype=jnp.dtype(dtype))
  prompts = ["a red circle on a blue square"] * _BATCH.value
  size = _RESOLUTION.value // torch_pipe.vae_scale_factor
  latents = np.random.default_rng(0).standard_normal((_BATCH.value, size, size, 4)).astype(
      np.float32)

  def run_torch():
    start = torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(torch_pipe.device,
                                                                torch_pipe.dtype)
    with torch.inference_mode():
      images = torch_pipe(prompts, num_inference_steps=_STEPS.value, guidance_scale=7.5,
                          height=_RESOLUTION.value, width=_RESOLUTION.value, latents=start,
                          output_type="np").images   # a host copy: waits for the GPU
    return np.round(images * 255)

  run_ours = functools.partial(sampling.generate, sd, prompts, steps=_STEPS.value,
                               latents=latents)
  start = time.perf_counter()
  with attention.record() as attention_used:   # the first call traces
    run_ours()
  first_call = time.perf_counter() - start
  flax_seconds, ours = median_seconds(run_ours, _REPEATS.value)
  del sd, run_ours   # our models leave the device before torch's run
  run_torch()  # warm-up
  torch_seconds, reference = median_seconds(run_torch, _REPEATS.value)
  print(json.dumps({
      "benchmark": "sampling_dpm", "preset": _PRESET.value, "batch": _BATCH.value,
      "steps": _STEPS.value, "image_size": int(ours.shape[1]),
      "unet": list(torch_pipe.unet.config.block_out_channels),
      "torch_dtype": str(torch_pipe.dtype), "flax_dtype": dtype,
      "torch_images_per_second": round(_BATCH.value / torch_seconds, 3),
      "flax_images_per_second": round(_BATCH.value / flax_seconds, 3),
      "torch_seconds_per_image": round(torch_seconds / _BATCH.value, 3),
      "flax_seconds_per_image": round(flax_seconds / _BATCH.value, 3),
      "speedup_flax_over_torch": round(torch_seconds / flax_seconds, 3),
      "flax_compile_seconds": round(first_call - flax_seconds, 2),
      "mean_abs_pixel_difference": float(np.abs(ours - reference).mean()),
      "attention_impl_used": dict(attention_used),
      "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
  }, indent=2))


if __name__ == "__main__":
  app.run(main)
