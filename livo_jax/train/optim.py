"""The optimizer: AdamW with global-norm clipping and a learning-rate schedule, from config keys.

  tx, schedule = make_optimizer(config.optim, config.total_steps)

Used by the trainer (the `optim.*` keys) and by the demo's base-model pretraining.
"""

import math
from typing import Callable

import optax

from livo_jax.errors import ConfigError

SCHEDULES = ("constant", "warmup_constant", "cosine")


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """`optim` holds lr, schedule, warmup_steps, final_lr_fraction (cosine: the end learning rate
  as a fraction of lr), b1, b2, eps, weight_decay and max_grad_norm (0: no clipping)."""
  check(optim)
  if optim.schedule == "constant":
    schedule = optax.constant_schedule(optim.lr)
  elif optim.schedule == "warmup_constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps),
         optax.constant_schedule(optim.lr)], [optim.warmup_steps])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1),
        optim.lr * optim.final_lr_fraction)
  parts = []
  if optim.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts), schedule


def check(optim) -> None:
  """The `optim` keys, checked before anything loads."""
  if optim.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule = {optim.schedule!r}: expected one of {SCHEDULES}")
  if optim.warmup_steps < 0:
    raise ConfigError(f"optim.warmup_steps = {optim.warmup_steps}: must be >= 0")
  for key, low, high in (("lr", 0.0, None), ("eps", 0.0, None), ("b1", None, 1.0),
                         ("b2", None, 1.0)):
    value = optim[key]
    if not math.isfinite(value) or (low is not None and value <= low) or (
        high is not None and not 0 <= value < high):
      bound = f"> {low:g}" if low is not None else f"in [0, {high:g})"
      raise ConfigError(f"optim.{key} = {value}: must be finite and {bound}")
  for key in ("weight_decay", "max_grad_norm", "final_lr_fraction"):
    if not (math.isfinite(optim[key]) and optim[key] >= 0):
      raise ConfigError(f"optim.{key} = {optim[key]}: must be finite and >= 0")
