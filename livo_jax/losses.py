"""LiVO's preference objectives on the four per-sample denoising errors (docs/method.md §4).

A training pair is an aligned image `w` and a violating image `l`, noised with one shared noise
and timestep. The UNet is run four times: with the value token ("theta") and without it ("ref"),
on each image. Each run gives a per-sample MSE, and the objectives compare them:

  errors = dict(theta_w=[B], theta_l=[B], ref_w=[B], ref_l=[B])
  objective = OBJECTIVES["livo"]
  loss, metrics = objective.loss(errors, beta=1000., alpha=500., gamma1=1., gamma2=.5)

`objective(name, margins)` is the objective a config names: with `margins="relative"` the LiVO
hinge reads its margins relative to each pair's reference errors (docs/method.md §4, "Beyond the
paper"). Everything here is plain math on arrays; the UNet passes live in `livo_jax.train.step`.
"""

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from livo_jax import schedulers

PREDICTION_TYPES = ("epsilon", "v_prediction")
MARGINS = ("absolute", "relative")   # `loss.margins`: the published form, or relative


def per_sample_mse(prediction, target):
  """Mean squared error over every axis but the batch, in float32 (or wider): [B, ...] -> [B]."""
  dtype = jnp.promote_types(jnp.result_type(prediction, target), jnp.float32)
  diff = prediction.astype(dtype) - target.astype(dtype)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def prediction_target(prediction_type: str, alphas_cumprod, latents, noise, t):
  """What the UNet is trained to predict: the noise, or v = sqrt(acp) eps - sqrt(1-acp) z."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return schedulers.velocity(alphas_cumprod, latents, noise, t)
  raise ValueError(f"prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def min_snr_weights(alphas_cumprod, t, snr_gamma: float, prediction_type: str):
  """Min-SNR-gamma loss weights [B] (Hang et al. 2023), as diffusers' text-to-image trainer.

  snr = acp / (1 - acp); the weight is min(snr, gamma) / snr for epsilon targets and
  min(snr, gamma) / (snr + 1) for v targets (the +1 turns the v error back into an x0 error).
  """
  acp = jnp.asarray(alphas_cumprod, jnp.float32)[t]
  snr = acp / (1 - acp)
  clipped = jnp.minimum(snr, snr_gamma)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1)
  return clipped / snr


def _error_means(errors) -> dict:
  return {f"loss_{name}": jnp.mean(value) for name, value in errors.items()}


def livo_loss(errors, *, beta: float, alpha: float, gamma1: float, gamma2: float):
  """The LiVO hinge, averaged over the batch, with the published absolute margins.

  relu(gamma1 + beta (theta_w - ref_w)) pulls the value-conditioned model toward the aligned
  image; relu(gamma2 + alpha (ref_l - theta_l)) pushes it away from the violating one. Each
  hinge stops at a gap of -gamma1 / beta (-gamma2 / alpha), an MSE difference.
  """
  return _hinge(errors, beta, alpha, gamma1, gamma2)


def relative_livo_loss(errors, *, relative_beta: float, relative_alpha: float, gamma1: float,
                       gamma2: float):
  """The LiVO hinge with each pair's gaps relative to its own reference errors.

  relu(gamma1 + relative_beta (theta_w - ref_w) / sg(ref_w))
    + relu(gamma2 + relative_alpha (ref_l - theta_l) / sg(ref_l)),
  sg = stop_gradient: the absolute hinge with per-pair slopes relative_beta / ref_w and
  relative_alpha / ref_l, so a hinge stops once the pair's gap is the fraction
  gamma1 / relative_beta (gamma2 / relative_alpha) of its reference error. Where every
  reference error is E it equals `livo_loss` with beta = relative_beta / E and
  alpha = relative_alpha / E.
  """
  slope_w = relative_beta / jax.lax.stop_gradient(errors["ref_w"])
  slope_l = relative_alpha / jax.lax.stop_gradient(errors["ref_l"])
  return _hinge(errors, slope_w, slope_l, gamma1, gamma2)


def _hinge(errors, slope_w, slope_l, gamma1: float, gamma2: float):
  """relu(gamma1 + slope_w gap_w) + relu(gamma2 + slope_l gap_l), averaged; slopes scalar or [B]."""
  gap_w = errors["theta_w"] - errors["ref_w"]    # < 0: better than SD on the aligned image
  gap_l = errors["ref_l"] - errors["theta_l"]    # < 0: worse than SD on the violating image
  argument_w, argument_l = slope_w * gap_w, slope_l * gap_l   # the hinge arguments, no margins
  loss = jnp.mean(jax.nn.relu(gamma1 + argument_w) + jax.nn.relu(gamma2 + argument_l))
  metrics = _error_means(errors)
  metrics.update(gap_w=jnp.mean(gap_w), gap_l=jnp.mean(gap_l),
                 relative_gap_w=jnp.mean(gap_w / errors["ref_w"]),
                 relative_gap_l=jnp.mean(gap_l / errors["ref_l"]),
                 beta_gap_w=jnp.mean(argument_w), alpha_gap_l=jnp.mean(argument_l))
  return loss, metrics


def dpo_loss(errors, *, beta_dpo: float):
  """Diffusion-DPO (Wallace et al. 2023) on the same four errors."""
  margin = (errors["theta_w"] - errors["theta_l"]) - (errors["ref_w"] - errors["ref_l"])
  loss = jnp.mean(-jax.nn.log_sigmoid(-0.5 * beta_dpo * margin))
  metrics = _error_means(errors)
  metrics.update(gap_w=jnp.mean(errors["theta_w"] - errors["ref_w"]),
                 gap_l=jnp.mean(errors["ref_l"] - errors["theta_l"]),
                 dpo_accuracy=jnp.mean((margin < 0).astype(jnp.float32)))
  return loss, metrics


def sft_loss(errors):
  """Plain denoising MSE on the aligned images, with the value token."""
  loss = jnp.mean(errors["theta_w"])
  return loss, _error_means(errors)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A loss on the per-sample errors and the UNet passes it needs."""
  loss: Callable
  passes: tuple[str, ...]

  @property
  def hyperparameters(self) -> tuple[str, ...]:
    """The loss's keyword arguments (`beta`, `alpha`, ...): the `loss.*` config keys it reads."""
    return tuple(name for name, p in inspect.signature(self.loss).parameters.items()
                 if p.kind is p.KEYWORD_ONLY)


OBJECTIVES: dict[str, Objective] = {
    "livo": Objective(livo_loss, ("theta_w", "theta_l", "ref_w", "ref_l")),
    "dpo": Objective(dpo_loss, ("theta_w", "theta_l", "ref_w", "ref_l")),
    "sft": Objective(sft_loss, ("theta_w",)),
}
# The objectives with margins, in their relative form (`loss.margins = "relative"`).
RELATIVE_OBJECTIVES: dict[str, Objective] = {
    "livo": Objective(relative_livo_loss, OBJECTIVES["livo"].passes),
}


def objective(name: str, margins: str = "absolute") -> Objective:
  """The objective `loss.name` with its margins in the form `loss.margins` (one of MARGINS)."""
  return RELATIVE_OBJECTIVES[name] if margins == "relative" else OBJECTIVES[name]
