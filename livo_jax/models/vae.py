"""The Stable Diffusion VAE: a Flax NNX port of diffusers' `AutoencoderKL`.

Sub-module names mirror diffusers' (`encoder.down_blocks.0.resnets.1.conv1`, `quant_conv`, ...),
so the weights layer (`livo_jax.weights`) maps a diffusers state dict onto this model with no renaming. Activations
are NHWC: images [B, H, W, 3] in [-1, 1], latents [B, H/f, W/f, latent_channels] with
f = 2 ** (len(block_out_channels) - 1).

Latents here are always *unscaled*, as diffusers' `vae.encode` returns them and `vae.decode`
takes them. Diffusion models work on `latents * vae.scaling_factor`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from livo_jax.models import layers

_EPS = 1e-6  # every group norm of the VAE

# config.json keys with the only value we implement, and keys we ignore (`livo_jax.hf_config`).
# `shift_factor` and `latents_mean/std` change how latents are scaled for the diffusion model
# (SD3/Flux, Playground); the project applies `scaling_factor` only, so a config that needs them
# is refused rather than silently mis-scaled.
HF_FIXED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
# `force_upcast` is a pipeline hint for float16 runs; it does not change the math.
HF_IGNORED = ("force_upcast",)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' `AutoencoderKL` config.json that we implement.

  Defaults are diffusers' own, so that old configs which omit keys (SD 1.5's was written by
  diffusers 0.6.0) mean what they mean there.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # The training image size: no effect on the forward pass, kept for pipelines' defaults.
  sample_size: int = 32

  def validate(self) -> None:
    """Raises ValueError naming the field if the config describes a model we do not build."""
    def check(ok, field, why):
      if not ok:
        raise ValueError(f"field '{field}' = {getattr(self, field)!r} {why}")

    n = len(self.block_out_channels)
    check(n >= 1, "block_out_channels", "must name at least one block")
    for field, block_type in (("down_block_types", "DownEncoderBlock2D"),
                              ("up_block_types", "UpDecoderBlock2D")):
      value = getattr(self, field)
      check(all(t == block_type for t in value), field,
            f"is not supported (only {block_type!r} blocks are implemented)")
      check(len(value) == n, field,
            f"must have one entry per block_out_channels entry ({n})")
    check(self.layers_per_block >= 1, "layers_per_block", "must be at least 1")
    check(self.norm_num_groups > 0
          and all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
          "norm_num_groups", f"must divide every block_out_channels entry "
          f"{self.block_out_channels}")


def sample_latent(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
  """A draw from the diagonal Gaussian `encode` returns, given its standard-normal `noise`.

  The noise is an argument (not an rng) so that a training step can be replayed exactly against
  another implementation's draw.
  """
  return mean + jnp.exp(0.5 * logvar) * noise


class MidBlock(nnx.Module):
  """diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, [self-attention], resnet."""

  def __init__(self, channels: int, init: layers.Init, *, groups: int, add_attention: bool,
               attention_impl: str | None):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(channels, channels, init, temb_channels=None, groups=groups,
                             eps=_EPS)
        for _ in range(2)])
    # One head spanning all channels, with its own group norm and residual.
    self.attentions = nnx.List([
        layers.Attention(channels, 1, channels, init, qkv_bias=True, norm_groups=groups,
                         norm_eps=_EPS, attention_impl=attention_impl)
    ] if add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  """Resnets, then (except in the last block) a stride-2 conv padded bottom/right."""

  def __init__(self, in_channels: int, out_channels: int, init: layers.Init, *,
               num_layers: int, groups: int, add_downsample: bool):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, init,
                             temb_channels=None, groups=groups, eps=_EPS)
        for i in range(num_layers)])
    self.downsamplers = (nnx.List([layers.Downsample2D(out_channels, init, padding=0)])
                         if add_downsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """Resnets, then (except in the last block) nearest x2 upsampling and a conv."""

  def __init__(self, in_channels: int, out_channels: int, init: layers.Init, *,
               num_layers: int, groups: int, add_upsample: bool):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, init,
                             temb_channels=None, groups=groups, eps=_EPS)
        for i in range(num_layers)])
    self.upsamplers = (nnx.List([layers.Upsample2D(out_channels, init)])
                       if add_upsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  """Images [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""

  def __init__(self, config: VAEConfig, init: layers.Init, attention_impl: str | None):
    channels = config.block_out_channels
    groups = config.norm_num_groups
    self.conv_in = layers.conv(config.in_channels, channels[0], 3, init)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], init,
                           num_layers=config.layers_per_block, groups=groups,
                           add_downsample=i < len(channels) - 1)
        for i in range(len(channels))])
    self.mid_block = MidBlock(channels[-1], init, groups=groups,
                              add_attention=config.mid_block_add_attention,
                              attention_impl=attention_impl)
    self.conv_norm_out = layers.group_norm(channels[-1], groups, _EPS, init)
    self.conv_out = layers.conv(channels[-1], 2 * config.latent_channels, 3, init)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""

  def __init__(self, config: VAEConfig, init: layers.Init, attention_impl: str | None):
    channels = config.block_out_channels[::-1]  # the decoder walks the blocks backwards
    groups = config.norm_num_groups
    self.conv_in = layers.conv(config.latent_channels, channels[0], 3, init)
    self.mid_block = MidBlock(channels[0], init, groups=groups,
                              add_attention=config.mid_block_add_attention,
                              attention_impl=attention_impl)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], init,
                         num_layers=config.layers_per_block + 1, groups=groups,
                         add_upsample=i < len(channels) - 1)
        for i in range(len(channels))])
    self.conv_norm_out = layers.group_norm(channels[-1], groups, _EPS, init)
    self.conv_out = layers.conv(channels[-1], config.out_channels, 3, init)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """diffusers' `AutoencoderKL` (no tiling or slicing), NHWC.

  Outputs are in the compute `dtype`; group-norm statistics and the attention softmax are taken
  in float32 whatever it is.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str | None = None):
    """Builds the model with freshly initialised parameters.

    Args:
      config: the parsed config.json.
      rngs: initialisers' randomness (use `nnx.eval_shape` to build without any).
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
      attention_impl: the mid-block attention's implementation ("blocked", "cudnn", "xla";
        None: the platform's best, see `livo_jax.models.attention`).
    """
    self.config = config
    init = layers.Init(rngs, dtype, param_dtype)
    latent = config.latent_channels
    self.encoder = Encoder(config, init, attention_impl)
    self.decoder = Decoder(config, init, attention_impl)
    self.quant_conv = (layers.conv(2 * latent, 2 * latent, 1, init)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(latent, latent, 1, init)
                            if config.use_post_quant_conv else None)

  @property
  def scaling_factor(self) -> float:
    """What unscaled latents are multiplied by before the diffusion model sees them."""
    return self.config.scaling_factor

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior of images [B, H, W, in_channels] in [-1, 1].

    Returns:
      (mean, logvar), each [B, H/f, W/f, latent_channels], unscaled; logvar is clamped to
      [-30, 20] as in diffusers' `DiagonalGaussianDistribution`. `mean` is diffusers'
      `latent_dist.mode()`; `sample_latent(mean, logvar, noise)` draws from it.
    """
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def moments(self, images: jax.Array) -> jax.Array:
    """`encode`'s mean and logvar joined on the last axis: [B, h, w, 2 * latent_channels], the
    form the latent cache stores."""
    return jnp.concatenate(self.encode(images), axis=-1)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images [B, h*f, w*f, out_channels], roughly in [-1, 1] (not clipped).

    Args:
      latents: [B, h, w, latent_channels], *unscaled* (divide the diffusion model's latents by
        `scaling_factor` first), as diffusers' `vae.decode` takes them.
    """
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)
