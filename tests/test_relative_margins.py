"""The LiVO hinge with relative margins (`loss.margins = "relative"`, docs/method.md §4).

Each pair's gaps are divided by its own reference errors, held constant:
relu(gamma1 + relative_beta (theta_w - ref_w) / ref_w) + relu(gamma2 + relative_alpha
(ref_l - theta_l) / ref_l). Worked by hand here; equal to the absolute hinge with
beta = relative_beta / E, alpha = relative_alpha / E where every reference error is E; and
checked at the config's door.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livo_jax import losses
from livo_jax import schedulers
from livo_jax.errors import ConfigError
from livo_jax.train import outputs
from livo_jax.train import recipe
from livo_jax.train import step as train_step

RELATIVE = dict(relative_beta=100.0, relative_alpha=50.0, gamma1=1.0, gamma2=0.5)
# Pair 1: gap_w = 0.504 - 0.5 = 0.004, / 0.5 = 0.008; gap_l = 0.25 - 0.2 = 0.05, / 0.25 = 0.2.
# Pair 2: gap_w = 0.19 - 0.2 = -0.01, / 0.2 = -0.05; gap_l = 0.4 - 0.402 = -0.002, / 0.4 = -0.005.
WORKED = dict(theta_w=jnp.array([0.504, 0.19]), ref_w=jnp.array([0.5, 0.2]),
              theta_l=jnp.array([0.2, 0.402]), ref_l=jnp.array([0.25, 0.4]))


def random_errors(seed: int, batch: int, ref_w, ref_l) -> dict:
  """theta_* within a few percent of the given ref_* (scalars or [batch])."""
  rng = np.random.default_rng(seed)
  ref_w = np.broadcast_to(np.asarray(ref_w, np.float32), (batch,))
  ref_l = np.broadcast_to(np.asarray(ref_l, np.float32), (batch,))
  return dict(theta_w=jnp.asarray(ref_w * rng.uniform(0.97, 1.03, batch), jnp.float32),
              ref_w=jnp.asarray(ref_w), ref_l=jnp.asarray(ref_l),
              theta_l=jnp.asarray(ref_l * rng.uniform(0.97, 1.03, batch), jnp.float32))


def test_relative_hinge_worked_by_hand():
  # Pair 1: relu(1 + 100 * 0.008) = 1.8,  relu(0.5 + 50 * 0.2) = 10.5
  # Pair 2: relu(1 + 100 * -0.05) = 0,    relu(0.5 + 50 * -0.005) = 0.25
  loss, metrics = losses.relative_livo_loss(WORKED, **RELATIVE)
  assert float(loss) == pytest.approx((1.8 + 10.5 + 0 + 0.25) / 2, rel=1e-5)
  assert float(metrics["gap_w"]) == pytest.approx((0.004 - 0.01) / 2, rel=1e-4)
  assert float(metrics["gap_l"]) == pytest.approx((0.05 - 0.002) / 2, rel=1e-4)
  assert float(metrics["relative_gap_w"]) == pytest.approx((0.008 - 0.05) / 2, rel=1e-4)
  assert float(metrics["relative_gap_l"]) == pytest.approx((0.2 - 0.005) / 2, rel=1e-4)
  # The hinge arguments without margins: relative_beta * 0.008 = 0.8, * -0.05 = -5; ...
  assert float(metrics["beta_gap_w"]) == pytest.approx((0.8 - 5) / 2, rel=1e-4)
  assert float(metrics["alpha_gap_l"]) == pytest.approx((10 - 0.25) / 2, rel=1e-4)
  # The absolute hinge logs the relative gaps too.
  _, absolute = losses.livo_loss(WORKED, beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5)
  assert float(absolute["relative_gap_w"]) == pytest.approx((0.008 - 0.05) / 2, rel=1e-4)


def test_the_scale_is_a_constant():
  """d loss / d theta = slope / B on an active hinge, with slope = relative_beta / ref_w_i (or
  relative_alpha / ref_l_i); ref reaches the loss only through the gap, so d / d ref is minus
  that. Were the scale differentiated, d / d ref_w of pair 1 would be
  -(1/2) 100 * 0.504 / 0.5^2 = -100.8 instead of -100."""
  grads = jax.grad(lambda e: losses.relative_livo_loss(e, **RELATIVE)[0])(WORKED)
  # Pair 1's w-hinge is active: (1/2) 100 / 0.5 = 100; pair 2's is off. Both l-hinges are
  # active: -(1/2) 50 / 0.25 = -100 and -(1/2) 50 / 0.4 = -62.5.
  np.testing.assert_allclose(grads["theta_w"], [100.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(grads["ref_w"], [-100.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(grads["theta_l"], [-100.0, -62.5], rtol=1e-6)
  np.testing.assert_allclose(grads["ref_l"], [100.0, 62.5], rtol=1e-6)


@pytest.mark.parametrize("scale_w,scale_l", [(0.137, 0.137), (0.9, 0.35)])
def test_equal_reference_errors_give_the_absolute_hinge(scale_w, scale_l):
  """Where every ref_w is E_w and every ref_l is E_l, relative (beta_r, alpha_r) is absolute
  (beta_r / E_w, alpha_r / E_l): SD 1.5's recipe is relative (1000 E, 500 E). The scales are
  arbitrary values, not measured errors."""
  errors = random_errors(0, 16, scale_w, scale_l)
  relative = dict(relative_beta=1000.0 * scale_w, relative_alpha=500.0 * scale_l, gamma1=1.0,
                  gamma2=0.5)
  absolute = dict(beta=1000.0, alpha=500.0, gamma1=1.0, gamma2=0.5)
  (loss_r, metrics_r), grads_r = jax.value_and_grad(
      lambda e: losses.relative_livo_loss(e, **relative), has_aux=True)(errors)
  (loss_a, metrics_a), grads_a = jax.value_and_grad(
      lambda e: losses.livo_loss(e, **absolute), has_aux=True)(errors)
  assert 0 < float(loss_a) and float(loss_r) == pytest.approx(float(loss_a), rel=1e-6)
  assert metrics_r.keys() == metrics_a.keys()
  for key in metrics_a:
    assert float(metrics_r[key]) == pytest.approx(float(metrics_a[key]), rel=1e-5), key
  for key in grads_a:
    np.testing.assert_allclose(grads_r[key], grads_a[key], rtol=1e-5, err_msg=key)


def test_a_pair_loss_is_independent_of_its_batch():
  """Per-pair scales: the loss of a batch is the mean of its halves' (so micro-batches and
  devices need no shared scale), and a pair's own weight (min-SNR) divides out."""
  rng = np.random.default_rng(1)
  errors = random_errors(2, 8, rng.uniform(0.05, 1.0, 8), rng.uniform(0.05, 1.0, 8))
  whole, _ = losses.relative_livo_loss(errors, **RELATIVE)
  halves = [losses.relative_livo_loss({k: v[part] for k, v in errors.items()}, **RELATIVE)[0]
            for part in (slice(0, 4), slice(4, 8))]
  assert float(whole) == pytest.approx(float(np.mean(halves)), rel=1e-6)
  weights = jnp.asarray(rng.uniform(0.01, 5.0, 8), jnp.float32)
  weighted, _ = losses.relative_livo_loss({k: v * weights for k, v in errors.items()}, **RELATIVE)
  assert float(weighted) == pytest.approx(float(whole), rel=1e-5)


def test_margins_choose_the_objective():
  assert losses.objective("livo").loss is losses.livo_loss
  assert losses.objective("livo", "relative").loss is losses.relative_livo_loss
  assert losses.objective("livo", "relative").hyperparameters == (
      "relative_beta", "relative_alpha", "gamma1", "gamma2")
  assert losses.objective("livo", "relative").passes == losses.OBJECTIVES["livo"].passes
  config = recipe.sd15()
  assert config.loss.margins == "absolute"     # the published form stays the recipe's
  config.loss.margins = "relative"
  settings = train_step.step_settings(config, schedulers.SchedulerConfig())
  assert settings.margins == "relative"
  assert dict(settings.hyperparameters) == RELATIVE


@pytest.mark.parametrize("overrides,message", [
    ({"margins": "relatve"}, r"^loss.margins = 'relatve': expected one of \('absolute', "
                             r"'relative'\)$"),
    ({"margins": "relative", "name": "dpo"}, r"^loss.margins = 'relative': loss.name = 'dpo' "
                                             r"has no margins \(only \('livo',\)\)$"),
    ({"margins": "relative", "relative_beta": 0.0}, r"^loss.relative_beta = 0.0: must be > 0$"),
    ({"margins": "relative", "relative_alpha": -5.0},
     r"^loss.relative_alpha = -5.0: must be > 0$"),
    ({"margins": "relative", "relative_beta": float("nan")}, r"^loss.relative_beta = nan"),
    ({"margins": "relative", "snr_gamma": 5.0}, r"^loss.snr_gamma = 5.0: has no effect with "
                                                r"loss.margins = 'relative'"),
])
def test_config_errors_name_the_key(overrides, message):
  loss = recipe.sd15().loss
  loss.update(overrides)
  with pytest.raises(ConfigError, match=message) as raised:
    train_step.check_loss(loss)
  assert "\n" not in str(raised.value)


def test_absolute_margins_leave_the_relative_slopes_unread():
  loss = recipe.sd15().loss
  loss.update(relative_beta=0.0, snr_gamma=5.0)
  train_step.check_loss(loss)


@pytest.mark.parametrize("margins,line", [
    ("absolute", "- objective: livo (beta 1000, alpha 500, gamma1 1, gamma2 0.5)\n"),
    ("relative", "- objective: livo (relative_beta 100, relative_alpha 50, gamma1 1, "
                 "gamma2 0.5)\n"),
    (None, "- objective: livo (beta 1000, alpha 500, gamma1 1, gamma2 0.5)\n"),
])
def test_the_model_card_names_the_slopes_that_trained(margins, line):
  config = recipe.sd15().to_dict()
  if margins is None:                  # a record written before loss.margins existed
    del config["loss"]["margins"]
  else:
    config["loss"]["margins"] = margins
  record = dict(config=config, run=dict(livo_jax="0", id="run"),
                data=dict(values={"gender equality": 2}, aligned_images=2, scenes=1))
  assert line in outputs.model_card(record, 1, None)
