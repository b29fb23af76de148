"""diffusers' `UNet2DConditionModel` in Flax NNX, for Stable Diffusion 1.x and 2.x.

Sub-module names mirror diffusers' so that the weights layer's one parameter rule (`livo_jax.weights`) maps every
parameter, e.g. flax `down_blocks/0/attentions/1/transformer_blocks/0/attn2/to_k/kernel` is torch
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`.

Supported: `CrossAttnDownBlock2D` / `DownBlock2D` down blocks, `UNetMidBlock2DCrossAttn`,
`CrossAttnUpBlock2D` / `UpBlock2D` up blocks, sinusoidal ("positional") time embedding, no
class/addition embeddings. Anything else in a config is refused when it is read (`HF_FIXED`, `UNetConfig.validate`).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from livo_jax.models import layers

_DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# config.json keys diffusers writes whose only value we implement (read by the weights layer's
# strict config reader, `livo_jax.hf_config`).
HF_FIXED = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "mid_block_scale_factor": 1,
    # diffusers itself raises on any other value (its `attention_head_dim` is the head count).
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
}

# Keys that do not change the forward pass of the models we build.
HF_IGNORED = (
    "dropout",                         # the UNet runs in inference mode
    "addition_embed_type_num_heads",   # only read when `addition_embed_type` is set
    "mid_block_only_cross_attention",  # only read by `UNetMidBlock2DSimpleCrossAttn`
)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The `config.json` fields of diffusers' `UNet2DConditionModel` that we implement.

  Defaults are diffusers' own, since old configs (SD 1.x) omit many keys. Per-block fields take an
  int (same for every block) or one entry per down block.
  """
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  # The NUMBER OF HEADS per block, despite its name (diffusers' historical naming; the head
  # width is `block_out_channels[i] // attention_head_dim[i]`).
  attention_head_dim: int | tuple[int, ...] = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False
  # The training latent size: no effect on the forward pass (any size works), kept because
  # pipelines derive their default image size from it.
  sample_size: int | None = None

  def validate(self) -> None:
    """Raises ValueError naming the first field whose value we do not implement."""
    def fail(field, why):
      raise ValueError(f"field '{field}' = {getattr(self, field)!r} {why}")

    n = len(self.down_block_types)
    for field, supported in (("down_block_types", _DOWN_BLOCK_TYPES),
                             ("up_block_types", _UP_BLOCK_TYPES)):
      unsupported = [t for t in getattr(self, field) if t not in supported]
      if unsupported:
        fail(field, f"has unsupported block type(s) {unsupported} (supported: {supported})")
    if self.mid_block_type not in _MID_BLOCK_TYPES:
      fail("mid_block_type", f"is not supported (supported: {_MID_BLOCK_TYPES})")
    for field in ("up_block_types", "block_out_channels"):
      if len(getattr(self, field)) != n:
        fail(field, f"must have one entry per down block ({n})")
    for field in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      value = getattr(self, field)
      values = value if isinstance(value, tuple) else (value,)
      if isinstance(value, tuple) and len(value) != n:
        fail(field, f"must be an int or have one entry per down block ({n})")
      if not all(_is_positive_int(v) for v in values):
        fail(field, "must hold positive integers")
    if not _is_positive_int(self.cross_attention_dim):
      fail("cross_attention_dim", "must be a positive integer (per-block values are not supported)")
    if not _is_positive_int(self.norm_num_groups) or any(
        c % self.norm_num_groups for c in self.block_out_channels):
      fail("norm_num_groups", f"must divide every block_out_channels {self.block_out_channels}")

  def per_block(self, field: str) -> tuple[int, ...]:
    """A per-block field as one value per down block."""
    value = getattr(self, field)
    return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000):
  """diffusers' `get_timestep_embedding`: [B] (int or float) -> [B, dim] float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))  # an odd `dim` gets a zero last column


class TimestepEmbedding(nnx.Module):
  """diffusers' `TimestepEmbedding`: linear, SiLU, linear."""

  def __init__(self, in_features: int, features: int, init: layers.Init):
    self.linear_1 = layers.linear(in_features, features, init)
    self.linear_2 = layers.linear(features, features, init)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
  """A linear projection to twice the width, one half gating the other through exact GELU."""

  def __init__(self, in_features: int, features: int, init: layers.Init):
    self.proj = layers.linear(in_features, 2 * features, init)

  def __call__(self, x):
    x, gate = jnp.split(self.proj(x), 2, axis=-1)
    return x * jax.nn.gelu(gate, approximate=False)


def _dropout(x):
  """torch's `ff.net.1` (a Dropout, no parameters): the identity in inference mode."""
  return x


class FeedForward(nnx.Module):
  """diffusers' `FeedForward` with GEGLU: `net` = [GEGLU, dropout, linear], as in torch."""

  def __init__(self, dim: int, init: layers.Init, *, mult: int = 4):
    self.net = nnx.List([GEGLU(dim, dim * mult, init), _dropout,
                         layers.linear(dim * mult, dim, init)])

  def __call__(self, x):
    for layer in self.net:
      x = layer(x)
    return x


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, cross-attention on the context, and a GEGLU feed-forward."""

  def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int,
               init: layers.Init, *, upcast: bool, attention_impl: str | None):
    attention = dict(upcast=upcast, attention_impl=attention_impl)
    self.norm1 = layers.layer_norm(dim, 1e-5, init)
    self.attn1 = layers.Attention(dim, heads, head_dim, init, **attention)
    self.norm2 = layers.layer_norm(dim, 1e-5, init)
    self.attn2 = layers.Attention(dim, heads, head_dim, init,
                                  cross_attention_dim=cross_attention_dim, **attention)
    self.norm3 = layers.layer_norm(dim, 1e-5, init)
    self.ff = FeedForward(dim, init)

  def __call__(self, x, context, context_lengths):  # x [B, T, D], context [B, L, Dc]
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context, context_lengths)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """diffusers' `Transformer2DModel` over a feature map: group norm, projection in, transformer
  blocks over the H*W tokens, projection out, residual.

  The projections are 1x1 convolutions, or linear layers with `use_linear_projection`; on NHWC
  inputs both act on the channel axis, so the forward pass is the same code.
  """

  def __init__(self, channels: int, heads: int, num_layers: int, config: UNetConfig,
               init: layers.Init, *, attention_impl: str | None):
    head_dim = channels // heads
    inner = heads * head_dim
    project = ((lambda i, o: layers.linear(i, o, init)) if config.use_linear_projection
               else (lambda i, o: layers.conv(i, o, 1, init)))
    self.norm = layers.group_norm(channels, config.norm_num_groups, 1e-6, init)
    self.proj_in = project(channels, inner)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, head_dim, config.cross_attention_dim, init,
                              upcast=config.upcast_attention, attention_impl=attention_impl)
        for _ in range(num_layers)])
    self.proj_out = project(inner, channels)

  def __call__(self, x, context, context_lengths):  # x [B, H, W, C]
    b, h, w, _ = x.shape
    tokens = self.proj_in(self.norm(x))
    tokens = tokens.reshape(b, h * w, tokens.shape[-1])
    for block in self.transformer_blocks:
      tokens = block(tokens, context, context_lengths)
    return self.proj_out(tokens.reshape(b, h, w, -1)) + x


def _resnet(in_channels: int, out_channels: int, temb_channels: int, config: UNetConfig,
            init: layers.Init) -> layers.ResnetBlock2D:
  return layers.ResnetBlock2D(in_channels, out_channels, init, temb_channels=temb_channels,
                              groups=config.norm_num_groups, eps=config.norm_eps)


class DownBlock(nnx.Module):
  """diffusers' `DownBlock2D`, or `CrossAttnDownBlock2D` when `heads` is given: resnets (each
  followed by a transformer), then an optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, num_layers: int, temb_channels: int,
               config: UNetConfig, init: layers.Init, *, heads: int | None,
               transformer_layers: int, add_downsample: bool, attention_impl: str | None):
    self.resnets = nnx.List([
        _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, config, init)
        for i in range(num_layers)])
    self.attentions = nnx.List([
        Transformer2DModel(out_channels, heads, transformer_layers, config, init,
                           attention_impl=attention_impl)
        for _ in range(num_layers)]) if heads else None
    self.downsamplers = nnx.List([
        layers.Downsample2D(out_channels, init, padding=config.downsample_padding)
    ]) if add_downsample else None

  def __call__(self, x, temb, context, context_lengths):
    """Returns the output and the skip connections it hands to the up path."""
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, context_lengths)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nnx.Module):
  """A resnet, then (transformer, resnet) once."""

  def __init__(self, channels: int, temb_channels: int, heads: int, transformer_layers: int,
               config: UNetConfig, init: layers.Init, *, attention_impl: str | None):
    self.resnets = nnx.List([_resnet(channels, channels, temb_channels, config, init)
                             for _ in range(2)])
    self.attentions = nnx.List([
        Transformer2DModel(channels, heads, transformer_layers, config, init,
                           attention_impl=attention_impl)])

  def __call__(self, x, temb, context, context_lengths):
    x = self.resnets[0](x, temb)
    return self.resnets[1](self.attentions[0](x, context, context_lengths), temb)


class UpBlock(nnx.Module):
  """diffusers' `UpBlock2D`, or `CrossAttnUpBlock2D` when `heads` is given: resnets over the
  input concatenated with a skip connection (each followed by a transformer), then an optional
  nearest-x2 upsampler."""

  def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int,
               num_layers: int, temb_channels: int, config: UNetConfig, init: layers.Init, *,
               heads: int | None, transformer_layers: int, add_upsample: bool,
               attention_impl: str | None):
    def resnet(i):
      resnet_in = prev_output_channels if i == 0 else out_channels
      skip = in_channels if i == num_layers - 1 else out_channels
      return _resnet(resnet_in + skip, out_channels, temb_channels, config, init)

    self.resnets = nnx.List([resnet(i) for i in range(num_layers)])
    self.attentions = nnx.List([
        Transformer2DModel(out_channels, heads, transformer_layers, config, init,
                           attention_impl=attention_impl)
        for _ in range(num_layers)]) if heads else None
    self.upsamplers = (nnx.List([layers.Upsample2D(out_channels, init)])
                       if add_upsample else None)

  def __call__(self, x, skips, temb, context, context_lengths):
    """`skips`: this block's skip connections, one per resnet, consumed from the last."""
    for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
      x = resnet(jnp.concatenate([x, skip], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, context_lengths)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNet2DConditionModel(nnx.Module):
  """The conditional denoising UNet of Stable Diffusion.

  `model(latents [B, H, W, C], timesteps [B], context [B, L, Dc], context_lengths=None)
  -> [B, H, W, C] float32`,
  where H and W are multiples of 2 ** (number of down blocks - 1).
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str = "none",
               attention_impl: str | None = None):
    """Builds the UNet with random parameters (`livo_jax.weights` loads real ones).

    Args:
      config: the parsed `config.json`.
      dtype: compute dtype of every layer (the timestep sinusoids are computed in float32).
      param_dtype: storage dtype of the parameters.
      remat: what each down, mid and up block keeps for the backward pass: "none", "dots"
        (conv and matmul outputs) or "blocks" (recompute the block); `layers.REMAT_POLICIES`.
        Less memory for gradients through the UNet, same outputs.
      attention_impl: "blocked", "cudnn", "xla" or None (the platform's best; see
        `livo_jax.models.attention`).
    """
    init = layers.Init(rngs, dtype, param_dtype)
    channels = config.block_out_channels
    heads = config.per_block("attention_head_dim")
    layers_per_block = config.per_block("layers_per_block")
    transformer_layers = config.per_block("transformer_layers_per_block")
    n = len(channels)
    temb_channels = 4 * channels[0]
    self.config = config
    self.remat = layers.check_remat(remat)

    self.conv_in = layers.conv(config.in_channels, channels[0], 3, init)
    self.time_embedding = TimestepEmbedding(channels[0], temb_channels, init)

    self.down_blocks = nnx.List([
        DownBlock(channels[max(i - 1, 0)], channels[i], layers_per_block[i], temb_channels,
                  config, init,
                  heads=heads[i] if block_type == "CrossAttnDownBlock2D" else None,
                  transformer_layers=transformer_layers[i], add_downsample=i < n - 1,
                  attention_impl=attention_impl)
        for i, block_type in enumerate(config.down_block_types)])

    self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_channels, heads[-1],
                                             transformer_layers[-1], config, init,
                                             attention_impl=attention_impl)

    # The up path mirrors the down path: block i works at the resolution of down block n-1-i.
    up_blocks = []
    for i, block_type in enumerate(config.up_block_types):
      j = n - 1 - i
      up_blocks.append(UpBlock(
          channels[max(j - 1, 0)], channels[min(j + 1, n - 1)], channels[j],
          layers_per_block[j] + 1, temb_channels, config, init,
          heads=heads[j] if block_type == "CrossAttnUpBlock2D" else None,
          transformer_layers=transformer_layers[j], add_upsample=i < n - 1,
          attention_impl=attention_impl))
    self.up_blocks = nnx.List(up_blocks)

    self.conv_norm_out = layers.group_norm(channels[0], config.norm_num_groups, config.norm_eps,
                                           init)
    self.conv_out = layers.conv(channels[0], config.out_channels, 3, init)

  def __call__(self, latents, timesteps, context, context_lengths=None):
    """Predicts the noise (or v) in `latents`.

    Args:
      latents: [B, H, W, C].
      timesteps: [B], int or float; a scalar applies to the whole batch.
      context: [B, L, Dc], the text encoder's hidden states; any length L.
      context_lengths: optional [B] int: row b attends to its first `context_lengths[b]`
        context tokens only, so rows of different lengths share one call (the padding is
        exactly invisible, as if the context were shorter).
    Returns:
      [B, H, W, C] in float32 whatever the compute dtype (float64 for a float64 model), for
      losses and samplers downstream.
    """
    # diffusers also takes other sizes (upsampling to each skip's size); SD latents never need it.
    factor = 2 ** (len(self.down_blocks) - 1)
    if latents.shape[1] % factor or latents.shape[2] % factor:
      raise ValueError(f"latent height and width must be multiples of {factor}, "
                       f"got {latents.shape[1:3]}")
    run = functools.partial(layers.call, remat=self.remat)
    temb = timestep_embedding(jnp.broadcast_to(timesteps, latents.shape[:1]),
                              self.config.block_out_channels[0],
                              flip_sin_to_cos=self.config.flip_sin_to_cos,
                              freq_shift=self.config.freq_shift)
    temb = self.time_embedding(temb)  # cast to the compute dtype by its first linear layer

    x = self.conv_in(latents)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = run(block, x, temb, context, context_lengths)
      skips.extend(block_skips)

    x = run(self.mid_block, x, temb, context, context_lengths)

    for block in self.up_blocks:
      n = len(block.resnets)
      x = run(block, x, tuple(skips[-n:]), temb, context, context_lengths)
      del skips[-n:]

    x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))   # float64 models stay float64
