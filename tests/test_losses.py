"""The objectives and the four UNet passes against the original algorithm in torch.

Same tiny SD weights, batch, posterior draws, noise and timesteps on both sides: the four
per-sample errors and the livo / dpo losses must agree to 1e-5, and the value encoder's gradient
too (the frozen nets get none in torch; in JAX they are not differentiated at all).

Both sides compute in float64 here. The hinge multiplies error differences by beta = 1000, so
float32 rounding of the errors (~1e-7 of ~1) alone moves the loss by ~1e-4 relative: a 1e-5
bound on the loss is a float64 comparison. (The float32 path is the one the other trainer tests
run.)
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_livo
from livo_jax import conditioning
from livo_jax import losses
from livo_jax import schedulers
from livo_jax import weights
from livo_jax.train import setup
from livo_jax.train import step as train_step
from livo_jax.weights import load_clip_text, load_unet, load_vae
from train_fixtures import load_config

BATCH = 3
PROMPTS = ["a red circle", "a square", "a blue triangle, small"]
VALUES = ["red considered inappropriate", "color equality", "no blue"]
HINGE = dict(beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5)
PASSES = ("theta_w", "theta_l", "ref_w", "ref_l")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def models(sd_folder):
  """The tiny SD and value encoder in float64."""
  with jax.enable_x64(True):
    f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
    config = setup.load_models(load_config(sd_folder))
    return dataclasses.replace(
        config,
        text_encoder=load_clip_text(os.path.join(sd_folder, "text_encoder"), **f64),
        unet=load_unet(os.path.join(sd_folder, "unet"), **f64),
        vae=load_vae(os.path.join(sd_folder, "vae"), **f64),
        value_encoder=load_clip_text(os.path.join(sd_folder, "text_encoder"), **f64))


@pytest.fixture(scope="module")
def inputs(models):
  rng = np.random.default_rng(7)
  batch = dict(
      pixels_w=rng.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32),
      pixels_l=rng.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32),
      prompt_ids=conditioning.tokenize(models.tokenizer, PROMPTS),
      value_ids=conditioning.tokenize(
          models.tokenizer, [conditioning.value_prompt(v, p) for v, p in zip(VALUES, PROMPTS)]))
  draws = torch_livo.random_draws(rng, BATCH, (8, 8, 4), 1000)
  # Spread the timesteps over the schedule: low t makes the eps error small, high t large.
  draws["timesteps"] = np.array([17, 480, 960])
  return batch, draws


def settings(prediction_type="epsilon", snr_gamma=0.0, merge_passes=True):
  return train_step.StepSettings(
      objective="livo", hyperparameters=(), prediction_type=prediction_type,
      snr_gamma=snr_gamma, noise_offset=0.0, input_perturbation=0.0, grad_accum_steps=1,
      merge_passes=merge_passes)


def jax_errors(models, batch, draws, step_settings, params=None):
  """The four per-sample errors as the train step computes them, from the given draws."""
  value_graphdef, value_params = nnx.split(models.value_encoder)
  draws = dict(draws, noised_with=draws["noise"])
  acp = schedulers.alphas_cumprod(models.scheduler_config)

  def errors(params, batch, draws):
    z_w, z_l = train_step.latents(models.vae, batch, draws)
    text = train_step.prompt_states(models.text_encoder, batch)
    return train_step.preference_errors(nnx.merge(value_graphdef, params), models.unet, z_w,
                                        z_l, text, batch["value_ids"], draws, acp,
                                        step_settings, PASSES)

  return errors, (value_params if params is None else params), batch, draws


@functools.lru_cache(maxsize=None)
def torch_model(folder: str, **kwargs):
  return torch_livo.OriginalLiVO(folder, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("prediction_type,snr_gamma", [("epsilon", 0.0), ("v_prediction", 0.0),
                                                       ("epsilon", 5.0)])
def test_errors_and_losses_match_torch(models, inputs, sd_folder, prediction_type, snr_gamma):
  batch, draws = inputs
  fn, params, jbatch, jdraws = jax_errors(models, batch, draws,
                                          settings(prediction_type, snr_gamma))
  ours = {k: np.asarray(v) for k, v in jax.jit(fn)(params, jbatch, jdraws).items()}
  reference = torch_model(sd_folder, prediction_type=prediction_type,
                          snr_gamma=snr_gamma or None)
  with torch.no_grad():
    theirs = {k: v.numpy() for k, v in reference.errors(**batch, **draws).items()}
  for name in PASSES:
    assert rel_err(ours[name], theirs[name]) <= 1e-5, name
  # The value token changes the prediction, so theta and ref really differ.
  assert np.all(np.abs(ours["theta_w"] - ours["ref_w"]) > 0)

  livo, _ = losses.livo_loss(ours, **HINGE)
  assert rel_err(livo, torch_livo.livo_hinge(
      *(torch.tensor(theirs[k]) for k in ("theta_w", "theta_l", "ref_w", "ref_l")),
      **HINGE)) <= 1e-5
  for beta_dpo in (5000.0, 50.0):
    dpo, _ = losses.dpo_loss(ours, beta_dpo=beta_dpo)
    expected = torch_livo.dpo_loss(
        *(torch.tensor(theirs[k]) for k in ("theta_w", "theta_l", "ref_w", "ref_l")), beta_dpo)
    assert rel_err(dpo, expected) <= 1e-5


def test_merged_passes_equal_separate_calls(models, inputs):
  batch, draws = inputs
  merged = jax.jit(jax_errors(models, batch, draws, settings())[0])
  fn, params, jbatch, jdraws = jax_errors(models, batch, draws, settings(merge_passes=False))
  separate = jax.jit(fn)(params, jbatch, jdraws)
  for name, value in merged(params, jbatch, jdraws).items():
    np.testing.assert_allclose(value, separate[name], rtol=1e-6, atol=0)


def test_value_encoder_gradient_matches_torch(models, inputs, sd_folder):
  batch, draws = inputs
  fn, params, jbatch, jdraws = jax_errors(models, batch, draws, settings())
  grads = jax.jit(jax.grad(lambda p: losses.livo_loss(fn(p, jbatch, jdraws), **HINGE)[0]))(params)
  grad_model = nnx.merge(nnx.graphdef(models.value_encoder), grads)
  ours = weights.layout.torch_state_dict(grad_model)

  reference = torch_model(sd_folder)
  reference.value_encoder.zero_grad(set_to_none=True)
  reference.errors(**batch, **draws)["loss"].backward()
  theirs = {name.removeprefix("text_model."): p.grad.numpy()
            for name, p in reference.value_encoder.named_parameters()}
  assert set(ours) == set(theirs)
  ours_flat = np.concatenate([ours[k].ravel() for k in sorted(ours)])
  theirs_flat = np.concatenate([theirs[k].ravel() for k in sorted(ours)])
  assert np.linalg.norm(theirs_flat) > 0
  assert rel_err(ours_flat, theirs_flat) <= 1e-5
  # The original computes no gradient for any frozen weight.
  for net in (reference.unet, reference.vae, reference.text_encoder):
    assert all(p.grad is None for p in net.parameters())


def test_hinge_worked_by_hand():
  errors = dict(theta_w=jnp.array([1.000, 2.000]), ref_w=jnp.array([1.002, 1.999]),
                theta_l=jnp.array([3.0, 0.5]), ref_l=jnp.array([3.0005, 0.4]))
  # Pair 1: relu(1 + 1000 * -0.002) = 0, relu(0.5 + 500 * 0.0005) = 0.75
  # Pair 2: relu(1 + 1000 * 0.001) = 2,  relu(0.5 + 500 * -0.1) = 0
  loss, metrics = losses.livo_loss(errors, **HINGE)
  assert float(loss) == pytest.approx((0.75 + 2.0) / 2, rel=1e-5)
  assert float(metrics["gap_w"]) == pytest.approx((-0.002 + 0.001) / 2, rel=1e-4)
  assert float(metrics["gap_l"]) == pytest.approx((0.0005 - 0.1) / 2, rel=1e-4)
  # DPO: margin = (theta_w - theta_l) - (ref_w - ref_l)
  margin = np.array([(1.0 - 3.0) - (1.002 - 3.0005), (2.0 - 0.5) - (1.999 - 0.4)])
  dpo, _ = losses.dpo_loss(errors, beta_dpo=100.0)
  assert float(dpo) == pytest.approx(np.mean(np.log1p(np.exp(0.5 * 100.0 * margin))), rel=1e-5)
  sft, _ = losses.sft_loss(errors)
  assert float(sft) == pytest.approx(1.5)


def test_min_snr_weights_formula():
  config = schedulers.SchedulerConfig(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear")
  acp = schedulers.alphas_cumprod(config)
  t = np.array([0, 100, 500, 999])
  snr = acp[t].astype(np.float64) / (1 - acp[t])
  np.testing.assert_allclose(losses.min_snr_weights(acp, t, 5.0, "epsilon"),
                             np.minimum(snr, 5) / snr, rtol=1e-5)
  np.testing.assert_allclose(losses.min_snr_weights(acp, t, 5.0, "v_prediction"),
                             np.minimum(snr, 5) / (snr + 1), rtol=1e-5)


def test_v_target_is_velocity():
  acp = np.array([0.25, 0.64], np.float32)
  z, eps = np.ones((2, 1, 1, 1), np.float32), np.full((2, 1, 1, 1), 2.0, np.float32)
  v = losses.prediction_target("v_prediction", acp, z, eps, np.array([0, 1]))
  # sqrt(acp) * eps - sqrt(1 - acp) * z
  np.testing.assert_allclose(np.ravel(v), [0.5 * 2 - np.sqrt(0.75), 0.8 * 2 - 0.6], rtol=1e-6)
  assert losses.prediction_target("epsilon", acp, z, eps, np.array([0, 1])) is eps
  with pytest.raises(ValueError, match="sample"):
    losses.prediction_target("sample", acp, z, eps, np.array([0, 1]))
