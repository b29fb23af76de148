"""The LiVO training step: pure, jitted once, and the same on one CPU or a pod slice.

  step = make_train_step(graphdefs, tx, schedule, alphas_cumprod, step_settings(config, sched))
  state, metrics = jax.jit(step)(state, frozen, batch)

One step draws the pair's noise and timestep, takes the latents (from pixels through the VAE, or
cached moments), runs the UNet passes the objective needs (docs/method.md §4: theta_* with the
value token, ref_* without, under stop_gradient), applies the loss, and updates the value
encoder. The frozen nets are arguments that are never differentiated: no UNet weight gradient is
ever computed, the gradient reaches the value token through the UNet's activations only.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from livo_jax import conditioning
from livo_jax import losses
from livo_jax import schedulers
from livo_jax.errors import ConfigError
from livo_jax.models.vae import sample_latent


# A float16 UNet's backward pass carries the value token's gradient in 16 bits, whose normal
# range ends at 6e-5: the loss is scaled up by a power of two for it, and the gradients scaled
# back down, exactly, in float32. 2^10 leaves the backward's largest values (O(1) for the
# hinge) 60x below float16's maximum; a step that still overflows is skipped as non-finite.
LOSS_SCALES = {"float16": 2.0 ** 10}


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Everything about the step that is fixed at compile time."""
  objective: str
  hyperparameters: tuple             # ((name, value), ...): the loss function's keywords
  prediction_type: str
  snr_gamma: float
  noise_offset: float
  input_perturbation: float
  grad_accum_steps: int
  merge_passes: bool = True          # theta_w/theta_l in one UNet call of 2B, ref_* in another
  margins: str = "absolute"          # the objective's margins: absolute, or relative (losses)
  loss_scale: float = 1.0            # the loss's factor for the backward pass (LOSS_SCALES)


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

  `state` = {params, opt_state, step, rng, skipped_steps} of the value encoder; `frozen` = the nnx states of the
  text encoder, UNet and VAE (never differentiated); `batch` = the data pipeline's arrays.
  """
  objective = losses.objective(settings.objective, settings.margins)
  hyperparameters = dict(settings.hyperparameters)

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
                                 objective.passes)
      loss, metrics = objective.loss(errors, **hyperparameters)
      return loss * settings.loss_scale, metrics

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
    if settings.loss_scale != 1:
      loss, grads = jax.tree.map(lambda x: x / settings.loss_scale, (loss, grads))

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    # A step whose loss, gradient or update is not finite (an update norm overflows float32
    # long before an update could be meaningful) changes neither the weights nor the optimizer
    # state: it is skipped on device and counted, and the loop stops the run after
    # `max_nonfinite_steps` of them in a row (train/loop.py).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (optax.apply_updates(state["params"], updates), opt_state),
        (state["params"], state["opt_state"]))
    skipped = 1 - finite.astype(jnp.int32)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, update_norm=update_norm,
                   lr=schedule(state["step"]),
                   skipped=skipped, skipped_steps=state["skipped_steps"] + skipped)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng,
                     skipped_steps=state["skipped_steps"] + skipped)
    return new_state, metrics

  return train_step


def _latent_shape(batch: dict, vae) -> tuple:
  if "moments_w" in batch:
    h, w, c2 = batch["moments_w"].shape[1:]
    return (h, w, c2 // 2)
  _, h, w, _ = batch["pixels_w"].shape
  factor = 2 ** (len(vae.config.block_out_channels) - 1)
  return (h // factor, w // factor, vae.config.latent_channels)


def step_settings(config, scheduler_config: schedulers.SchedulerConfig) -> StepSettings:
  """The step's compile-time settings from the config's `loss`, `optim` and `model` keys."""
  loss = config.loss
  check_loss(loss)
  objective = losses.objective(loss.name, loss.margins)
  return StepSettings(
      objective=loss.name,
      hyperparameters=tuple((k, float(loss[k])) for k in objective.hyperparameters),
      prediction_type=loss.prediction_type or scheduler_config.prediction_type,
      snr_gamma=float(loss.snr_gamma), noise_offset=float(loss.noise_offset),
      input_perturbation=float(loss.input_perturbation),
      grad_accum_steps=config.optim.grad_accum_steps,
      merge_passes=config.model.merge_unet_passes, margins=loss.margins,
      loss_scale=LOSS_SCALES.get(config.dtype, 1.0))


def check_loss(loss) -> None:
  """The `loss` section's names, checked before anything loads."""
  if loss.name not in losses.OBJECTIVES:
    raise ConfigError(f"loss.name = {loss.name!r}: expected one of {tuple(losses.OBJECTIVES)}")
  for key, value in loss.items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"loss.{key} = {value}: must be finite")
  for key in ("snr_gamma", "noise_offset", "input_perturbation"):
    if loss[key] < 0:
      raise ConfigError(f"loss.{key} = {loss[key]}: must be >= 0")
  if loss.prediction_type and loss.prediction_type not in losses.PREDICTION_TYPES:
    raise ConfigError(f"loss.prediction_type = {loss.prediction_type!r}: expected "
                      f"'' (from the scheduler config) or one of {losses.PREDICTION_TYPES}")
  if loss.margins not in losses.MARGINS:
    raise ConfigError(f"loss.margins = {loss.margins!r}: expected one of {losses.MARGINS}")
  if loss.margins == "relative":
    if loss.name not in losses.RELATIVE_OBJECTIVES:
      raise ConfigError(f"loss.margins = 'relative': loss.name = {loss.name!r} has no margins "
                        f"(only {tuple(losses.RELATIVE_OBJECTIVES)})")
    for key in ("relative_beta", "relative_alpha"):
      if loss[key] <= 0:
        raise ConfigError(f"loss.{key} = {loss[key]}: must be > 0")
    if loss.snr_gamma > 0:
      raise ConfigError(f"loss.snr_gamma = {loss.snr_gamma}: has no effect with loss.margins = "
                        "'relative' (a pair's weight divides out of its relative gaps)")
