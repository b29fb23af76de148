"""The LiVO trainer: a value encoder against a frozen Stable Diffusion, in one readable loop.

  python scripts/train.py --config=configs/sd15.py --workdir=DIR

Only the value encoder is trained. Its parameters and optimizer state are split over the mesh's
`fsdp` axis; the frozen text encoder, UNet and VAE are replicated inputs of the jitted step that
are never differentiated (no UNet weight gradient is ever computed: the gradient reaches the
value token through the UNet's activations only). The batch is split over every device.

Workdir after a run: `checkpoints/` (orbax, resumed automatically), `metrics.jsonl`,
`tensorboard/`, `images/` (validation grids: plain SD above, with the value below), and
`value_encoder/` (an HF CLIPTextModel folder).
"""

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from livo_jax import checkpoint
from livo_jax import conditioning
from livo_jax import data
from livo_jax import losses
from livo_jax import runtime
from livo_jax import sampling
from livo_jax import schedulers
from livo_jax import sharding
from livo_jax.convert import read_config
from livo_jax.errors import ConfigError
from livo_jax.models import layers, load_clip_text, load_unet, load_vae
from livo_jax.models.vae import sample_latent

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SCHEDULES = ("constant", "warmup_constant", "cosine")


# ---------------------------------------------------------------------------------------------
# The step.

@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything about the step that is fixed at compile time."""
  objective: str
  objective_kwargs: tuple            # ((name, value), ...) for the loss function
  prediction_type: str
  snr_gamma: float
  noise_offset: float
  input_perturbation: float
  grad_accum_steps: int
  merge_passes: bool = True          # theta_w/theta_l in one UNet call of 2B, ref_* in another


def draw_noise(rng, batch_size: int, latent_shape: tuple, num_train_timesteps: int,
               settings: StepSettings) -> dict:
  """The step's random draws, one per pair: the VAE posterior samples, the diffusion noise
  (shared by the aligned and violating image, with its optional offset and perturbation) and
  the timestep (shared too)."""
  keys = jax.random.split(rng, 6)
  shape = (batch_size,) + tuple(latent_shape)
  noise = jax.random.normal(keys[2], shape)
  if settings.noise_offset:
    noise += settings.noise_offset * jax.random.normal(keys[4], (batch_size, 1, 1, shape[-1]))
  noised_with = noise
  if settings.input_perturbation:
    noised_with = noise + settings.input_perturbation * jax.random.normal(keys[5], shape)
  return dict(latent_noise_w=jax.random.normal(keys[0], shape),
              latent_noise_l=jax.random.normal(keys[1], shape),
              noise=noise, noised_with=noised_with,
              timesteps=jax.random.randint(keys[3], (batch_size,), 0, num_train_timesteps))


def latents(vae, batch: dict, draws: dict) -> tuple[jax.Array, jax.Array]:
  """Scaled latents z_w, z_l [B, h, w, C] (float32) from pixels, or from cached VAE moments."""
  def one(side):
    if f"moments_{side}" in batch:
      mean, logvar = jnp.split(batch[f"moments_{side}"], 2, axis=-1)
    else:
      mean, logvar = vae.encode(batch[f"pixels_{side}"])
    dtype = jnp.promote_types(mean.dtype, jnp.float32)   # bf16 VAE -> f32 latents
    z = sample_latent(mean.astype(dtype), logvar.astype(dtype), draws[f"latent_noise_{side}"])
    return jax.lax.stop_gradient(z * vae.scaling_factor)
  return one("w"), one("l")


def prompt_states(text_encoder, batch: dict):
  """The prompt's conditioning [B, 77, D]: the batch's cached hidden states (`prompt_embeds`,
  from `data.cache_text`) or the frozen text encoder's output. Never differentiated."""
  if "prompt_embeds" in batch:
    return jax.lax.stop_gradient(batch["prompt_embeds"])
  return jax.lax.stop_gradient(text_encoder(batch["prompt_ids"])[0])


def preference_errors(value_encoder, unet, z_w, z_l, text, value_ids, draws: dict,
                      alphas_cumprod, settings: StepSettings, passes: tuple[str, ...]) -> dict:
  """The per-sample denoising errors [B] of the UNet passes an objective needs.

  theta_*: conditioned on `[value_token, text]` (78 tokens); ref_*: on the plain prompt's
  states `text` (77 tokens), under stop_gradient. Errors are weighted by min-SNR when
  `snr_gamma` > 0.
  """
  t = draws["timesteps"]
  noisy = {side: schedulers.add_noise(alphas_cumprod, z, draws["noised_with"], t)
           for side, z in (("w", z_w), ("l", z_l))}
  target = {side: losses.prediction_target(settings.prediction_type, alphas_cumprod, z,
                                           draws["noise"], t)
            for side, z in (("w", z_w), ("l", z_l))}

  def run(kind: str, sides: list[str], context):
    """UNet predictions for `sides` under one context, in one call when merging."""
    if settings.merge_passes and len(sides) > 1:
      out = unet(jnp.concatenate([noisy[s] for s in sides]), jnp.concatenate([t] * len(sides)),
                 jnp.concatenate([context] * len(sides)))
      outs = jnp.split(out, len(sides))
    else:
      outs = [unet(noisy[s], t, context) for s in sides]
    if kind == "ref":
      outs = [jax.lax.stop_gradient(o) for o in outs]
    return {f"{kind}_{s}": o for s, o in zip(sides, outs)}

  predictions = {}
  theta_sides = [p[-1] for p in passes if p.startswith("theta")]
  ref_sides = [p[-1] for p in passes if p.startswith("ref")]
  if theta_sides:
    token = conditioning.value_token(value_encoder, value_ids)          # [B, 1, D]
    predictions.update(run("theta", theta_sides, conditioning.value_context(text, token)))
  if ref_sides:
    predictions.update(run("ref", ref_sides, text))

  weights = 1.0
  if settings.snr_gamma > 0:
    weights = losses.min_snr_weights(alphas_cumprod, t, settings.snr_gamma,
                                     settings.prediction_type)
  return {name: losses.per_sample_mse(pred, target[name[-1]]) * weights
          for name, pred in predictions.items()}


def make_train_step(graphdefs: dict, tx: optax.GradientTransformation, schedule: Callable,
                    alphas_cumprod: np.ndarray, settings: StepSettings) -> Callable:
  """`train_step(state, frozen, batch) -> (state, metrics)`, to be jitted.

  `state` = {params, opt_state, step, rng} of the value encoder; `frozen` = the nnx states of the
  text encoder, UNet and VAE (never differentiated); `batch` = the data pipeline's arrays.
  """
  loss_fn_of, passes = losses.OBJECTIVES[settings.objective]
  objective_kwargs = dict(settings.objective_kwargs)

  def train_step(state, frozen, batch):
    text_encoder, unet, vae = (nnx.merge(graphdefs[k], frozen[k])
                               for k in ("text_encoder", "unet", "vae"))
    rng, step_rng = jax.random.split(state["rng"])
    batch_size = batch["value_ids"].shape[0]
    latent_shape = _latent_shape(batch, vae)
    draws = draw_noise(step_rng, batch_size, latent_shape, len(alphas_cumprod), settings)
    z_w, z_l = latents(vae, batch, draws)

    def loss_fn(params, micro):
      value_encoder = nnx.merge(graphdefs["value_encoder"], params)
      errors = preference_errors(value_encoder, unet, micro["z_w"], micro["z_l"], micro["text"],
                                 micro["value_ids"], micro["draws"], alphas_cumprod, settings,
                                 passes)
      return loss_fn_of(errors, **objective_kwargs)

    inputs = dict(z_w=z_w, z_l=z_l, text=prompt_states(text_encoder, batch),
                  value_ids=batch["value_ids"], draws=draws)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = settings.grad_accum_steps
    if k == 1:
      (loss, metrics), grads = grad_fn(state["params"], inputs)
    else:
      # Micro-batch j = rows j, j+k, ...: every device keeps its own rows.
      micro_batches = jax.tree.map(
          lambda x: x.reshape((batch_size // k, k) + x.shape[1:]).swapaxes(0, 1), inputs)

      def accumulate(carry, micro):
        (loss, metrics), grads = grad_fn(state["params"], micro)
        return jax.tree.map(jnp.add, carry, ((loss, metrics), grads)), None

      zeros = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype),
          jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro_batches)))
      summed, _ = jax.lax.scan(accumulate, zeros, micro_batches)
      (loss, metrics), grads = jax.tree.map(lambda x: x / k, summed)

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state["step"]))
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
    return new_state, metrics

  return train_step


def _latent_shape(batch: dict, vae) -> tuple:
  if "moments_w" in batch:
    h, w, c2 = batch["moments_w"].shape[1:]
    return (h, w, c2 // 2)
  _, h, w, _ = batch["pixels_w"].shape
  factor = 2 ** (len(vae.config.block_out_channels) - 1)
  return (h // factor, w // factor, vae.config.latent_channels)


# ---------------------------------------------------------------------------------------------
# Setup.

def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with global-norm clipping and a learning-rate schedule (by optimizer step)."""
  if optim.schedule == "constant":
    schedule = optax.constant_schedule(optim.lr)
  elif optim.schedule == "warmup_constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps),
         optax.constant_schedule(optim.lr)], [optim.warmup_steps])
  elif optim.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps,
                                                  max(total_steps, optim.warmup_steps + 1))
  else:
    raise ConfigError(f"optim.schedule = {optim.schedule!r}: expected one of {_SCHEDULES}")
  parts = []
  if optim.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts), schedule


def check_config(config, num_devices: int) -> None:
  """Config errors that must stop a run before it loads anything."""
  for key in ("model.pretrained", "data.train_dir"):
    section, name = key.split(".")
    if not config[section][name]:
      raise ConfigError(f"{key} is required (--config.{key}=PATH)")
  if config.model.remat not in layers.REMAT_POLICIES:
    raise ConfigError(f"model.remat = {config.model.remat!r}: expected one of "
                      f"{layers.REMAT_POLICIES}")
  if config.dtype not in _DTYPES:
    raise ConfigError(f"dtype = {config.dtype!r}: expected one of {tuple(_DTYPES)}")
  if config.loss.name not in losses.OBJECTIVES:
    raise ConfigError(f"loss.name = {config.loss.name!r}: expected one of "
                      f"{tuple(losses.OBJECTIVES)}")
  if config.loss.prediction_type and config.loss.prediction_type not in losses.PREDICTION_TYPES:
    raise ConfigError(f"loss.prediction_type = {config.loss.prediction_type!r}: expected "
                      f"'' (from the scheduler config) or one of {losses.PREDICTION_TYPES}")
  if config.optim.schedule not in _SCHEDULES:
    raise ConfigError(f"optim.schedule = {config.optim.schedule!r}: expected one of "
                      f"{_SCHEDULES}")
  per_step = num_devices * config.optim.grad_accum_steps
  if config.batch_size % per_step:
    raise ConfigError(f"batch_size = {config.batch_size} must be a multiple of the device count "
                      f"({num_devices}) x optim.grad_accum_steps "
                      f"({config.optim.grad_accum_steps})")
  if config.data.cache_latents and not config.data.center_crop:
    raise ConfigError("data.cache_latents needs data.center_crop=True: a random crop changes the "
                      "pixels at every draw, so their latents cannot be cached")
  for key in ("total_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
    if config[key] < 1:
      raise ConfigError(f"{key} = {config[key]}: must be >= 1")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and proves it writable, before any compute."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir} cannot be written: {e}") from e
  return workdir


@dataclasses.dataclass
class Models:
  tokenizer: Any
  text_encoder: nnx.Module
  unet: nnx.Module
  vae: nnx.Module
  value_encoder: nnx.Module
  scheduler_config: schedulers.SchedulerConfig
  value_encoder_config: dict     # the init folder's config.json, kept in the export


def load_models(config) -> Models:
  """The frozen SD parts (in the compute dtype) and the value encoder (fp32 master weights)."""
  folder = config.model.pretrained
  dtype = _DTYPES[config.dtype]
  attention = dict(attention_impl=config.model.attention_impl or None)
  frozen = dict(dtype=dtype, param_dtype=dtype, **attention)
  init = config.model.value_encoder_init or os.path.join(folder, "text_encoder")
  return Models(
      tokenizer=sampling.load_tokenizer(os.path.join(folder, "tokenizer")),
      text_encoder=load_clip_text(os.path.join(folder, "text_encoder"), **frozen),
      unet=load_unet(os.path.join(folder, "unet"), remat=config.model.remat, **frozen),
      vae=load_vae(os.path.join(folder, "vae"), **frozen),
      value_encoder=load_clip_text(init, dtype=dtype, param_dtype=jnp.float32, **attention),
      scheduler_config=schedulers.load_scheduler_config(os.path.join(folder, "scheduler")),
      value_encoder_config=read_config(init))


def step_settings(config, scheduler_config: schedulers.SchedulerConfig) -> StepSettings:
  loss = config.loss
  kwargs = dict(livo=("beta", "alpha", "gamma1", "gamma2"), dpo=("beta_dpo",), sft=())
  return StepSettings(
      objective=loss.name,
      objective_kwargs=tuple((k, float(loss[k])) for k in kwargs[loss.name]),
      prediction_type=loss.prediction_type or scheduler_config.prediction_type,
      snr_gamma=float(loss.snr_gamma), noise_offset=float(loss.noise_offset),
      input_perturbation=float(loss.input_perturbation),
      grad_accum_steps=config.optim.grad_accum_steps)


def cache_encoder(module: nnx.Module, mesh, apply: Callable) -> Callable:
  """numpy x -> float32 numpy `apply(module, x)`, jitted, with the frozen module replicated on
  the mesh: what the latent and text caches call."""
  graphdef, state = nnx.split(module)
  encode = jax.jit(lambda state, x: apply(nnx.merge(graphdef, state), x).astype(jnp.float32))
  state = jax.device_put(state, sharding.replicated(mesh))
  return lambda x: np.asarray(encode(state, x))


def vae_moments(vae, pixels):
  """VAE moments [n, r, r, 2C]: mean and logvar on the last axis, as the latent cache holds them."""
  return jnp.concatenate(vae.encode(pixels), axis=-1)


def prompt_hidden_states(text_encoder, ids):
  """The text encoder's last hidden states [n, 77, D], as the text cache holds them."""
  return text_encoder(ids)[0]


# ---------------------------------------------------------------------------------------------
# Outputs.

class MetricsWriter:
  """metrics.jsonl + TensorBoard, from process 0 only."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    _truncate_jsonl(self.path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **metrics)) + "\n")
    for name, value in metrics.items():
      self.tensorboard.add_scalar(name, value, step)

  def image(self, name: str, image: np.ndarray, step: int) -> None:
    if self.enabled:
      self.tensorboard.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()


class PositionLog:
  """`data_positions/process_<i>.jsonl`: which stream positions this process read at each step
  (`data.log_positions`), to audit the data split between processes."""

  def __init__(self, workdir: str, resume_step: int):
    folder = os.path.join(workdir, "data_positions")
    os.makedirs(folder, exist_ok=True)
    self.path = os.path.join(folder, f"process_{jax.process_index()}.jsonl")
    _truncate_jsonl(self.path, resume_step)
    self._file = open(self.path, "a")  # pylint: disable=consider-using-with

  def write(self, step: int, positions: np.ndarray) -> None:
    self._file.write(json.dumps(dict(step=step, positions=positions.tolist())) + "\n")

  def close(self) -> None:
    self._file.close()


def _truncate_jsonl(path: str, resume_step: int) -> None:
  """Drops lines after the checkpoint we resume from: those steps are about to be redone."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [l for l in lines if l.strip() and json.loads(l)["step"] <= resume_step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def validation_grid(models: Models, config) -> np.ndarray:
  """Plain SD (top row) and with the value token (bottom row), same prompts and seeds."""
  prompts = list(config.eval.prompts)
  values = list(config.eval.value_statements)
  if len(values) == 1:
    values = values * len(prompts)
  sd = sampling.StableDiffusion(models.tokenizer, models.text_encoder, models.unet, models.vae,
                                models.scheduler_config, models.value_encoder)
  size = config.data.resolution
  common = dict(steps=config.eval.steps, guidance=config.eval.guidance, scheduler="ddim",
                seed=config.eval.seed, height=size, width=size)
  plain = sampling.generate(sd, prompts, **common)
  valued = sampling.generate(sd, prompts, values, **common)
  rows = [np.concatenate(list(row), axis=1) for row in (plain, valued)]
  return np.concatenate(rows, axis=0)


def _check_eval_config(config) -> None:
  statements = config.eval.value_statements
  if config.eval.every and len(statements) not in (1, len(config.eval.prompts)):
    raise ConfigError(f"eval.value_statements has {len(statements)} entries: give one value, "
                      f"or one per eval.prompts entry ({len(config.eval.prompts)})")


# ---------------------------------------------------------------------------------------------
# The loop.

def train(config, workdir: str) -> dict:
  """Trains (or resumes) the value encoder; returns the last logged metrics."""
  workdir = prepare_workdir(workdir)
  check_config(config, jax.device_count())
  _check_eval_config(config)
  runtime.enable_compilation_cache(config.compilation_cache_dir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

  # Data first (bad data fails before the models load): prepare or reuse the array_record copy.
  prepared = data.prepare(config.data.train_dir, cache_root=config.data.cache_dir or None,
                          skip_bad=config.data.skip_bad, log=logging.info)
  source = data.PreferenceSource(prepared)
  logging.info("%d aligned images in %d scenes (%d bad samples skipped)", len(source),
               source.num_scenes, source.skipped)

  models = load_models(config)
  alphas_cumprod = schedulers.alphas_cumprod(models.scheduler_config)
  settings = step_settings(config, models.scheduler_config)
  logging.info("objective %s, prediction type %s", settings.objective, settings.prediction_type)
  moments = None    # optionally, VAE moments computed once
  if config.data.cache_latents:
    vae_key = f"{os.path.abspath(config.model.pretrained)}-{config.dtype}"
    moments = data.cache_moments(source, cache_encoder(models.vae, mesh, vae_moments),
                                 resolution=config.data.resolution,
                                 random_flip=config.data.random_flip, key=vae_key,
                                 log=logging.info)
  text = None       # optionally, the prompts' hidden states computed once
  if config.data.cache_text:
    text_key = f"{os.path.abspath(config.model.pretrained)}/text_encoder-{config.dtype}"
    encode = cache_encoder(models.text_encoder, mesh, prompt_hidden_states)
    text = data.cache_text_embeddings(
        source, lambda prompts: encode(conditioning.tokenize(models.tokenizer, prompts)),
        key=text_key, log=logging.info)
  batches = data.train_iterator(
      source, tokenizer=models.tokenizer, resolution=config.data.resolution,
      center_crop=config.data.center_crop, random_flip=config.data.random_flip,
      global_batch=config.batch_size, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), moments=moments, text=text,
      num_threads=config.data.num_threads,
      prefetch=config.data.prefetch)

  # Train state: the value encoder's params and optimizer state, split over `fsdp`.
  tx, schedule = make_optimizer(config.optim, config.total_steps)
  value_graphdef, params = nnx.split(models.value_encoder)
  params = jax.device_put(params, sharding.tree_shardings(mesh, params))

  def init_state(params):
    return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                rng=jax.random.PRNGKey(config.seed))

  state_shapes = jax.eval_shape(init_state, params)
  state_shardings = sharding.tree_shardings(mesh, state_shapes)
  state = jax.jit(init_state, out_shardings=state_shardings)(params)

  # The frozen nets: replicated, or split over `fsdp` for bases too big to replicate.
  graphdefs, frozen = {"value_encoder": value_graphdef}, {}
  for name in ("text_encoder", "unet", "vae"):
    graphdefs[name], frozen[name] = nnx.split(getattr(models, name))
  frozen_rules = sharding.FSDP_RULES if config.model.shard_frozen else sharding.REPLICATED_RULES
  frozen_shardings = sharding.tree_shardings(mesh, frozen, frozen_rules)
  frozen = jax.device_put(frozen, frozen_shardings)

  train_step = jax.jit(
      make_train_step(graphdefs, tx, schedule, alphas_cumprod, settings),
      in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))

  # Resume from the latest checkpoint, if any.
  checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
  start = checkpoints.latest_step() or 0
  if start:
    state, data_state = checkpoints.restore(
        start, checkpoint.abstract(state_shapes, state_shardings))
    batches.set_state(data_state)
    logging.info("resumed from step %d", start)
  writer = MetricsWriter(workdir, start, is_main)
  positions = PositionLog(workdir, start) if config.data.log_positions else None
  preemption = runtime.PreemptionWatch()

  def log(step: int, device_metrics, seconds: float, steps: int) -> dict:
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    metrics["steps_per_second"] = steps / max(seconds, 1e-9)
    writer.write(step, metrics)
    return metrics

  last_metrics, pending = {}, None
  progress = _progress_bar(config.total_steps, start, enabled=is_main)
  timer = (time.perf_counter(), start)
  stopped_early = False
  for step in range(start + 1, config.total_steps + 1):
    local_batch = next(batches)
    if positions:
      positions.write(step, local_batch["position"])
    batch = sharding.global_batch(mesh, local_batch)
    state, metrics = train_step(state, frozen, batch)
    if step == start + 1:
      jax.block_until_ready(metrics)
      logging.info("first step (with compilation, or a compilation-cache hit) took %.1f s",
                   time.perf_counter() - timer[0])
    # Metrics of the previous logged step are fetched after this step is dispatched, so the
    # host never waits on the device in between.
    if pending is not None:
      last_metrics = log(*pending)
      progress.set_postfix(loss=f"{last_metrics['loss']:.4g}", refresh=False)
      pending = None
    if step % config.log_every == 0 or step == config.total_steps:
      now = time.perf_counter()
      pending = (step, metrics, now - timer[0], step - timer[1])
      timer = (now, step)
    progress.update(1)

    # A preemption (SIGTERM) stops every process at the same step, after a checkpoint.
    stopped_early = preemption.reached(step)
    if (step % config.checkpoint_every == 0 or step == config.total_steps or stopped_early):
      checkpoints.save(step, state, batches.get_state())
    if stopped_early:
      logging.warning("preempted: checkpoint saved at step %d; rerun to resume", step)
      break
    if config.eval.every and (step % config.eval.every == 0 or step == config.total_steps):
      params = sharding.to_host(mesh, state["params"])     # on every process: a gather
      if is_main:
        nnx.update(models.value_encoder, params)
        grid = validation_grid(models, config)
        _save_png(grid, os.path.join(workdir, "images", f"step_{step:06d}.png"))
        writer.image("validation", grid, step)

  if pending is not None:
    last_metrics = log(*pending)
  progress.close()
  preemption.close()
  checkpoints.close()
  if not stopped_early:
    params = sharding.to_host(mesh, state["params"])
    if is_main:
      nnx.update(models.value_encoder, params)
      checkpoint.export_value_encoder(models.value_encoder,
                                      os.path.join(workdir, "value_encoder"),
                                      models.value_encoder_config)
      logging.info("value encoder written to %s", os.path.join(workdir, "value_encoder"))
  writer.close()
  if positions:
    positions.close()
  return last_metrics


def _progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", disable=not enabled,
              dynamic_ncols=True, desc="train")


def _save_png(image: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)
