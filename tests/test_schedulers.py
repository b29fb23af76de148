"""The schedule and samplers against diffusers' torch schedulers built from the same json."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import testutil
from livo_jax import schedulers
from livo_jax import weights
from livo_jax.errors import ConfigError

# diffusers' own numpy 2 deprecation warning, raised inside DPMSolverMultistepScheduler.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

_TORCH = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler}
_SHAPE = (2, 8, 8, 4)
_TOL = 1e-5

# (sampler, extra json keys, num_inference_steps)
PARITY_CASES = [
    ("dpm", {}, 25),
    ("dpm", {}, 10),  # under 15 steps: diffusers' lower_order_final
    ("dpm", {"prediction_type": "v_prediction"}, 25),
    ("dpm", {"prediction_type": "v_prediction"}, 10),
    ("dpm", {"timestep_spacing": "leading"}, 20),
    ("dpm", {"timestep_spacing": "linspace"}, 20),
    ("dpm", {"timestep_spacing": "trailing"}, 20),
    ("dpm", {"timestep_spacing": "trailing"}, 1),
    ("dpm", {"beta_schedule": "squaredcos_cap_v2"}, 15),
    ("ddim", {}, 25),
    ("ddim", {}, 10),
    ("ddim", {"prediction_type": "v_prediction"}, 25),
    ("ddim", {"set_alpha_to_one": True}, 25),
    ("ddim", {"timestep_spacing": "leading"}, 20),
    ("ddim", {"timestep_spacing": "linspace"}, 20),
    ("ddim", {"timestep_spacing": "trailing"}, 20),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0}, 20),
]


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
  """Silences from_config's notes about keys of other scheduler classes (skip_prk_steps, ...)."""
  level = diffusers.utils.logging.get_verbosity()
  diffusers.utils.logging.set_verbosity_error()
  yield
  diffusers.utils.logging.set_verbosity(level)


def _torch_loop(name: str, raw: dict, n: int):
  """Runs diffusers' scheduler on a stand-in model.

  Random model outputs would blow samples up to ~50 (x0 = (x - sigma eps) / alpha with
  alpha ~ 0.07 at the first step), so the stand-in model predicts a fresh x0 around a fixed
  target at every step and returns the epsilon or v consistent with it and the current sample.

  Returns:
    the initial sample, the model output fed at each step, diffusers' timesteps, and the
    sample after each step.
  """
  scheduler = _TORCH[name].from_config(raw)
  scheduler.set_timesteps(n)
  acp = scheduler.alphas_cumprod.numpy().astype(np.float64)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal(_SHAPE, dtype=np.float32)
  target = 0.5 * rng.standard_normal(_SHAPE)
  x, outputs, samples = sample, [], []
  for t in scheduler.timesteps.numpy():
    x0 = target + 0.1 * rng.standard_normal(_SHAPE)
    alpha, sigma = acp[t]**0.5, (1 - acp[t])**0.5
    eps = (x - alpha * x0) / sigma
    v = alpha * eps - sigma * x0
    output = (eps if scheduler.config.prediction_type == "epsilon" else v).astype(np.float32)
    x = scheduler.step(torch.from_numpy(output), int(t), torch.from_numpy(x)).prev_sample.numpy()
    outputs.append(output)
    samples.append(x)
  return sample, np.stack(outputs), scheduler.timesteps.numpy(), np.stack(samples)


def _eager_loop(sampler, sample, outputs):
  x, state, samples = jnp.asarray(sample), sampler.init_state(sample), []
  for k in range(len(sampler.timesteps)):
    x, state = sampler.step(state, outputs[k], x, k)
    samples.append(x)
  return np.stack(samples)


def _scan_loop(sampler, sample, outputs):
  def body(carry, xs):
    x, state = carry
    i, output = xs
    x, state = sampler.step(state, output, x, i)
    return (x, state), x

  @jax.jit
  def run(sample, outputs):
    init = (sample, sampler.init_state(sample))
    return jax.lax.scan(body, init, (jnp.arange(len(outputs)), outputs))[1]

  return np.asarray(run(jnp.asarray(sample), jnp.asarray(outputs)))


def _sampler(name: str, raw: dict, n: int):
  return schedulers.make_sampler(name, schedulers.SchedulerConfig.from_dict(raw), n)


@pytest.mark.parametrize("name,extra,n", PARITY_CASES)
def test_step_parity_with_diffusers(name, extra, n):
  raw = {**SD15, **extra}
  sample, outputs, timesteps, expected = _torch_loop(name, raw, n)
  sampler = _sampler(name, raw, n)
  np.testing.assert_array_equal(sampler.timesteps, timesteps)
  assert sampler.timesteps.dtype == np.int64
  got = _eager_loop(sampler, sample, outputs)
  assert got.shape == expected.shape
  for k in range(n):
    err = testutil.max_abs_err(got[k], expected[k])
    assert err <= _TOL, f"step {k} (t = {timesteps[k]}): max abs err {err}"


@pytest.mark.parametrize("name", ["dpm", "ddim"])
def test_scan_matches_eager(name):
  raw = {**SD15, "prediction_type": "v_prediction"}
  sample, outputs, _, expected = _torch_loop(name, raw, 12)
  sampler = _sampler(name, raw, 12)
  eager = _eager_loop(sampler, sample, outputs)
  scanned = _scan_loop(sampler, sample, outputs)
  assert testutil.max_abs_err(scanned, eager) <= 1e-6
  assert testutil.max_abs_err(scanned, expected) <= _TOL


def test_step_keeps_sample_dtype():
  sampler = _sampler("dpm", SD15, 5)
  sample = jnp.ones(_SHAPE, jnp.bfloat16)
  x, state = sampler.step(sampler.init_state(sample), sample, sample, 0)
  assert x.dtype == jnp.bfloat16
  assert state["prev_x0"].dtype == jnp.float32


@pytest.mark.parametrize("extra", [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist()},
])
def test_alphas_cumprod(extra):
  raw = {**SD15, **extra}
  expected = diffusers.DDPMScheduler.from_config(raw).alphas_cumprod.numpy()
  got = schedulers.alphas_cumprod(schedulers.SchedulerConfig.from_dict(raw))
  assert got.dtype == np.float32 and got.shape == (1000,)
  assert testutil.max_abs_err(got, expected) <= 1e-7


def test_add_noise_and_velocity():
  reference = diffusers.DDPMScheduler.from_config(SD15)
  acp = schedulers.alphas_cumprod(schedulers.SchedulerConfig.from_dict(SD15))
  rng = np.random.default_rng(1)
  x0, noise = (rng.standard_normal(_SHAPE, dtype=np.float32) for _ in range(2))
  t = np.array([3, 981])
  args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  noised = schedulers.add_noise(acp, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  v = schedulers.velocity(acp, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  assert testutil.max_abs_err(noised, reference.add_noise(*args).numpy()) <= 1e-6
  assert testutil.max_abs_err(v, reference.get_velocity(*args).numpy()) <= 1e-6


@pytest.mark.parametrize("cls", [diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler,
                                 diffusers.PNDMScheduler, diffusers.DDPMScheduler])
def test_configs_written_by_diffusers_parse(cls, tmp_path):
  cls().save_config(str(tmp_path))
  config = weights.load_scheduler_config(str(tmp_path))
  written = json.loads((tmp_path / schedulers.CONFIG_NAME).read_text())
  assert config.timestep_spacing == written["timestep_spacing"]
  assert config.prediction_type == "epsilon"


def test_missing_spacing_uses_each_class_default():
  config = schedulers.SchedulerConfig.from_dict(SD15)
  assert config.timestep_spacing is None
  assert schedulers.DDIM(config, 10).timestep_spacing == "leading"
  assert schedulers.DPMSolverMultistep(config, 10).timestep_spacing == "linspace"


@pytest.mark.parametrize("key,value", [
    ("not_a_field", 1),
    ("algorithm_type", "dpmsolver"),
    ("beta_schedule", "sigmoid"),
    ("prediction_type", "sample"),
    ("timestep_spacing", "karras"),
    ("solver_order", 3),
    ("use_karras_sigmas", True),
    ("rescale_betas_zero_snr", True),
    ("thresholding", True),
    ("variance_type", "learned_range"),
    ("trained_betas", [0.01, 0.02]),
])
def test_config_errors_name_the_field(key, value):
  with pytest.raises(ConfigError, match=f"my.json: .*'{key}'"):
    schedulers.SchedulerConfig.from_dict({**SD15, key: value}, source="my.json")


def test_missing_or_bad_config_file(tmp_path):
  with pytest.raises(ConfigError, match="scheduler_config.json"):
    weights.load_scheduler_config(str(tmp_path))
  (tmp_path / schedulers.CONFIG_NAME).write_text("{not json")
  with pytest.raises(ConfigError, match="scheduler_config.json: unreadable"):
    weights.load_scheduler_config(str(tmp_path))
  (tmp_path / schedulers.CONFIG_NAME).write_text(json.dumps(SD15))
  assert weights.load_scheduler_config(str(tmp_path)).steps_offset == 1


def test_bad_sampler_arguments():
  config = schedulers.SchedulerConfig.from_dict(SD15)
  with pytest.raises(ValueError, match="'euler'"):
    schedulers.make_sampler("euler", config, 10)
  with pytest.raises(ValueError, match="num_inference_steps"):
    schedulers.make_sampler("dpm", config, 0)
  # diffusers' float arange gives 62 trailing timesteps for 61 steps, the last one -1.
  trailing = schedulers.SchedulerConfig.from_dict({**SD15, "timestep_spacing": "trailing"})
  with pytest.raises(ValueError, match="outside"):
    schedulers.make_sampler("ddim", trailing, 61)
