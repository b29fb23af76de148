"""Forward time of our Flax UNet against diffusers' torch UNet, same weights, on the CPU.

  python bench/models.py                      # mid-sized SD-shaped UNet, 32x32 latents, batch 2
  python bench/models.py --preset=sd15 --resolution=64 --batch=1   # the real SD 1.5 shape

Prints one JSON object: median forward seconds of each side after warm-up, the ratio
torch / flax (> 1 means Flax is faster), the Flax compile time, and the max abs difference of the
two outputs relative to the output's scale (a parity check on a bigger model than the tests use).
"""

import json
import os
import platform
import time

from absl import app
from absl import flags
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from livo_jax import weights
from livo_jax.models import UNet2DConditionModel, UNetConfig
from timing import median_seconds

_SD_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
PRESETS = {
    # SD 1.5's layout at half its width: 4 levels, 2 layers each, 8 heads, 768-d context.
    "mid": dict(_SD_BLOCKS, block_out_channels=[160, 320, 640, 640]),
    "sd15": dict(_SD_BLOCKS, block_out_channels=[320, 640, 1280, 1280]),
}

_PRESET = flags.DEFINE_enum("preset", "mid", sorted(PRESETS), "UNet shape")
_RESOLUTION = flags.DEFINE_integer("resolution", 32, "latent height = width")
_BATCH = flags.DEFINE_integer("batch", 2, "batch size")
_CONTEXT_LEN = flags.DEFINE_integer("context_len", 77, "text context length")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls per side")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  torch.manual_seed(0)
  torch_unet = diffusers.UNet2DConditionModel(**PRESETS[_PRESET.value]).eval()
  tensors = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
  config = weights.UNET.config_from_dict(dict(torch_unet.config))
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
  weights.layout.fill_from_torch(unet, tensors, "torch UNet")

  rng = np.random.default_rng(0)
  latents = rng.standard_normal((_BATCH.value, 4, _RESOLUTION.value, _RESOLUTION.value),
                                np.float32)
  context = rng.standard_normal((_BATCH.value, _CONTEXT_LEN.value, 768), np.float32)
  timesteps = np.array([500] * _BATCH.value)

  with torch.inference_mode():
    torch_inputs = (torch.from_numpy(latents), torch.from_numpy(timesteps),
                    torch.from_numpy(context))
    torch_forward = lambda: torch_unet(*torch_inputs).sample
    torch_out = torch_forward().numpy()
    torch_seconds, _ = median_seconds(torch_forward, _REPEATS.value)

  graphdef, state = nnx.split(unet)
  forward = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c))
  jax_inputs = (state, jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timesteps),
                jnp.asarray(context))
  start = time.perf_counter()
  compiled = forward.lower(*jax_inputs).compile()
  compile_seconds = time.perf_counter() - start
  flax_out = np.asarray(compiled(*jax_inputs).block_until_ready())
  flax_seconds, _ = median_seconds(lambda: compiled(*jax_inputs).block_until_ready(),
                                   _REPEATS.value)

  error = np.abs(flax_out.transpose(0, 3, 1, 2) - torch_out).max() / np.abs(torch_out).max()
  print(json.dumps({
      "benchmark": "unet_forward", "preset": _PRESET.value, "batch": _BATCH.value,
      "latent_resolution": _RESOLUTION.value, "context_len": _CONTEXT_LEN.value,
      "parameters": sum(v.size for v in tensors.values()),
      "torch_seconds": round(torch_seconds, 4), "flax_seconds": round(flax_seconds, 4),
      "speedup_flax_over_torch": round(torch_seconds / flax_seconds, 3),
      "flax_compile_seconds": round(compile_seconds, 2),
      "max_rel_error": float(f"{error:.3g}"),
      "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
      "torch": torch.__version__, "jax": jax.__version__,
  }, indent=2))


if __name__ == "__main__":
  app.run(main)
