"""Seconds per LiVO training step: our jitted step against the original algorithm in torch.

  python bench/train_step.py                                # CPU: medium SD shape, 256 px, batch 2
  python bench/train_step.py --preset=sd15 --resolution=512 --batch=8   # GPU: the real SD 1.5

Both sides load the same random diffusers folder and train its value encoder with the recipe
(AdamW, clipping, the hinge with beta 1000 / alpha 500). The torch side is the original
algorithm (tests/torch_livo.py): diffusers/transformers models with SDPA attention, the VAE
encoding both images in every step, four separate UNet calls, autograd; on a GPU under fp16
autocast with gradient checkpointing, as the original recipe runs.

Our side is `livo_jax.train`'s step, once per variant. A variant is a base and switches joined
by "+", each switch turning one optimisation off or on:
  pixels        the VAE encodes the images in the step (as the original);
  latents       cached VAE moments (`data.cache_latents`);
  +text         cached prompt states (`data.cache_text`) instead of the text encoder;
  +separate     four separate UNet calls instead of the merged 2B calls;
  +attention=X  attention implementation (blocked, cudnn, xla; default: per platform);
  +remat=X      UNet remat policy (none, dots, blocks; default --remat);
  +dtype=X      compute dtype of the frozen nets (float32, bfloat16; default --dtype);
  +sync         wait for each step's metrics before the next step (a loop that reads the loss
                every step); by default steps are dispatched three at a time, back to back,
                as the trainer runs them;
  +nodonate     the train state is not donated (XLA copies it instead of updating in place).
Each side runs in its own subprocess, so each peak memory is its own; a variant that fails
(e.g. out of memory) is reported with its error and the others still run. Prints one JSON
object: seconds per step after warm-up (the median over --repeats calls of one step, or of
three back-to-back steps), speedups torch / ours (> 1: ours is faster), compile
seconds, peak memory (host RSS on CPU, device peak on GPU), the model FLOPs per step that XLA
counts (in the step lowered with XLA attention and no remat: loops such as the blocked
attention's are counted once by XLA, and the cuDNN kernel not at all) and, on GPU, the MFU
against the chip's dense bf16 peak (--peak_tflops, default the H100's 989).
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


SWITCHES = ("text", "separate", "attention", "remat", "dtype", "sync", "nodonate")


def parse_variant(variant: str, args) -> dict:
  """"latents+text+remat=dots" -> the settings of that variant (defaults from the flags)."""
  base, *switches = variant.split("+")
  if base not in ("pixels", "latents"):
    raise SystemExit(f"variant {variant!r}: starts with pixels or latents, not {base!r}")
  options = dict(base=base, text=False, separate=False, attention=args.attention,
                 remat=args.remat, dtype=args.dtype, sync=False, nodonate=False)
  for switch in switches:
    name, _, value = switch.partition("=")
    if name not in SWITCHES or bool(value) != (name in ("attention", "remat", "dtype")):
      raise SystemExit(f"variant {variant!r}: unknown switch {switch!r} (switches: +text, "
                       "+separate, +attention=X, +remat=X, +dtype=X, +sync, +nodonate)")
    options[name] = value or True
  return options


def run_jax(args, folder: str, variant: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from livo_jax import schedulers, sharding, train  # pylint: disable=g-import-not-at-top

  options = parse_variant(variant, args)
  gpu = jax.default_backend() != "cpu"
  dtype = options["dtype"] or ("bfloat16" if gpu else "float32")
  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])

  def make_step(attention: str, remat: str):
    """(jitted step, frozen states, the value encoder's graphdef and params) of one setting."""
    config = ml_collections.ConfigDict(dict(
        model=dict(pretrained=folder, value_encoder_init="", remat=remat,
                   attention_impl=attention),
        dtype=dtype,
        loss=dict(name="livo", prediction_type="", snr_gamma=0.0, noise_offset=0.0,
                  input_perturbation=0.0, beta_dpo=5000.0, **HINGE),
        optim=dict(grad_accum_steps=1)))
    models = train.load_models(config)
    settings = train.step_settings(config, models.scheduler_config)
    if options["separate"]:
      settings = settings.__class__(**{**settings.__dict__, "merge_passes": False})
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=1e-2))
    graphdefs, frozen = {}, {}
    graphdefs["value_encoder"], params = nnx.split(models.value_encoder)
    for name in ("text_encoder", "unet", "vae"):
      graphdefs[name], frozen[name] = nnx.split(getattr(models, name))
    acp = schedulers.alphas_cumprod(models.scheduler_config)
    step = jax.jit(train.make_train_step(graphdefs, tx, lambda _: 1e-6, acp, settings),
                   out_shardings=(None, sharding.replicated(mesh)),
                   donate_argnums=() if options["nodonate"] else (0,))
    state = dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                 rng=jax.random.PRNGKey(0))
    return step, frozen, graphdefs, state

  step_fn, frozen, graphdefs, state = make_step(options["attention"], options["remat"])
  batch = make_batch(args, os.path.join(folder, "tokenizer"))
  if options["base"] == "latents":   # what the trainer's caches hold
    encode = train.cache_encoder(nnx.merge(graphdefs["vae"], frozen["vae"]), mesh,
                                 train.vae_moments)
    for side in ("w", "l"):
      batch[f"moments_{side}"] = encode(batch.pop(f"pixels_{side}"))
  if options["text"]:
    batch["prompt_embeds"] = train.cache_encoder(
        nnx.merge(graphdefs["text_encoder"], frozen["text_encoder"]), mesh,
        train.prompt_hidden_states)(batch["prompt_ids"])
  batch = jax.device_put(batch)

  # The model FLOPs: the same step with XLA attention (counted by XLA) and no recomputation.
  flops_step, flops_frozen, _, flops_state = (
      (step_fn, frozen, None, state) if (options["attention"], options["remat"]) == ("xla", "none")
      else make_step("xla", "none"))
  cost = flops_step.lower(flops_state, flops_frozen, batch).cost_analysis()
  del flops_step, flops_frozen, flops_state

  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_seconds = time.perf_counter() - start
  holder = [state]

  def steps(n: int):
    """n steps, each waiting for the last one's metrics only with +sync."""
    for _ in range(n):
      holder[0], metrics = compiled(holder[0], frozen, batch)
      if options["sync"]:
        jax.block_until_ready(metrics)
    return jax.block_until_ready(metrics)

  steps(args.warmup)
  per_call = 1 if options["sync"] else 3
  seconds, metrics = median_seconds(lambda: steps(per_call), args.repeats)
  seconds /= per_call
  result = dict(step_seconds=seconds, compile_seconds=compile_seconds,
                loss=float(metrics["loss"]), jax=jax.__version__,
                device=jax.devices()[0].device_kind, dtype=dtype,
                options=dict(options, attention=options["attention"] or "auto", dtype=dtype))
  memory = compiled.memory_analysis()
  if memory is not None:
    result["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
  if cost and "flops" in cost:
    result["model_flops_per_step"] = cost["flops"]
    result["model_tflops_per_second"] = cost["flops"] / seconds / 1e12
    if gpu:
      result["mfu"] = cost["flops"] / seconds / (args.peak_tflops * 1e12)
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      result["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
  result["peak_host_mb"] = peak_host_mb()
  return result


DEFAULT_VARIANTS = ("pixels,pixels+separate,latents,latents+text,latents+text+attention=xla,"
                    "latents+text+remat=dots,latents+text+remat=blocks,latents+text+sync,"
                    "latents+text+nodonate,latents+text+dtype=bfloat16")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
  parser.add_argument("--resolution", type=int, default=256, help="image height = width")
  parser.add_argument("--batch", type=int, default=2, help="preference pairs per step")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--remat", default="none", help="UNet remat policy: none, dots, blocks")
  parser.add_argument("--attention", default="", help="attention implementation ('': auto)")
  parser.add_argument("--dtype", default="", help="float32 or bfloat16 ('': bf16 on GPU)")
  parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                      help="comma-separated variants of our side (see the docstring)")
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  parser.add_argument("--folder", help="an SD folder to use instead of a fresh random one")
  parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side, print JSON
  args = parser.parse_args()
  variants = args.variants.split(",")
  for variant in variants:
    parse_variant(variant, args)   # a typo fails before anything runs

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
      return dict(error=out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"])
    return json.loads(lines[-1][len("RESULT "):])

  results = {"torch": side("torch")}
  for variant in variants:
    results[variant] = side(variant)
    if "step_seconds" in results[variant] and "step_seconds" in results["torch"]:
      results[variant]["speedup_over_torch"] = (results["torch"]["step_seconds"]
                                                / results[variant]["step_seconds"])
  print(json.dumps(dict(
      benchmark="train_step", preset=args.preset, resolution=args.resolution, batch=args.batch,
      cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
      date=time.strftime("%Y-%m-%d"), **results), indent=2))


if __name__ == "__main__":
  main()
