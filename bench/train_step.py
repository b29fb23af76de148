"""Seconds per LiVO training step: our jitted step against the original algorithm in torch.

  python bench/train_step.py                               # CPU: medium SD shape, 64 px, batch 2
  python bench/train_step.py --preset=sd15 --resolution=512 --batch=8   # GPU: the real SD 1.5

Both sides load the same random diffusers folder and train its value encoder with the recipe
(AdamW, clipping, the hinge with beta 1000 / alpha 500). The torch side is the original
algorithm (tests/torch_livo.py): diffusers/transformers models with SDPA attention, the VAE
encoding both images in every step, four separate UNet calls, autograd; on a GPU under fp16
autocast with gradient checkpointing, as the original recipe runs. Our side is `livo_jax.train`'s
step, measured in variants:
  - `pixels`: VAE encode in the step (as the original), policy and reference passes merged;
  - `pixels_separate`: the same with four separate UNet calls (what merging buys);
  - `latents`: from cached VAE moments (`data.cache_latents`).
Each side runs in its own subprocess, so each peak memory is its own. Prints one JSON object:
median step seconds after warm-up, speedups torch / ours (> 1: ours is faster), compile
seconds, peak memory (host RSS on CPU, device peak on GPU), and on GPU the XLA-counted FLOPs per
step and the MFU against the chip's dense bf16 peak (--peak_tflops, default the H100's 989).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from presets import PRESETS  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import median_seconds  # pylint: disable=g-import-not-at-top,wrong-import-position

HINGE = dict(beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5)


def make_folder(preset: str, root: str) -> str:
  import tiny_sd  # pylint: disable=g-import-not-at-top
  folder = os.path.join(root, preset)
  tiny_sd.make_sd_folder(folder, std=0.02, **PRESETS[preset])
  return folder


def make_batch(args, tokenizer_folder: str) -> dict:
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  from livo_jax import conditioning  # pylint: disable=g-import-not-at-top
  tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.resolution, args.resolution, 3)
  prompts = ["a photo of a doctor"] * args.batch
  return dict(
      pixels_w=rng.uniform(-1, 1, shape).astype(np.float32),
      pixels_l=rng.uniform(-1, 1, shape).astype(np.float32),
      prompt_ids=conditioning.tokenize(tokenizer, prompts),
      value_ids=conditioning.tokenize(tokenizer, ["gender equality, " + p for p in prompts]))


def peak_host_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_torch(args, folder: str) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_livo  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  model = torch_livo.OriginalLiVO(
      folder, device="cuda" if cuda else "cpu", lr=1e-6, **HINGE,
      dtype=torch.float16 if cuda else torch.float32,
      autocast_dtype=torch.float16 if cuda else None, gradient_checkpointing=cuda)
  batch = make_batch(args, os.path.join(folder, "tokenizer"))
  factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
  latent = (args.resolution // factor, args.resolution // factor, 4)
  draws = torch_livo.random_draws(np.random.default_rng(1), args.batch, latent, 1000)

  def step():
    out = model.step(batch, draws)
    if cuda:
      torch.cuda.synchronize()
    return out

  for _ in range(args.warmup):
    step()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  seconds, _ = median_seconds(step, args.repeats)
  result = dict(step_seconds=seconds, threads=torch.get_num_threads(), torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else "cpu")
  if cuda:
    result["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
  result["peak_host_mb"] = peak_host_mb()
  return result


def run_jax(args, folder: str, variant: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from livo_jax import schedulers, sharding, train  # pylint: disable=g-import-not-at-top

  gpu = jax.default_backend() != "cpu"
  config = ml_collections.ConfigDict(dict(
      model=dict(pretrained=folder, value_encoder_init="", remat=args.remat,
                 attention_impl=""),
      dtype="bfloat16" if gpu else "float32",
      loss=dict(name="livo", prediction_type="", snr_gamma=0.0, noise_offset=0.0,
                input_perturbation=0.0, beta_dpo=5000.0, **HINGE),
      optim=dict(grad_accum_steps=1)))
  models = train.load_models(config)
  settings = train.step_settings(config, models.scheduler_config)
  if variant == "pixels_separate":
    settings = settings.__class__(**{**settings.__dict__, "merge_passes": False})
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=1e-2))
  graphdefs, frozen = {}, {}
  graphdefs["value_encoder"], params = nnx.split(models.value_encoder)
  for name in ("text_encoder", "unet", "vae"):
    graphdefs[name], frozen[name] = nnx.split(getattr(models, name))
  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
  acp = schedulers.alphas_cumprod(models.scheduler_config)
  step_fn = jax.jit(train.make_train_step(graphdefs, tx, lambda _: 1e-6, acp, settings),
                    out_shardings=(None, sharding.replicated(mesh)), donate_argnums=(0,))

  batch = make_batch(args, os.path.join(folder, "tokenizer"))
  if variant == "latents":
    encode = jax.jit(lambda s, x: jnp.concatenate(
        nnx.merge(graphdefs["vae"], s).encode(x), axis=-1).astype(jnp.float32))
    for side in ("w", "l"):
      batch[f"moments_{side}"] = np.asarray(encode(frozen["vae"], batch.pop(f"pixels_{side}")))
  batch = jax.device_put(batch)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
               rng=jax.random.PRNGKey(0))

  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_seconds = time.perf_counter() - start
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], frozen, batch)
    return jax.block_until_ready(metrics)

  for _ in range(args.warmup):
    step()
  seconds, metrics = median_seconds(step, args.repeats)
  result = dict(step_seconds=seconds, compile_seconds=compile_seconds,
                loss=float(metrics["loss"]), jax=jax.__version__,
                device=jax.devices()[0].device_kind, dtype=config.dtype)
  memory = compiled.memory_analysis()
  if memory is not None:
    result["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  if cost and "flops" in cost:
    result["xla_flops_per_step"] = cost["flops"]
    if gpu:
      result["mfu"] = cost["flops"] / seconds / (args.peak_tflops * 1e12)
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      result["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
  result["peak_host_mb"] = peak_host_mb()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
  parser.add_argument("--resolution", type=int, default=64, help="image height = width")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--remat", action="store_true", help="rematerialise the UNet blocks")
  parser.add_argument("--variants", default="pixels,pixels_separate,latents")
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  parser.add_argument("--folder", help="an SD folder to use instead of a fresh random one")
  parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side, print JSON
  args = parser.parse_args()

  if args.side:
    side = run_torch(args, args.folder) if args.side == "torch" else run_jax(
        args, args.folder, args.side)
    print("RESULT " + json.dumps(side))
    return

  folder = args.folder or make_folder(args.preset, tempfile.mkdtemp())

  def side(name: str) -> dict:
    command = [sys.executable, __file__, f"--side={name}", f"--folder={folder}"] + [
        a for a in sys.argv[1:] if not a.startswith(("--folder", "--side"))]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
      raise RuntimeError(f"{name} side failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])

  results = {"torch": side("torch")}
  for variant in args.variants.split(","):
    results[variant] = side(variant)
  for variant in args.variants.split(","):
    results[variant]["speedup_over_torch"] = (results["torch"]["step_seconds"]
                                              / results[variant]["step_seconds"])
  print(json.dumps(dict(
      benchmark="train_step", preset=args.preset, resolution=args.resolution, batch=args.batch,
      remat=args.remat, cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
      date=time.strftime("%Y-%m-%d"), **results), indent=2))


if __name__ == "__main__":
  main()
