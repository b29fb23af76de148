"""Rounding noise in the hinge's gaps: SD 1.5's UNet in float32, bfloat16 and float16.

  python bench/precision.py          # CPU, ~11 min: SD 1.5's UNet, 32x32 latents, 4 samples

The hinge relu(gamma1 + beta (theta_w - ref_w)) compares the per-sample errors of two UNet
passes, with the value token (theta) and without (ref), against a margin gamma1 / beta = 1e-3
(gamma2 / alpha = 1e-3 too). A UNet computed in 16 bits adds rounding noise to each pass, and
the two passes differ in their context, so their noise does not cancel in the gap. This
measures that noise floor on SD 1.5's UNet architecture (presets.PRESETS, random weights from
the model's own initialisers: the rounding of this computation, not a trained UNet's errors).

A sample is a latent z ~ N(0, I) noised at its own timestep (SD 1.5's schedule), a text
context [77, 768] ~ N(0, 1) and a value token [1, 768] ~ N(0, 1); its error is
`losses.per_sample_mse(unet(x_t, t, context), noise)`, as the step computes it. Passes:
  ref     context = text (77 tokens): the step's ref pass;
  theta   context = [token, text] (78 tokens): the step's theta pass;
  perm    text with its tokens reversed: cross-attention does not see the order of its keys,
          so perm - ref is exactly 0 and what is measured is rounding alone;
  split   ref with the batch in two halves (another batch composition, as another device
          layout gives): split - ref is rounding alone too.
A variant is a compute dtype (float32, bfloat16, float16) and switches:
  +strict  compiled with XLA's `xla_allow_excess_precision` off: every op's result is rounded
           to its dtype. By default XLA may skip a 16-bit rounding where the next op computes
           in float32 anyway (the CPU computes 16-bit convolutions and dots in float32). The
           two modes round at different places; a GPU rounds at others again (every cuDNN or
           cuBLAS output is stored in 16 bits, a fused elementwise chain keeps float32 inside).
  +head32  the UNet's output norm and conv (conv_norm_out, conv_out) in float32 (the loss is
           float32 in every variant: the UNet returns float32 and `per_sample_mse` computes
           in it).
Every variant's weights are one random float32 UNet cast to its dtype; a 16-bit variant's
float32 reference computes the same cast weights on the same inputs (the context rounded to
the variant's dtype, as a 16-bit text encoder delivers it) in float32, so "vs fp32" is the
rounding of the 16-bit compute alone.

Prints one JSON object and the same as a markdown table: per variant, over the samples, the
mean ref error, and the rms and max |.| of perm - ref, split - ref, ref against its float32
reference (also relative), and the value token's gap theta - ref against its float32
reference, with the margin and beta for scale. The rms is around the exact value (0), so it
includes any bias.
"""

import functools
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax import conditioning
from livo_jax import losses
from livo_jax import schedulers
from livo_jax.models import UNet2DConditionModel, UNetConfig
from livo_jax.train.setup import DTYPES   # the trainer's compute dtypes
from presets import PRESETS

SD15_SCHEDULE = schedulers.SchedulerConfig(beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear")
BETA = 1000.0        # the recipe's beta; gamma1 / beta = gamma2 / alpha = MARGIN
MARGIN = 1e-3

_PRESET = flags.DEFINE_enum("preset", "sd15", sorted(PRESETS), "the UNet's shape (presets.py)")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "image height = width (latents: / 8)")
_SAMPLES = flags.DEFINE_integer("samples", 4, "samples, in one batch (split: two halves)")
_VARIANTS = flags.DEFINE_string(
    "variants", "float32,bfloat16,bfloat16+strict,bfloat16+strict+head32,float16+strict",
    "comma-separated DTYPE[+strict][+head32] (see the docstring)")
_SEED = flags.DEFINE_integer("seed", 0, "the weights' and the samples' seed")


def parse_variant(variant: str) -> tuple[str, bool, bool]:
  """"bfloat16+strict+head32" -> ("bfloat16", True, True): dtype, strict, head32."""
  dtype, *switches = variant.split("+")
  if dtype not in DTYPES or not set(switches) <= {"strict", "head32"}:
    raise app.UsageError(f"variant {variant!r}: expected DTYPE[+strict][+head32], DTYPE one of "
                         f"{', '.join(DTYPES)}")
  return dtype, "strict" in switches, "head32" in switches


def random_state(config: UNetConfig, seed: int):
  """A float32 UNet's parameters from the model's own initialisers (jitted: one program)."""
  return jax.jit(lambda: nnx.state(UNet2DConditionModel(config, rngs=nnx.Rngs(seed))))()


@functools.cache
def error_function(config: UNetConfig, dtype, head32: bool, strict: bool):
  """`(state, noisy, t, context, noise) -> [B]` errors of the UNet computed in `dtype`,
  compiled once per input shape and dtype (with `strict`: no excess precision)."""
  abstract = nnx.eval_shape(lambda: UNet2DConditionModel(
      config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
  if head32:
    abstract.conv_norm_out.dtype = abstract.conv_out.dtype = jnp.float32
  graphdef = nnx.graphdef(abstract)
  errors = jax.jit(lambda state, noisy, t, context, noise: losses.per_sample_mse(
      nnx.merge(graphdef, state)(noisy, t, context), noise))
  options = {"xla_allow_excess_precision": False} if strict else None
  compiled = {}

  def run(*args):
    key = tuple((a.shape, a.dtype) for a in args[1:])
    if key not in compiled:
      compiled[key] = errors.lower(*args).compile(options)
    return compiled[key](*args)

  return run


def make_samples(config: UNetConfig, n: int, latent_size: int, seed: int) -> dict:
  """n noised latents with their timesteps and noise, text contexts and value tokens."""
  rng = np.random.default_rng(seed + 1)
  shape = (n, latent_size, latent_size, config.in_channels)
  z, noise = (rng.standard_normal(shape, np.float32) for _ in range(2))
  t = np.linspace(100, 900, n).round().astype(np.int32)
  dim = config.cross_attention_dim
  acp = schedulers.alphas_cumprod(SD15_SCHEDULE)
  return dict(noisy=np.asarray(schedulers.add_noise(acp, z, noise, t)), t=t, noise=noise,
              text=rng.standard_normal((n, conditioning.TEXT_TOKENS, dim), np.float32),
              token=rng.standard_normal((n, 1, dim), np.float32))


def contexts(samples: dict, dtype) -> dict:
  """The passes' contexts, rounded to the compute dtype as a 16-bit text encoder gives them."""
  text = jnp.asarray(samples["text"], dtype)
  return dict(ref=text, perm=text[:, ::-1],
              theta=conditioning.value_context(text, jnp.asarray(samples["token"])))


def passes(errors, state, samples: dict, context: dict, names) -> dict:
  """The per-sample errors [n] (float64 numpy) of the named passes."""
  args = lambda rows, c: (state, samples["noisy"][rows], samples["t"][rows], c[rows],
                          samples["noise"][rows])
  everything = slice(None)
  out = {}
  for name in names:
    if name == "split":
      half = len(samples["t"]) // 2
      out[name] = np.concatenate([np.asarray(errors(*args(rows, context["ref"])))
                                  for rows in (slice(0, half), slice(half, None))])
    else:
      out[name] = np.asarray(errors(*args(everything, context[name])))
  return {k: v.astype(np.float64) for k, v in out.items()}


def spread(x) -> dict:
  """rms and max |x| over the samples of a quantity whose exact value is 0."""
  return dict(rms=float(np.sqrt(np.mean(np.square(x)))), max_abs=float(np.max(np.abs(x))))


def reference(config, state, samples, dtype_name: str) -> dict:
  """ref and theta errors of the weights and inputs cast to `dtype_name`, computed in float32
  (and the seconds it took)."""
  start = time.perf_counter()
  dtype = DTYPES[dtype_name]
  cast = jax.tree.map(lambda a: a.astype(dtype).astype(jnp.float32), state)
  errors = passes(error_function(config, jnp.float32, False, False), cast, samples,
                  contexts(samples, dtype), ("ref", "theta"))
  return dict(errors, seconds=time.perf_counter() - start)


def measure(config, state, samples, variant: str, references: dict) -> dict:
  """One variant's spreads (see the module docstring); `references` by 16-bit dtype name."""
  dtype_name, strict, head32 = parse_variant(variant)
  dtype = DTYPES[dtype_name]
  start = time.perf_counter()
  sixteen = dtype_name != "float32"
  names = ("ref", "perm", "split") + (("theta",) if sixteen else ())
  cast = jax.tree.map(lambda a: a.astype(dtype), state)
  e = passes(error_function(config, dtype, head32, strict), cast, samples,
             contexts(samples, dtype), names)
  result = dict(variant=variant, mean_error=float(np.mean(e["ref"])),
                perm_minus_ref=spread(e["perm"] - e["ref"]),
                split_minus_ref=spread(e["split"] - e["ref"]))
  if sixteen:
    fp32 = references[dtype_name]
    result.update(
        ref_vs_fp32=spread(e["ref"] - fp32["ref"]),
        ref_vs_fp32_relative=spread((e["ref"] - fp32["ref"]) / fp32["ref"]),
        gap_vs_fp32=spread((e["theta"] - e["ref"]) - (fp32["theta"] - fp32["ref"])),
        fp32_gap=spread(fp32["theta"] - fp32["ref"]))
  result["finite"] = bool(all(np.isfinite(v).all() for v in e.values()))
  result["seconds"] = time.perf_counter() - start
  return result


def markdown(results: list[dict]) -> str:
  def cell(r, key):
    if key not in r:
      return "-"
    return f"{r[key]['rms']:.1e} / {r[key]['max_abs']:.1e}"

  rows = ["| variant | mean error | perm - ref | split - ref | ref vs fp32 | ref vs fp32, "
          "relative | gap vs fp32 | beta x max gap noise | s |",
          "|---" * 9 + "|"]
  for r in results:
    noise = max(r[k]["max_abs"] for k in ("perm_minus_ref", "split_minus_ref", "gap_vs_fp32")
                if k in r)
    rows.append(f"| {r['variant']} | {r['mean_error']:.3f} | {cell(r, 'perm_minus_ref')} | "
                f"{cell(r, 'split_minus_ref')} | {cell(r, 'ref_vs_fp32')} | "
                f"{cell(r, 'ref_vs_fp32_relative')} | {cell(r, 'gap_vs_fp32')} | "
                f"{BETA * noise:.3f} | {r['seconds']:.0f} |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  variants = _VARIANTS.value.split(",")
  for variant in variants:
    parse_variant(variant)       # a typo fails before anything runs
  if _SAMPLES.value < 2 or _SAMPLES.value % 2:
    raise app.UsageError(f"--samples={_SAMPLES.value}: must be even and >= 2")
  config = UNetConfig(**PRESETS[_PRESET.value]["unet"])
  latent_size = _RESOLUTION.value // 8
  start = time.perf_counter()
  state = random_state(config, _SEED.value)
  init_seconds = time.perf_counter() - start
  samples = make_samples(config, _SAMPLES.value, latent_size, _SEED.value)
  sixteen = sorted({parse_variant(v)[0] for v in variants} - {"float32"})
  references = {name: reference(config, state, samples, name) for name in sixteen}
  results = [measure(config, state, samples, v, references) for v in variants]
  print(json.dumps(dict(
      benchmark="precision", preset=_PRESET.value, latent_size=latent_size,
      samples=_SAMPLES.value, timesteps=samples["t"].tolist(), margin=MARGIN, beta=BETA,
      init_seconds=init_seconds,
      reference_seconds={k: v["seconds"] for k, v in references.items()},
      jax=jax.__version__, backend=jax.default_backend(),
      cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
      date=time.strftime("%Y-%m-%d"), results=results), indent=2))
  print(markdown(results))


if __name__ == "__main__":
  app.run(main)
