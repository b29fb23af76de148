"""Stable Diffusion's noise schedule and two samplers, matching diffusers' schedulers.

`SchedulerConfig.from_dict` reads a diffusers `scheduler/scheduler_config.json` dict (whatever
scheduler class wrote it: the DDPM noise schedule is shared; `weights.load_scheduler_config`
reads the file). `alphas_cumprod`, `add_noise` and `velocity` serve
training; `DDIM` (eta = 0) and `DPMSolverMultistep` (DPM-Solver++(2M)) sample. A sampler holds
its per-step constants as numpy tables, so `step` runs inside `jax.lax.scan` with a traced step
index:

  sampler = make_sampler("dpm", weights.load_scheduler_config("sd15/scheduler"), 25)
  state = sampler.init_state(latents)
  for i, t in enumerate(sampler.timesteps):  # or jax.lax.scan over (i, t)
    latents, state = sampler.step(state, unet(latents, t, context), latents, i)
"""

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from livo_jax import hf_config
from livo_jax.errors import ConfigError

CONFIG_NAME = "scheduler_config.json"

# Keys that diffusers' DPMSolverMultistep/DDIM read, fixed to the values we implement (diffusers'
# defaults). The DPM ones are what `DPMSolverMultistepScheduler.from_config` of an SD json uses.
_FIXED = {
    "algorithm_type": "dpmsolver++",
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "rescale_betas_zero_snr": False,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": False,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
}

# Keys that do not change DDIM or DPMSolverMultistep as configured above.
_IGNORED = (
    "skip_prk_steps",              # PNDM only
    "variance_type",               # DDPM's noise variance; learned variances are refused below
    "dynamic_thresholding_ratio",  # only read with `thresholding`
    "sample_max_value",            # only read with `thresholding`
    "flow_shift",                  # only read with flow sigmas / dynamic shifting
    "time_shift_type",             # only read with dynamic shifting
)

# A learned variance means a UNet with twice the latent channels, which DPM would slice.
_LEARNED_VARIANCES = ("learned", "learned_range")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction")
_TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The fields of a diffusers scheduler config that our samplers and training read.

  Defaults are diffusers' own (DDIMScheduler's where classes differ), since old configs omit
  keys. `timestep_spacing` is None when the file does not set it: each sampler then uses its
  diffusers class's default, as `<Scheduler>.from_config(json)` does.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  prediction_type: str = "epsilon"
  steps_offset: int = 0
  timestep_spacing: str | None = None
  # DDIM only.
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any],
                source: str = CONFIG_NAME) -> "SchedulerConfig":
    variance_type = raw.get("variance_type")
    if variance_type in _LEARNED_VARIANCES:
      raise ConfigError(f"{source}: field 'variance_type' = {variance_type!r} is not supported "
                        "(learned variances need a UNet with twice the latent channels)")
    return hf_config.parse(cls, raw, fixed=_FIXED, ignored=_IGNORED, source=source)

  def validate(self) -> None:
    """Raises ValueError naming the first field whose value we do not implement."""
    def fail(field, why):
      raise ValueError(f"field '{field}' = {getattr(self, field)!r} {why}")

    if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
      fail("num_train_timesteps", "must be an integer >= 2")
    if self.trained_betas is not None:
      # diffusers then ignores beta_start/beta_end/beta_schedule.
      if len(self.trained_betas) != self.num_train_timesteps:
        fail("trained_betas", f"must hold num_train_timesteps = {self.num_train_timesteps} values")
    elif self.beta_schedule not in _BETA_SCHEDULES:
      fail("beta_schedule", f"is not supported (supported: {', '.join(_BETA_SCHEDULES)})")
    if self.prediction_type not in _PREDICTION_TYPES:
      fail("prediction_type", f"is not supported (supported: {', '.join(_PREDICTION_TYPES)})")
    if self.timestep_spacing is not None and self.timestep_spacing not in _TIMESTEP_SPACINGS:
      fail("timestep_spacing", f"is not supported (supported: {', '.join(_TIMESTEP_SPACINGS)})")
    if not _is_int(self.steps_offset) or self.steps_offset < 0:
      fail("steps_offset", "must be a non-negative integer")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# The training noise schedule.

def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """The DDPM schedule: prod_{s <= t} (1 - beta_s), [num_train_timesteps] float32.

  Betas are diffusers' float32 values (to within an ulp: torch's float32 linspace rounds
  differently); the product is accumulated in float64 like torch's CPU cumprod.
  """
  n = config.num_train_timesteps
  if config.trained_betas is not None:
    betas = np.asarray(config.trained_betas, np.float32)
  elif config.beta_schedule == "linear":
    betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float32)
  elif config.beta_schedule == "scaled_linear":
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float32)**2
  else:  # squaredcos_cap_v2: the Glide cosine schedule, computed in float64 like diffusers
    alpha_bar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * math.pi / 2)**2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
  alphas = 1 - betas
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def add_noise(alphas_cumprod, x0, noise, t):
  """The noised sample z_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise.

  Args:
    alphas_cumprod: [num_train_timesteps], from `alphas_cumprod(config)`.
    x0: clean samples [B, ...].
    noise: standard normal noise, shaped like `x0`.
    t: [B] integer timesteps.
  """
  a, s = _signal_noise_scales(alphas_cumprod, t, x0.ndim)
  return (a * x0 + s * noise).astype(x0.dtype)


def velocity(alphas_cumprod, x0, noise, t):
  """The v-prediction target v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0 (same args as above)."""
  a, s = _signal_noise_scales(alphas_cumprod, t, x0.ndim)
  return (a * noise - s * x0).astype(x0.dtype)


def _signal_noise_scales(alphas_cumprod, t, ndim):
  """sqrt(acp_t) and sqrt(1 - acp_t), shaped [B, 1, ...] to broadcast over a batch."""
  acp = jnp.asarray(alphas_cumprod, jnp.float32)[t].reshape((-1,) + (1,) * (ndim - 1))
  return jnp.sqrt(acp), jnp.sqrt(1 - acp)


# ---------------------------------------------------------------------------------------------
# Samplers.

def _leading(config: SchedulerConfig, n: int) -> np.ndarray:
  """`n` multiples of T // n, descending, plus `steps_offset`."""
  step_ratio = config.num_train_timesteps // n
  return (np.arange(n) * step_ratio).round()[::-1].astype(np.int64) + config.steps_offset


def _trailing(config: SchedulerConfig, n: int) -> np.ndarray:
  """T - 1 downwards in steps of T / n (diffusers' float arange)."""
  t = config.num_train_timesteps
  return np.arange(t, 0, -t / n).round().astype(np.int64) - 1


def _check_timesteps(timesteps: np.ndarray, spacing: str, config: SchedulerConfig,
                     num_inference_steps: int) -> None:
  # diffusers' float arange in "trailing" yields one extra timestep, -1, for some step counts
  # (e.g. 61), and "leading" with steps_offset can reach T: both would index out of range.
  t = config.num_train_timesteps
  if timesteps.min() < 0 or timesteps.max() >= t:
    raise ValueError(
        f"num_inference_steps = {num_inference_steps} with timestep_spacing {spacing!r} gives "
        f"timesteps outside [0, {t}) (from {timesteps.max()} down to {timesteps.min()})")


def _check_num_steps(config: SchedulerConfig, num_inference_steps: int) -> None:
  if not 1 <= num_inference_steps <= config.num_train_timesteps:
    raise ValueError(f"num_inference_steps = {num_inference_steps} must be in "
                     f"[1, num_train_timesteps = {config.num_train_timesteps}]")


def _x0_and_eps(prediction_type: str, model_output, sample, alpha, sigma):
  """The predicted clean sample and noise, for a sample = alpha x0 + sigma eps."""
  if prediction_type == "epsilon":
    return (sample - sigma * model_output) / alpha, model_output
  # v = alpha eps - sigma x0
  return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample


def _at(table: np.ndarray, i):
  """table[i] for a Python or traced integer `i`."""
  return jnp.asarray(table)[i]


class _Sampler:
  """What both samplers share: the checked timesteps (from the subclass's `_timesteps(n)`).

  Attributes:
    timesteps: [num_inference_steps] int64, the UNet's timestep at each step (descending).
    timestep_spacing: the spacing used (the config's, else the diffusers class's default).
    init_noise_sigma: the standard deviation of the initial latent noise.
  """
  init_noise_sigma = 1.0
  default_spacing: str

  def __init__(self, config: SchedulerConfig, num_inference_steps: int):
    _check_num_steps(config, num_inference_steps)
    self.config = config
    self.timestep_spacing = config.timestep_spacing or self.default_spacing
    self.timesteps = self._timesteps(num_inference_steps)
    _check_timesteps(self.timesteps, self.timestep_spacing, config, num_inference_steps)


class DDIM(_Sampler):
  """Deterministic DDIM (eta = 0), as diffusers' `DDIMScheduler.step`."""
  default_spacing = "leading"  # DDIMScheduler's default

  def __init__(self, config: SchedulerConfig, num_inference_steps: int):
    super().__init__(config, num_inference_steps)
    acp = alphas_cumprod(config)
    # diffusers steps back by T // N whatever the spacing (not to the next timestep).
    prev = self.timesteps - config.num_train_timesteps // num_inference_steps
    final = np.float32(1) if config.set_alpha_to_one else acp[0]
    acp_t = acp[self.timesteps]
    acp_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
    self._alpha, self._sigma = np.sqrt(acp_t), np.sqrt(1 - acp_t)
    self._alpha_prev, self._sigma_prev = np.sqrt(acp_prev), np.sqrt(1 - acp_prev)

  def _timesteps(self, n: int) -> np.ndarray:
    if self.timestep_spacing == "leading":
      return _leading(self.config, n)
    if self.timestep_spacing == "trailing":
      return _trailing(self.config, n)
    return np.linspace(0, self.config.num_train_timesteps - 1, n).round()[::-1].astype(np.int64)

  def init_state(self, sample) -> tuple:
    del sample  # DDIM keeps no history
    return ()

  def step(self, state, model_output, sample, i):
    """One denoising step from timestep `timesteps[i]`.

    Args:
      state: from `init_state` or the previous step.
      model_output: the UNet's prediction at (sample, timesteps[i]).
      sample: the current noisy sample.
      i: the step index (Python or traced int).

    Returns:
      (the sample at the next timestep, in `sample`'s dtype; the new state).
    """
    x = sample.astype(jnp.float32)
    x0, eps = _x0_and_eps(self.config.prediction_type, model_output.astype(jnp.float32), x,
                          _at(self._alpha, i), _at(self._sigma, i))
    if self.config.clip_sample:
      r = self.config.clip_sample_range
      x0 = jnp.clip(x0, -r, r)
    prev = _at(self._alpha_prev, i) * x0 + _at(self._sigma_prev, i) * eps
    return prev.astype(sample.dtype), state


class DPMSolverMultistep(_Sampler):
  """DPM-Solver++(2M), as diffusers' `DPMSolverMultistepScheduler` with its default settings.

  Those are solver_order 2, algorithm_type "dpmsolver++", solver_type "midpoint",
  final_sigmas_type "zero" and no Karras sigmas. The first step (no history yet) and the last
  (which diffusers always takes first-order when the final sigma is zero, whatever
  lower_order_final says) are first-order. The state is the previous step's predicted x0.
  """
  default_spacing = "linspace"  # DPMSolverMultistepScheduler's default

  def __init__(self, config: SchedulerConfig, num_inference_steps: int):
    super().__init__(config, num_inference_steps)
    acp = alphas_cumprod(config)
    # Noise-to-signal ratios of the timesteps, then 0 for the clean final sample.
    all_sigmas = ((1 - acp) / acp)**0.5
    sigmas = np.append(all_sigmas[self.timesteps], np.float32(0))
    alpha = 1 / (sigmas**2 + 1)**0.5  # the sample is alpha x0 + sigma eps
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):  # lambda = +inf at the final sigma 0
      lam = np.log(alpha) - np.log(sigma)
    h = lam[1:] - lam[:-1]
    self._alpha, self._sigma = alpha[:-1], sigma[:-1]
    # x_next = ratio x + c0 x0 + c1 (x0 - x0_prev): diffusers' midpoint update with
    # D1 = (x0 - x0_prev) / r0, r0 = h_prev / h, folded into c1 (0 on first-order steps).
    self._ratio = sigma[1:] / sigma[:-1]
    self._c0 = -(alpha[1:] * (np.exp(-h) - 1))
    self._c1 = np.zeros_like(self._c0)
    self._c1[1:-1] = 0.5 * self._c0[1:-1] * h[1:-1] / h[:-2]

  def _timesteps(self, n: int) -> np.ndarray:
    # Unlike DDIM, "leading" and "linspace" space n + 1 points and drop the last.
    if self.timestep_spacing == "leading":
      return _leading(self.config, n + 1)[:-1]
    if self.timestep_spacing == "trailing":
      return _trailing(self.config, n)
    points = np.linspace(0, self.config.num_train_timesteps - 1, n + 1).round()
    return points[::-1][:-1].astype(np.int64)

  def init_state(self, sample) -> dict:
    return {"prev_x0": jnp.zeros(sample.shape, jnp.float32)}

  def step(self, state, model_output, sample, i):
    """One denoising step from timestep `timesteps[i]` (same args and returns as `DDIM.step`)."""
    x = sample.astype(jnp.float32)
    x0, _ = _x0_and_eps(self.config.prediction_type, model_output.astype(jnp.float32), x,
                        _at(self._alpha, i), _at(self._sigma, i))
    prev = (_at(self._ratio, i) * x + _at(self._c0, i) * x0
            + _at(self._c1, i) * (x0 - state["prev_x0"]))
    return prev.astype(sample.dtype), {"prev_x0": x0}


_SAMPLERS = {"ddim": DDIM, "dpm": DPMSolverMultistep}


def make_sampler(name: str, config: SchedulerConfig, num_inference_steps: int):
  """A sampler by name: "dpm" (DPMSolverMultistep) or "ddim" (DDIM)."""
  if name not in _SAMPLERS:
    raise ValueError(f"unknown sampler {name!r} (known: {', '.join(_SAMPLERS)})")
  return _SAMPLERS[name](config, num_inference_steps)
