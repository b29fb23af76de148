"""The torch reference of the original LiVO algorithm (torch_livo) against numpy recomputations.

It is the yardstick of the JAX trainer, so it is checked on its own: the losses and min-SNR
weights against numpy formulas, the four errors against the MSE of separately run UNets, and a
step against what it must and must not change.
"""

import numpy as np
import pytest
import torch

import testutil
import tiny_sd
import torch_livo

PROMPTS = ["a photo of a doctor", "a nurse"]
VALUES = ["gender equality", "racial equality"]
IMAGE_SIZE = 32  # the tiny VAE halves it: 16x16x4 latents


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """(folder, torch pipeline) of a tiny random SD."""
  folder = str(tmp_path_factory.mktemp("sd"))
  return folder, tiny_sd.make_sd_folder(folder, seed=0, std=0.1)


@pytest.fixture(scope="module")
def inputs(sd):
  """(batch, draws) for two samples."""
  _, pipe = sd
  ids = lambda texts: pipe.tokenizer(texts, padding="max_length", max_length=77,
                                     truncation=True, return_tensors="np").input_ids
  rng = np.random.default_rng(0)
  pixels = lambda: rng.uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  batch = {"pixels_w": pixels(), "pixels_l": pixels(), "prompt_ids": ids(PROMPTS),
           "value_ids": ids([f"{v}, {p}" for v, p in zip(VALUES, PROMPTS)])}
  latent_shape = (IMAGE_SIZE // 2, IMAGE_SIZE // 2, 4)
  return batch, torch_livo.random_draws(rng, 2, latent_shape, 1000)


def random_errors(seed):
  """Four per-sample error vectors close enough for both hinge terms to switch on and off."""
  rng = np.random.default_rng(seed)
  theta_w, theta_l, ref_w, ref_l = (0.5 + 2e-3 * rng.standard_normal(64) for _ in range(4))
  return theta_w, theta_l, ref_w, ref_l


def sd15_alphas_cumprod():
  """DDPM's scaled-linear schedule of SD 1.5 (betas 0.00085 to 0.012 over 1000 steps)."""
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def snapshot(module) -> dict[str, np.ndarray]:
  """A copy of a torch module's state (`.numpy()` alone would follow later updates)."""
  return {k: v.copy() for k, v in testutil.torch_numpy_state(module).items()}


def as_torch(*arrays):
  return [torch.from_numpy(np.asarray(a)) for a in arrays]


def test_livo_hinge_matches_numpy():
  theta_w, theta_l, ref_w, ref_l = random_errors(0)
  expected = np.mean(np.maximum(0.0, 1.0 + 1000 * (theta_w - ref_w))
                     + np.maximum(0.0, 0.5 + 500 * (ref_l - theta_l)))
  got = torch_livo.livo_hinge(*as_torch(theta_w, theta_l, ref_w, ref_l), beta=1000,
                              alpha=500, gamma1=1.0, gamma2=0.5)
  # Both terms are active on some samples and not on others, so the relus are exercised.
  for term in (1.0 + 1000 * (theta_w - ref_w), 0.5 + 500 * (ref_l - theta_l)):
    assert (term > 0).any() and (term < 0).any()
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_dpo_loss_matches_numpy():
  theta_w, theta_l, ref_w, ref_l = random_errors(1)
  inside = -0.5 * 5000 * ((theta_w - theta_l) - (ref_w - ref_l))
  expected = np.mean(np.logaddexp(0.0, -inside))  # -log(sigmoid(x)) = log(1 + exp(-x))
  got = torch_livo.dpo_loss(*as_torch(theta_w, theta_l, ref_w, ref_l), beta_dpo=5000)
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_sft_loss_is_the_mean_aligned_error():
  theta_w = random_errors(2)[0]
  np.testing.assert_allclose(torch_livo.sft_loss(*as_torch(theta_w)).numpy(), theta_w.mean(),
                             rtol=1e-12)


@pytest.mark.parametrize("prediction_type,denominator", [("epsilon", lambda snr: snr),
                                                         ("v_prediction", lambda snr: snr + 1)])
def test_min_snr_weights_match_numpy(prediction_type, denominator):
  acp = sd15_alphas_cumprod()
  timesteps = np.array([0, 10, 100, 400, 999])
  snr = acp[timesteps] / (1 - acp[timesteps])
  expected = np.minimum(snr, 5.0) / denominator(snr)
  got = torch_livo.min_snr_weights(*as_torch(acp, timesteps), 5.0, prediction_type)
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
  # Low noise (small t, huge snr) is down-weighted; high noise keeps weight ~1 (epsilon).
  assert got[0] < 0.01 and (prediction_type != "epsilon" or got[-1] == 1.0)


def test_random_draws():
  draws = torch_livo.random_draws(np.random.default_rng(0), 3, (8, 6, 4), 1000)
  for name in ("latent_noise_w", "latent_noise_l", "noise"):
    assert draws[name].shape == (3, 8, 6, 4) and draws[name].dtype == np.float32
  assert not np.array_equal(draws["latent_noise_w"], draws["latent_noise_l"])
  assert draws["timesteps"].shape == (3,) and draws["timesteps"].dtype == np.int64
  big = torch_livo.random_draws(np.random.default_rng(1), 5000, (1, 1, 1), 1000)["timesteps"]
  assert big.min() == 0 and big.max() == 999


def test_value_encoder_starts_as_the_text_encoder(sd, tmp_path):
  folder, pipe = sd
  text_state = testutil.torch_numpy_state(pipe.text_encoder)
  model = torch_livo.OriginalLiVO(folder)
  assert model.value_encoder is not model.text_encoder
  assert model.value_encoder_state().keys() == text_state.keys()
  for name, value in model.value_encoder_state().items():
    np.testing.assert_array_equal(value, text_state[name], err_msg=name)
  # A given value encoder folder replaces that start.
  other = tiny_sd.make_component("text_encoder", str(tmp_path / "value_encoder"), seed=7)
  model = torch_livo.OriginalLiVO(folder, str(tmp_path / "value_encoder"))
  for name, value in testutil.torch_numpy_state(other).items():
    np.testing.assert_array_equal(model.value_encoder_state()[name], value, err_msg=name)
  assert model.prediction_type == "epsilon" and model.num_train_timesteps == 1000
  np.testing.assert_allclose(model.alphas_cumprod.numpy(), sd15_alphas_cumprod(), rtol=1e-5)


def numpy_errors(pipe, batch, draws, prediction_type):
  """The four per-sample MSEs of section 4, in numpy around separately run torch models."""
  acp = sd15_alphas_cumprod()[draws["timesteps"]][:, None, None, None]
  eps = draws["noise"].astype(np.float64)
  with torch.no_grad():
    text = pipe.text_encoder(torch.from_numpy(batch["prompt_ids"]))[0].numpy()
    # The value encoder starts as the text encoder: its pooled output is the text encoder's.
    value = pipe.text_encoder(torch.from_numpy(batch["value_ids"]))[1].numpy()
  contexts = {"theta": np.concatenate([value[:, None], text], axis=1), "ref": text}
  assert contexts["theta"].shape[1] == 78
  errors = {}
  for side in ("w", "l"):
    with torch.no_grad():
      posterior = pipe.vae.encode(
          torch.from_numpy(testutil.nhwc_to_nchw(batch[f"pixels_{side}"]))).latent_dist
    mean, logvar = (testutil.nchw_to_nhwc(x) for x in (posterior.mean, posterior.logvar))
    z = (mean + np.exp(0.5 * logvar) * draws[f"latent_noise_{side}"]) * 0.18215
    noisy = np.sqrt(acp) * z + np.sqrt(1 - acp) * eps
    target = eps if prediction_type == "epsilon" else np.sqrt(acp) * eps - np.sqrt(1 - acp) * z
    for kind, context in contexts.items():
      with torch.no_grad():
        prediction = pipe.unet(
            torch.from_numpy(testutil.nhwc_to_nchw(noisy).astype(np.float32)),
            torch.from_numpy(draws["timesteps"]), torch.from_numpy(context)).sample.numpy()
      errors[f"{kind}_{side}"] = np.mean(
          (testutil.nchw_to_nhwc(prediction) - target) ** 2, axis=(1, 2, 3))
  return errors


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_errors_match_a_numpy_recomputation(sd, inputs, prediction_type):
  folder, pipe = sd
  batch, draws = inputs
  model = torch_livo.OriginalLiVO(folder, prediction_type=prediction_type)
  got = model.errors(**batch, **draws)
  expected = numpy_errors(pipe, batch, draws, prediction_type)
  for name, value in expected.items():
    assert got[name].shape == (2,) and got[name].dtype == torch.float32
    np.testing.assert_allclose(got[name].detach().numpy(), value, rtol=2e-5, err_msg=name)
  assert got["theta_w"].requires_grad and not got["ref_w"].requires_grad
  hinge = np.mean(np.maximum(0, 1 + 1000 * (expected["theta_w"] - expected["ref_w"]))
                  + np.maximum(0, 0.5 + 500 * (expected["ref_l"] - expected["theta_l"])))
  np.testing.assert_allclose(got["loss"].detach().numpy(), hinge, rtol=1e-3)


def test_min_snr_weights_multiply_all_four_errors(sd, inputs):
  folder, _ = sd
  batch, draws = inputs
  plain = torch_livo.OriginalLiVO(folder).errors(**batch, **draws)
  weighted = torch_livo.OriginalLiVO(folder, snr_gamma=5.0).errors(**batch, **draws)
  acp = sd15_alphas_cumprod()[draws["timesteps"]]
  weights = np.minimum(acp / (1 - acp), 5.0) / (acp / (1 - acp))
  for name in ("theta_w", "theta_l", "ref_w", "ref_l"):
    np.testing.assert_allclose(weighted[name].detach().numpy(),
                               plain[name].detach().numpy() * weights, rtol=1e-5)


@pytest.mark.parametrize("objective", ["livo", "dpo", "sft"])
def test_step_trains_only_the_value_encoder(sd, inputs, objective):
  folder, _ = sd
  batch, draws = inputs
  model = torch_livo.OriginalLiVO(folder, objective=objective, weight_decay=0.0)
  frozen = {name: snapshot(getattr(model, name))
            for name in ("unet", "vae", "text_encoder")}
  before = model.value_encoder_state()

  # The step's metrics and pre-clip norm are those of the errors at the current weights.
  errors = model.errors(**batch, **draws)
  errors["loss"].backward()
  norm = np.sqrt(sum(float((p.grad ** 2).sum()) for p in model.value_encoder.parameters()
                     if p.grad is not None))
  metrics = model.step(batch, draws)
  assert metrics.keys() == {"loss", "loss_theta_w", "loss_ref_w", "loss_theta_l", "loss_ref_l",
                            "grad_norm"}
  np.testing.assert_allclose(metrics["loss"], errors["loss"].item(), rtol=1e-6)
  for name in ("theta_w", "ref_w", "theta_l", "ref_l"):
    np.testing.assert_allclose(metrics[f"loss_{name}"], errors[name].mean().item(), rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
  assert norm > 0

  for name, state in frozen.items():
    for key, value in testutil.torch_numpy_state(getattr(model, name)).items():
      np.testing.assert_array_equal(value, state[key], err_msg=f"{name}.{key}")
  after = model.value_encoder_state()
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  # Without weight decay only parameters with a gradient move; the pooled token reads them all.
  assert "final_layer_norm.weight" in changed
  assert "encoder.layers.0.self_attn.q_proj.weight" in changed


def test_steps_lower_the_loss_on_a_fixed_batch(sd, inputs):
  folder, _ = sd
  batch, draws = inputs
  model = torch_livo.OriginalLiVO(folder, lr=1e-3)
  metrics = [model.step(batch, draws) for _ in range(8)]
  assert metrics[-1]["loss"] < 0.75 * metrics[0]["loss"], [m["loss"] for m in metrics]
  # The value token lowers the error on the aligned images below the reference's.
  assert metrics[-1]["loss_theta_w"] < metrics[-1]["loss_ref_w"]


def test_benchmark_options(sd, inputs):
  """Checkpointing changes nothing; eager attention and bf16 autocast only round differently."""
  folder, _ = sd
  batch, draws = inputs
  base = torch_livo.OriginalLiVO(folder)
  expected = base.step(batch, draws)
  checkpointed = torch_livo.OriginalLiVO(folder, gradient_checkpointing=True)
  assert checkpointed.step(batch, draws) == pytest.approx(expected, rel=1e-5)
  for name, value in base.value_encoder_state().items():
    np.testing.assert_allclose(checkpointed.value_encoder_state()[name], value, atol=1e-7)
  eager = torch_livo.OriginalLiVO(folder, attention="eager").step(batch, draws)
  assert eager == pytest.approx(expected, rel=1e-4)
  autocast = torch_livo.OriginalLiVO(folder, autocast_dtype=torch.bfloat16).step(batch, draws)
  for name in ("loss_theta_w", "loss_ref_w", "loss_theta_l", "loss_ref_l"):
    assert autocast[name] == pytest.approx(expected[name], rel=5e-2)
