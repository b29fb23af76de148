"""From a config to a ready run: checks, data, models, the train state and the jitted step.

  check_config(config, jax.device_count())       # every config error, before anything loads
  source = prepare_source(config)                # bad data fails before the models load
  sd = load_models(config)                       # frozen nets + the value encoder to train
  trainer = build_trainer(config, sd, mesh)      # state, shardings, jitted step (also bench/)
  batches = make_batches(config, source, sd, mesh)

Only the value encoder is trained. Its parameters and optimizer state are placed by the
`sharding.trainable` rules; the frozen text encoder, UNet and VAE by `sharding.frozen`
(replicated by default), as inputs of the step that are never differentiated.
"""

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax import conditioning
from livo_jax import data
from livo_jax import schedulers
from livo_jax import weights
from livo_jax.errors import ConfigError
from livo_jax.models import layers
from livo_jax.train import optim
from livo_jax.train import outputs
from livo_jax.train import sharding
from livo_jax.train import step as step_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What `"auto"` means per platform: (key, {platform: choice}, the choice elsewhere).
AUTO = (
    # float16 on GPUs, the original's precision, at bfloat16's tensor-core rate with 4-12x less
    # rounding noise in the hinge's gaps (bfloat16's is 20-100% of the recipe's margin); float32
    # elsewhere (CPUs have no fast 16-bit path, TPUs none for float16). docs/performance.md,
    # "Precision against the hinge margin".
    ("dtype", {"gpu": "float16"}, "float32"),
    # On a CPU recomputation costs 21-28% of the step and saves no memory XLA counts
    # (docs/performance.md, "One LiVO training step"); an accelerator's memory is the limit, so
    # there the UNet blocks are recomputed, as the original's gradient checkpointing does.
    ("model.remat", {"cpu": "none"}, "blocks"),
)
FROZEN = ("text_encoder", "unet", "vae")


def auto_choice(key: str) -> str:
  """What `"auto"` means for `key` (one of `AUTO`'s) on this platform."""
  by_platform, elsewhere = {k: (b, e) for k, b, e in AUTO}[key]
  return by_platform.get(jax.default_backend(), elsewhere)


def resolve_auto(config) -> None:
  """Replaces each `"auto"` of `AUTO` by the platform's choice, in place (so that the run record
  and the caches' keys name what ran), and logs it. A value the user set stays."""
  for key, _, _ in AUTO:
    *parents, leaf = key.split(".")
    node = _value(config, ".".join(parents)) if parents else config
    if node[leaf] == "auto":
      node[leaf] = auto_choice(key)
      logging.info("%s auto: %s on %s", key, node[leaf], jax.default_backend())


def check_config(config, num_devices: int) -> None:
  """Config errors that must stop a run before it loads anything, section by section."""
  for key in ("model.pretrained", "data.train_dir"):
    section, name = key.split(".")
    if not config[section][name]:
      raise ConfigError(f"{key} is required (--config.{key}=PATH)")
  for key in ("model.pretrained", "model.value_encoder_init"):
    name = _value(config, key)
    if name and not weights.hub.is_folder_or_repo_id(name):
      raise ConfigError(f"{key} = {name!r}: no such folder (nor a Hub repo id: ORG/NAME)")
  for key in ("batch_size", "total_steps", "checkpoint_every", "log_every", "keep_checkpoints",
              "max_nonfinite_steps", "optim.grad_accum_steps"):
    value = _value(config, key)
    if value < 1:
      raise ConfigError(f"{key} = {value}: must be >= 1")
  for key in ("eval.every", "eval.steps", "data.num_threads", "data.prefetch"):
    if _value(config, key) < 0:
      raise ConfigError(f"{key} = {_value(config, key)}: must be >= 0")
  if config.eval.every and config.eval.steps < 1:
    raise ConfigError(f"eval.steps = {config.eval.steps}: must be >= 1 when eval.every is set")
  resolution = config.data.resolution
  if resolution < 8 or resolution % 8:
    raise ConfigError(f"data.resolution = {resolution}: must be a positive multiple of 8")
  if config.model.remat not in layers.REMAT_POLICIES:
    raise ConfigError(f"model.remat = {config.model.remat!r}: expected 'auto' or one of "
                      f"{layers.REMAT_POLICIES}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype = {config.dtype!r}: expected 'auto' or one of {tuple(DTYPES)}")
  per_step = num_devices * config.optim.grad_accum_steps
  if config.batch_size % per_step:
    raise ConfigError(f"batch_size = {config.batch_size} must be a multiple of the device count "
                      f"({num_devices}) x optim.grad_accum_steps "
                      f"({config.optim.grad_accum_steps})")
  if config.data.cache_latents and not config.data.center_crop:
    raise ConfigError("data.cache_latents needs data.center_crop=True: a random crop changes the "
                      "pixels at every draw, so their latents cannot be cached (set "
                      "data.cache_latents=False to encode the pixels in every step)")
  step_lib.check_loss(config.loss)
  optim.check(config.optim)
  outputs.check_eval(config.eval)
  for key in ("trainable", "frozen"):
    sharding.rules_named(config.sharding[key], config.sharding.rules, f"sharding.{key}")


def _value(config, key: str):
  node = config
  for name in key.split("."):
    node = node[name]
  return node


def check_resolution(config, sd: weights.StableDiffusion) -> None:
  """`data.resolution` against the loaded model: the UNet needs latents its down blocks halve
  evenly (SD 1.5: multiples of 64 px)."""
  multiple = sd.vae_scale_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
  if config.data.resolution % multiple:
    raise ConfigError(f"data.resolution = {config.data.resolution}: this model needs a multiple "
                      f"of {multiple} px")


def prepare_source(config) -> data.PreferenceSource:
  """The validated, prepared dataset (made once, then reused; see docs/data.md)."""
  prepared = data.prepare(config.data.train_dir, cache_root=config.data.cache_dir or None,
                          skip_bad=config.data.skip_bad, log=logging.info)
  source = data.PreferenceSource(prepared)
  logging.info("%d aligned images in %d scenes (%d bad samples skipped)", len(source),
               source.num_scenes, source.skipped)
  return source


def sd_ref(config) -> weights.ModelRef:
  """`model.pretrained` (a folder or Hub id) with its revision and variant."""
  return weights.ModelRef(config.model.pretrained, revision=config.model.revision or None,
                          variant=config.model.variant or None)


def value_encoder_ref(config) -> weights.ModelRef:
  """Where the value encoder starts: `model.value_encoder_init`, else SD's text encoder."""
  if not config.model.value_encoder_init:
    return sd_ref(config).child("text_encoder")
  return weights.ModelRef(config.model.value_encoder_init,
                          subfolder=config.model.value_encoder_init_subfolder,
                          revision=config.model.value_encoder_init_revision or None)


def load_models(config) -> weights.StableDiffusion:
  """The frozen SD parts in the compute dtype, and the value encoder to train (fp32 master
  weights) from `model.value_encoder_init`, by default the SD text encoder."""
  dtype = DTYPES[config.dtype]
  return weights.load_sd(
      sd_ref(config), value_encoder=value_encoder_ref(config), dtype=dtype, param_dtype=dtype,
      value_encoder_param_dtype=jnp.float32, remat=config.model.remat,
      attention_impl=config.model.attention_impl or None)


@dataclasses.dataclass
class Trainer:
  """What the loop (and the step benchmark) runs: `state, metrics = step(state, frozen, batch)`."""
  state: dict                    # params, opt_state, step, rng, skipped_steps
  frozen: dict                   # the frozen nets' nnx states, placed on the mesh
  step: Callable                 # the jitted train step
  state_shardings: Any
  settings: step_lib.StepSettings


def build_trainer(config, sd: weights.StableDiffusion, mesh, *, donate: bool = True) -> Trainer:
  """The initial train state and the jitted step on `mesh`, as the config says."""
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  settings = step_lib.step_settings(config, sd.scheduler_config)
  rule_sets = config.sharding.rules
  value_graphdef, params = nnx.split(sd.value_encoder)
  trainable = sharding.rules_named(config.sharding.trainable, rule_sets, "sharding.trainable")
  params = jax.device_put(params, sharding.tree_shardings(mesh, params, trainable))

  def init_state(params):
    return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                rng=jax.random.PRNGKey(config.seed), skipped_steps=jnp.int32(0))

  state_shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_state, params), trainable)
  state = jax.jit(init_state, out_shardings=state_shardings)(params)

  graphdefs, frozen = {"value_encoder": value_graphdef}, {}
  for name in FROZEN:
    graphdefs[name], frozen[name] = nnx.split(getattr(sd, name))
  frozen_rules = sharding.rules_named(config.sharding.frozen, rule_sets, "sharding.frozen")
  frozen_shardings = sharding.tree_shardings(mesh, frozen, frozen_rules)
  train_step = jax.jit(
      step_lib.make_train_step(graphdefs, tx, schedule,
                               schedulers.alphas_cumprod(sd.scheduler_config), settings),
      in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,) if donate else ())
  return Trainer(state=state, frozen=jax.device_put(frozen, frozen_shardings), step=train_step,
                 state_shardings=state_shardings, settings=settings)


def make_batches(config, source: data.PreferenceSource, sd: weights.StableDiffusion, mesh):
  """This process's endless batch iterator, with the latent and text caches the config asks."""
  moments = text = None
  if config.data.cache_latents:    # VAE moments computed once
    vae_key = f"{model_key(config, sd)}-{config.dtype}"
    moments = data.cache_moments(source, cache_encoder(sd.vae, mesh, lambda vae, x: vae.moments(x)),
                                 resolution=config.data.resolution,
                                 random_flip=config.data.random_flip, key=vae_key,
                                 log=logging.info)
  if config.data.cache_text:       # the prompts' hidden states computed once
    text_key = f"{model_key(config, sd)}/text_encoder-{config.dtype}"
    encode = cache_encoder(sd.text_encoder, mesh, prompt_hidden_states)
    text = data.cache_text_embeddings(
        source, lambda prompts: encode(conditioning.tokenize(sd.tokenizer, prompts)),
        key=text_key, log=logging.info)
  return data.train_iterator(
      source, tokenizer=sd.tokenizer, resolution=config.data.resolution,
      center_crop=config.data.center_crop, random_flip=config.data.random_flip,
      global_batch=config.batch_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), moments=moments, text=text,
      num_threads=config.data.num_threads, prefetch=config.data.prefetch)


def model_key(config, sd: weights.StableDiffusion) -> str:
  """What names the frozen SD in the caches' keys: the folder it was read from, for a Hub id
  the cached snapshot's (named by the commit, so a moved branch is a new key), and the
  variant."""
  variant = config.model.variant
  return os.path.abspath(sd.folder) + (f"-{variant}" if variant else "")


def cache_encoder(module: nnx.Module, mesh, apply: Callable) -> Callable:
  """numpy x -> float32 numpy `apply(module, x)`, jitted, with the frozen module replicated on
  the mesh: what the latent and text caches call."""
  graphdef, state = nnx.split(module)
  encode = jax.jit(lambda state, x: apply(nnx.merge(graphdef, state), x).astype(jnp.float32))
  state = jax.device_put(state, sharding.replicated(mesh))
  return lambda x: np.asarray(encode(state, x))


def prompt_hidden_states(text_encoder, ids):
  """The text encoder's last hidden states [n, 77, D], as the text cache holds them."""
  return text_encoder(ids)[0]
