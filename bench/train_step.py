"""Seconds per LiVO training step: our jitted step against the original algorithm in torch.

  python bench/train_step.py                                # CPU: medium SD shape, 256 px, batch 2
  python bench/train_step.py --preset=sd15 --resolution=512 --batch=8   # GPU: the real SD 1.5

Both sides load the same random diffusers folder and train its value encoder with the recipe
(AdamW, clipping, the hinge with beta 1000 / alpha 500). The torch side is the original
algorithm (tests/torch_livo.py): diffusers/transformers models with SDPA attention, the VAE
encoding both images in every step, four separate UNet calls, autograd; on a GPU under fp16
autocast with gradient checkpointing, as the original recipe runs.

Our side is the trainer's own setup and step (`livo_jax.train.setup.build_trainer`), once per
variant. A variant is a base and switches joined
by "+", each switch turning one optimisation off or on:
  pixels        the VAE encodes the images in the step (as the original);
  latents       cached VAE moments (`data.cache_latents`);
  +text         cached prompt states (`data.cache_text`) instead of the text encoder;
  +separate     four separate UNet calls instead of the merged 2B calls;
  +attention=X  attention implementation (blocked, cudnn, xla; default: per platform);
  +remat=X      UNet remat policy (none, dots, blocks; default --remat);
  +dtype=X      compute dtype of the frozen nets (float32, bfloat16, float16; default --dtype);
  +sync         wait for each step's metrics before the next step (a loop that reads the loss
                every step); by default steps are dispatched three at a time, back to back,
                as the trainer runs them;
  +nodonate     the train state is not donated (XLA copies it instead of updating in place).
Each side runs in its own subprocess, so each peak memory is its own; a side that fails
(e.g. out of memory) is reported with its error, `error`: the exception's type and first line,
beside what it had measured, and the others still run. Prints one JSON object: seconds per
step after warm-up (the median over --repeats calls of one step, or of three back-to-back
steps), speedups torch / ours (> 1: ours is faster), compile seconds, peak memory (host RSS on
CPU, device peak on GPU), `attention_impl_used`: how many of the step's traced attention calls
ran each implementation (`livo_jax.models.attention.record`; with the per-platform default on a
GPU, a call cuDNN refused counts as "xla (cuDNN refused ...)" with cuDNN's reason), the model
FLOPs per step that XLA counts (in the step lowered with XLA attention and no remat: loops such
as the blocked attention's are counted once by XLA, and the cuDNN kernel not at all) and, on
GPU, the MFU against the chip's dense bf16 peak (--peak_tflops, default the H100's 989). Exits
with 1 (after the JSON) when a side failed.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from absl import app
from absl import flags

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


def run_jax(args, folder: str, variant: str, result: dict) -> None:
  """Measures the variant into `result`, which keeps what was measured if an error stops it."""
  import jax  # pylint: disable=g-import-not-at-top
  from livo_jax.models import attention  # pylint: disable=g-import-not-at-top
  from livo_jax.train import recipe, setup, sharding  # pylint: disable=g-import-not-at-top

  options = parse_variant(variant, args)
  gpu = jax.default_backend() != "cpu"
  dtype = options["dtype"] or setup.auto_choice("dtype")
  result.update(jax=jax.__version__, device=jax.devices()[0].device_kind, dtype=dtype,
                options=dict(options, attention=options["attention"] or "auto", dtype=dtype))
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])

  def make_trainer(attention_impl: str, remat: str):
    """The trainer's own setup (`setup.build_trainer`) for the recipe with these switches."""
    config = recipe.sd15()
    config.model.pretrained = folder
    config.model.attention_impl, config.model.remat = attention_impl, remat
    config.model.merge_unet_passes = not options["separate"]
    config.dtype = dtype
    config.batch_size = args.batch
    config.loss.update(HINGE)
    sd = setup.load_models(config)
    return setup.build_trainer(config, sd, mesh, donate=not options["nodonate"]), sd

  trainer, sd = make_trainer(options["attention"], options["remat"])
  batch = make_batch(args, os.path.join(folder, "tokenizer"))
  if options["base"] == "latents":   # what the trainer's caches hold
    encode = setup.cache_encoder(sd.vae, mesh, lambda vae, x: vae.moments(x))
    for side in ("w", "l"):
      batch[f"moments_{side}"] = encode(batch.pop(f"pixels_{side}"))
  if options["text"]:
    batch["prompt_embeds"] = setup.cache_encoder(sd.text_encoder, mesh,
                                                 setup.prompt_hidden_states)(batch["prompt_ids"])
  batch = jax.device_put(batch)
  with attention.record() as used:   # jit traces the step here, and only here
    lowered = trainer.step.lower(trainer.state, trainer.frozen, batch)
  result["attention_impl_used"] = dict(used)

  # The model FLOPs: the same step with XLA attention (counted by XLA) and no recomputation.
  if (options["attention"], options["remat"]) == ("xla", "none"):
    cost = lowered.cost_analysis()
  else:
    counted = make_trainer("xla", "none")[0]
    cost = counted.step.lower(counted.state, counted.frozen, batch).cost_analysis()
    del counted

  start = time.perf_counter()
  compiled = lowered.compile()
  result["compile_seconds"] = time.perf_counter() - start
  holder = [trainer.state]

  def steps(n: int):
    """n steps, each waiting for the last one's metrics only with +sync."""
    for _ in range(n):
      holder[0], metrics = compiled(holder[0], trainer.frozen, batch)
      if options["sync"]:
        jax.block_until_ready(metrics)
    return jax.block_until_ready(metrics)

  steps(args.warmup)
  per_call = 1 if options["sync"] else 3
  seconds, metrics = median_seconds(lambda: steps(per_call), args.repeats)
  seconds /= per_call
  result.update(step_seconds=seconds, loss=float(metrics["loss"]))
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


def error_line(e: BaseException) -> str:
  """"Type: the first line of its message" (XLA's out-of-memory errors go on for pages)."""
  return f"{type(e).__name__}: {str(e).strip()}".splitlines()[0]


DEFAULT_VARIANTS = ("pixels,pixels+separate,latents,latents+text,latents+text+attention=xla,"
                    "latents+text+remat=dots,latents+text+remat=blocks,latents+text+sync,"
                    "latents+text+nodonate,latents+text+dtype=bfloat16")


_PRESET = flags.DEFINE_enum("preset", "medium", sorted(PRESETS), "random SD shape")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "image height = width")
_BATCH = flags.DEFINE_integer("batch", 2, "preference pairs per step")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed calls first")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls (the median is reported)")
_REMAT = flags.DEFINE_string("remat", "none", "UNet remat policy: none, dots, blocks")
_ATTENTION = flags.DEFINE_string("attention", "", "attention implementation ('': auto)")
_DTYPE = flags.DEFINE_string("dtype", "", "float32, bfloat16 or float16 ('': the recipe's "
                             "auto, float16 on GPU)")
_VARIANTS = flags.DEFINE_string("variants", DEFAULT_VARIANTS,
                                "comma-separated variants of our side (see the docstring)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 989.0, "the chip's dense bf16 peak, for MFU")
_FOLDER = flags.DEFINE_string("folder", None, "an SD folder to use instead of a fresh random one")
_SIDE = flags.DEFINE_string("side", None, "internal: run one side, print its JSON")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  args = types.SimpleNamespace(
      preset=_PRESET.value, resolution=_RESOLUTION.value, batch=_BATCH.value,
      warmup=_WARMUP.value, repeats=_REPEATS.value, remat=_REMAT.value,
      attention=_ATTENTION.value, dtype=_DTYPE.value, peak_tflops=_PEAK_TFLOPS.value)
  variants = _VARIANTS.value.split(",")
  for variant in variants:
    parse_variant(variant, args)   # a typo fails before anything runs

  if _SIDE.value:
    result = {}
    try:
      if _SIDE.value == "torch":
        result.update(run_torch(args, _FOLDER.value))
      else:
        run_jax(args, _FOLDER.value, _SIDE.value, result)
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = error_line(e)   # e.g. out of memory: reported with what was measured
    print("RESULT " + json.dumps(result))
    return

  folder = _FOLDER.value or make_folder(args.preset, tempfile.mkdtemp())

  def side(name: str) -> dict:
    command = [sys.executable, __file__, f"--side={name}", f"--folder={folder}"] + [
        a for a in sys.argv[1:] if not a.startswith(("--folder", "--side"))]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:   # it died (e.g. killed for host memory): its exit status and last words
      return dict(error=f"exit {out.returncode}: " + "".join(out.stderr.strip().splitlines()[-1:]))
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
  sys.exit(1 if any("error" in r for r in results.values()) else 0)


if __name__ == "__main__":
  app.run(main)
