"""The Flax UNet against diffusers' torch `UNet2DConditionModel` with the same weights."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

import testutil
from livo_jax.errors import ConfigError
from livo_jax import weights
from livo_jax.models.unet import UNet2DConditionModel, UNetConfig

# runwayml/stable-diffusion-v1-5 unet/config.json.
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-2-1 unet/config.json.
SD21_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

_TINY = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    norm_num_groups=8,
    sample_size=16,
)
# SD 1.x-shaped: int head count, 1x1-conv projections, two resnets per down block.
TINY_SD1 = dict(_TINY, attention_head_dim=4, cross_attention_dim=32, layers_per_block=2)
# SD 2.x-shaped: per-block head counts, linear projections, upcast attention; also a deeper
# transformer in one block, and the other sinusoid layout, shift and downsample padding.
TINY_SD2 = dict(_TINY, attention_head_dim=(2, 4, 4), cross_attention_dim=48, layers_per_block=1,
                use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=(1, 2, 1), flip_sin_to_cos=False, freq_shift=1,
                downsample_padding=0)

TIMESTEPS = np.array([999, 10])
RTOL = 1e-4  # max abs error / max abs torch output


class Pair:
  """A random torch UNet, its config as diffusers writes it, and Flax UNets with its weights."""

  def __init__(self, torch_kwargs, seed=0):
    self.torch_model = testutil.randomize(TorchUNet(**torch_kwargs), seed)
    self.config = weights.UNET.config_from_dict(json.loads(self.torch_model.to_json_string()))
    self.forward = testutil.jitted(self.flax_model())

  def flax_model(self, **kwargs):
    model = UNet2DConditionModel(self.config, rngs=nnx.Rngs(0), **kwargs)
    return testutil.copy_torch_weights(model, self.torch_model)

  def inputs(self, context_len, seed=1):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    context = rng.standard_normal((2, context_len, self.config.cross_attention_dim))
    return latents, TIMESTEPS, context.astype(np.float32)

  def torch_forward(self, latents, timesteps, context):
    with torch.no_grad():
      out = self.torch_model(torch.from_numpy(testutil.nhwc_to_nchw(latents)).contiguous(),
                             torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    return testutil.nchw_to_nhwc(out.numpy())


def relative_err(out, ref) -> float:
  return testutil.max_abs_err(out, ref) / float(np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def sd1():
  return Pair(TINY_SD1)


@pytest.fixture(scope="module")
def sd2():
  return Pair(TINY_SD2, seed=1)


@pytest.mark.parametrize("pair", ["sd1", "sd2"])
def test_matches_torch(pair, request):
  # Measured: sd1 1.6e-6, sd2 2.8e-6 of the output's scale (also with 78 tokens).
  pair = request.getfixturevalue(pair)
  inputs = pair.inputs(context_len=77)
  out = pair.forward(*inputs)
  ref = pair.torch_forward(*inputs)
  assert out.shape == ref.shape == (2, 16, 16, 4) and out.dtype == jnp.float32
  assert relative_err(out, ref) <= RTOL


def test_context_length_can_change(sd1):
  inputs = sd1.inputs(context_len=78, seed=2)
  assert relative_err(sd1.forward(*inputs), sd1.torch_forward(*inputs)) <= RTOL


def test_scalar_timestep_is_broadcast(sd2):
  latents, _, context = sd2.inputs(context_len=77)
  np.testing.assert_array_equal(sd2.forward(latents, np.int32(500), context),
                                sd2.forward(latents, np.array([500, 500]), context))


def test_latent_size_must_divide_by_the_downsampling(sd2):
  _, timesteps, context = sd2.inputs(context_len=7)
  with pytest.raises(ValueError, match="multiples of 4"):
    sd2.forward(np.zeros((2, 10, 16, 4), np.float32), timesteps, context)


@pytest.mark.parametrize("policy", ["dots", "blocks"])
def test_remat_changes_nothing(sd2, policy):
  latents, timesteps, context = sd2.inputs(context_len=7)
  cotangent = np.random.default_rng(3).standard_normal(latents.shape).astype(np.float32)

  def output_and_context_grad(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, context):
      def loss(context):
        out = nnx.merge(graphdef, state)(latents, timesteps, context)
        return jnp.sum(out * cotangent), out
      return jax.grad(loss, has_aux=True)(context)

    traced = run.trace(state, context)
    grad, out = traced.lower().compile()(state, context)
    return out, grad, str(traced.jaxpr)

  out, grad, jaxpr = output_and_context_grad(sd2.flax_model())
  out_remat, grad_remat, jaxpr_remat = output_and_context_grad(sd2.flax_model(remat=policy))
  assert "remat" in jaxpr_remat and "remat" not in jaxpr
  # Measured 1.7e-6 of their scale for outputs and gradients: inside the rematerialised blocks
  # XLA fuses the attention's einsums differently (float32 rounding, not a different formula).
  assert testutil.max_abs_err(out_remat, out) <= 5e-6 * np.max(np.abs(out))
  assert testutil.max_abs_err(grad_remat, grad) <= 5e-6 * np.max(np.abs(grad))
  assert np.max(np.abs(grad)) > 0


def test_bf16_compute_stays_close(sd1):
  model = sd1.flax_model(dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  inputs = sd1.inputs(context_len=77)
  out = testutil.jitted(model)(*inputs)
  assert out.dtype == jnp.float32
  # Measured: 2.0e-2 of the output's scale (2.2e-2 for the tiny SD2 config).
  assert relative_err(out, sd1.torch_forward(*inputs)) <= 5e-2


@pytest.mark.parametrize("raw, expected", [(SD15_UNET_CONFIG, 859_520_964),
                                           (SD21_UNET_CONFIG, 865_910_724)], ids=["sd15", "sd21"])
def test_full_size_parameter_count(raw, expected):
  with torch.device("meta"):  # diffusers' own count, without allocating weights
    torch_count = sum(p.numel() for p in TorchUNet.from_config(raw).parameters())
  model = nnx.eval_shape(lambda: UNet2DConditionModel(weights.UNET.config_from_dict(raw),
                                                      rngs=nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == torch_count == expected


def test_old_config_gets_diffusers_defaults():
  config = weights.UNET.config_from_dict(SD15_UNET_CONFIG)
  assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
  assert config.transformer_layers_per_block == 1
  assert not config.use_linear_projection and not config.upcast_attention


@pytest.mark.parametrize("field, value", [
    ("unknown_field", 1),
    ("class_embed_type", "timestep"),
    ("num_attention_heads", 8),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("block_out_channels", [320, 640, 1280]),
    ("attention_head_dim", [5, 10, 20]),
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("norm_num_groups", 48),
])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ConfigError, match=f"'{field}'"):
    weights.UNET.config_from_dict(dict(SD15_UNET_CONFIG, **{field: value}), source="unet/config.json")


def test_context_lengths_hide_padding_exactly(sd1):
  """A row padded by one token and given its true length equals the unpadded row, alone."""
  latents, timesteps, context = sd1.inputs(context_len=77, seed=3)
  junk = np.random.default_rng(4).standard_normal((2, 1, context.shape[-1]), np.float32)
  padded = np.concatenate([context, junk], axis=1)  # [2, 78, D]
  out = sd1.forward(latents, timesteps, padded, np.array([77, 78]))
  np.testing.assert_allclose(out[:1], sd1.forward(latents, timesteps, context)[:1], atol=1e-6)
  np.testing.assert_allclose(out[1:], sd1.forward(latents, timesteps, padded)[1:], atol=1e-6)
