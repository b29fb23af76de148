"""The Flax VAE against diffusers' torch `AutoencoderKL` with the same (random) weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from livo_jax.errors import ConfigError
from livo_jax import weights
from livo_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent

import testutil

# Three blocks (two down/up samplings) with the quant convs and the mid-block attention.
FULL = {"block_out_channels": [8, 16, 32], "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "scaling_factor": 0.5}
# Without the quant convs and the mid-block attention, as SD3/Flux-style VAEs are built.
BARE = {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 3,
        "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "use_quant_conv": False,
        "use_post_quant_conv": False, "mid_block_add_attention": False}

# The real SD 1.5 vae/config.json, as written by diffusers 0.6.0 (fewer keys than today's).
SD15 = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_PARAMS = 83_653_863


def random_torch_vae(raw, seed):
  return testutil.randomize(TorchAutoencoderKL(**raw), seed)


def flax_vae(raw, torch_model, **kwargs):
  """The Flax VAE built without initialisation, holding the torch model's weights."""
  config = weights.VAE.config_from_dict(raw)
  model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), **kwargs))
  return testutil.copy_torch_weights(model, torch_model)


def torch_outputs(model, images, latents):
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(testutil.nhwc_to_nchw(images))).latent_dist
    decoded = model.decode(torch.from_numpy(testutil.nhwc_to_nchw(latents))).sample
  return (testutil.nchw_to_nhwc(posterior.mean), testutil.nchw_to_nhwc(posterior.logvar),
          testutil.nchw_to_nhwc(decoded))


def inputs(raw, seed):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  f = 2 ** (len(raw["block_out_channels"]) - 1)
  latents = rng.normal(size=(2, 32 // f, 32 // f, raw["latent_channels"])).astype(np.float32)
  return images, latents


@pytest.fixture(scope="module")
def full():
  """(torch model, flax model, images, latents) for the FULL config."""
  torch_model = random_torch_vae(FULL, seed=0)
  return torch_model, flax_vae(FULL, torch_model), *inputs(FULL, seed=0)


def test_full_matches_diffusers(full):
  torch_model, model, images, latents = full
  mean_ref, logvar_ref, decoded_ref = torch_outputs(torch_model, images, latents)
  mean, logvar = testutil.jitted(model, "encode")(images)
  decoded = testutil.jitted(model, "decode")(latents)
  assert mean.shape == (2, 8, 8, 4) and decoded.shape == (2, 32, 32, 3)
  # Measured: mean 1.4e-6, logvar 2.0e-6, decoded 4.5e-6.
  assert testutil.max_abs_err(mean, mean_ref) <= 1e-4
  assert testutil.max_abs_err(logvar, logvar_ref) <= 1e-4
  assert testutil.max_abs_err(decoded, decoded_ref) <= 1e-4


def test_bare_matches_diffusers_and_clamps_logvar():
  torch_model = random_torch_vae(BARE, seed=1)
  assert torch_model.quant_conv is None and torch_model.post_quant_conv is None
  # Push two logvar channels far out, so that the [-30, 20] clamp is exercised.
  latent = BARE["latent_channels"]
  with torch.no_grad():
    torch_model.encoder.conv_out.bias[latent] += 100
    torch_model.encoder.conv_out.bias[latent + 1] -= 100
  model = flax_vae(BARE, torch_model)
  images, latents = inputs(BARE, seed=1)
  mean_ref, logvar_ref, decoded_ref = torch_outputs(torch_model, images, latents)
  mean, logvar = testutil.jitted(model, "encode")(images)
  decoded = testutil.jitted(model, "decode")(latents)
  np.testing.assert_array_equal(logvar[..., 0], 20.0)
  np.testing.assert_array_equal(logvar[..., 1], -30.0)
  # Measured: mean 6.0e-6, logvar 5.5e-6, decoded 4.5e-6.
  assert testutil.max_abs_err(mean, mean_ref) <= 1e-4
  assert testutil.max_abs_err(logvar, logvar_ref) <= 1e-4
  assert testutil.max_abs_err(decoded, decoded_ref) <= 1e-4


def test_bfloat16_compute_is_close_to_float32(full):
  torch_model, model, images, latents = full
  model16 = flax_vae(FULL, torch_model, dtype=jnp.bfloat16)
  # Measured, relative to the float32 outputs: mean abs error 2.9% / 2.9% / 2.9% (mean, logvar,
  # decoded), max abs error 4.0% / 3.4% / 3.6% of the max abs output. diffusers' own bf16 model is
  # as far from its float32 outputs (2.2% mean, 1.7-3.8% max): random weights amplify rounding.
  for method, x in (("encode", images), ("decode", latents)):
    ref = jax.tree.leaves(testutil.jitted(model, method)(x))
    out = jax.tree.leaves(testutil.jitted(model16, method)(x))
    for a, b in zip(out, ref):
      assert a.dtype == jnp.bfloat16
      error = np.abs(np.asarray(a, np.float32) - b)
      assert error.mean() <= 5e-2 * np.abs(b).mean()
      assert error.max() <= 1e-1 * np.abs(b).max()


def test_sample_latent_is_mean_plus_std_times_noise():
  mean = jnp.ones((4, 64, 64, 4))
  logvar = jnp.full_like(mean, np.log(4.0))  # std 2
  noise = jax.random.normal(jax.random.key(0), mean.shape)
  sample = np.asarray(sample_latent(mean, logvar, noise))
  np.testing.assert_allclose(sample, 1 + 2 * np.asarray(noise), rtol=1e-6)
  assert abs(sample.mean() - 1) < 0.05 and abs(sample.std() - 2) < 0.05


def test_scaling_factor_from_config():
  assert weights.VAE.config_from_dict(SD15).scaling_factor == 0.18215  # diffusers' default
  model = nnx.eval_shape(lambda: AutoencoderKL(weights.VAE.config_from_dict(FULL), rngs=nnx.Rngs(0)))
  assert model.scaling_factor == 0.5


def test_sd15_parameter_count():
  model = nnx.eval_shape(lambda: AutoencoderKL(weights.VAE.config_from_dict(SD15), rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == SD15_PARAMS
  with torch.device("meta"):  # shapes only, no memory
    reference = TorchAutoencoderKL(**{k: v for k, v in SD15.items() if not k.startswith("_")})
  assert sum(p.numel() for p in reference.parameters()) == SD15_PARAMS


@pytest.mark.parametrize("change, field", [
    ({"not_a_field": 1}, "not_a_field"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"shift_factor": 0.1159}, "shift_factor"),
    ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"norm_num_groups": 24}, "norm_num_groups"),
])
def test_config_errors_name_the_field(change, field):
  with pytest.raises(ConfigError, match=f"'{field}'"):
    weights.VAE.config_from_dict({**SD15, **change}, source="vae/config.json")
