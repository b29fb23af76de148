"""Building blocks shared by the CLIP text model, the UNet and the VAE.

Conventions that the weights layer's parameter rule (`livo_jax.weights.layout`) relies on:
- Attribute names mirror the PyTorch module names of diffusers/transformers, and sub-module
  sequences are `nnx.List`s, so that a Flax state path such as
  `down_blocks/0/resnets/1/conv1/kernel` is the torch key `down_blocks.0.resnets.1.conv1.weight`.
- Parameters are `kernel` (Linear [in, out], Conv [kh, kw, in, out]), `scale` (norms) and
  `embedding`, which take torch's `weight`, and `bias` and bare parameters (CLIP's
  `class_embedding`, `logit_scale`), which keep their names.
- Activations are NHWC; `dtype` is the compute dtype, `param_dtype` the storage dtype.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from livo_jax.models import attention


@dataclasses.dataclass(frozen=True)
class Init:
  """What every layer constructor needs besides its shape."""
  rngs: nnx.Rngs
  dtype: Any = jnp.float32        # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype of freshly initialised parameters


def linear(in_features: int, out_features: int, init: Init, *, bias: bool = True) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=bias, dtype=init.dtype,
                    param_dtype=init.param_dtype, rngs=init.rngs)


def conv(in_channels: int, out_channels: int, kernel_size: int, init: Init, *, stride: int = 1,
         padding: int | None = None) -> "Conv":
  """A 2-D convolution with torch's symmetric padding (default: `kernel_size // 2`)."""
  pad = kernel_size // 2 if padding is None else padding
  return Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
              padding=((pad, pad), (pad, pad)), dtype=init.dtype, param_dtype=init.param_dtype,
              rngs=init.rngs)


# On a CPU, a convolution with at most this many output positions and at least this many
# input features per position (kernel taps x input channels) is one matmul over gathered
# patches: XLA's CPU convolution runs SD's deepest levels (640-1280 channels at 2x2 to 8x8) at
# 1-7 GFLOP/s and 1.5-20x slower than that matmul, forward and backward; with few channels the
# convolution is faster, and compiles faster (docs/performance.md, "What a user gets").
IM2COL_MAX_POSITIONS = 64
IM2COL_MIN_FEATURES = 2304      # 3x3 x 256 channels


class Conv(nnx.Conv):
  """`nnx.Conv` (same parameters), as a patch matmul where that is faster (`IM2COL_*`)."""

  def __call__(self, x):
    (kh, kw), (sh, sw) = self.kernel_size, _pair(self.strides)
    (top, bottom), (left, right) = self.padding
    ho = (x.shape[1] + top + bottom - kh) // sh + 1
    wo = (x.shape[2] + left + right - kw) // sw + 1
    if (jax.default_backend() != "cpu" or ho * wo > IM2COL_MAX_POSITIONS
        or kh * kw * x.shape[-1] < IM2COL_MIN_FEATURES):
      return super().__call__(x)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = jnp.concatenate(
        [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
         for i in range(kh) for j in range(kw)], axis=-1)      # [B, ho, wo, kh*kw*Cin]
    kernel = self.kernel[...].astype(self.dtype)
    y = patches @ kernel.reshape(-1, kernel.shape[-1])   # the kernel's (i, j, c) order
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class GroupNorm(nnx.Module):
  """Group normalisation over channels-last inputs [B, ..., C], torch's formula.

  Statistics are at least float32 (float64 stays float64) and two-pass (the variance of the
  centred input, as torch computes it), reduced per channel over the spatial axes first and then
  per group: XLA's CPU backend reduces that layout 3x faster than flax's `GroupNorm`, which
  reshapes to [B, ..., G, C/G].
  """

  def __init__(self, channels: int, groups: int, eps: float, init: Init):
    if channels % groups:
      raise ValueError(f"{channels} channels do not split into {groups} groups")
    self.groups = groups
    self.eps = eps
    self.dtype = init.dtype
    self.scale = nnx.Param(jnp.ones((channels,), init.param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), init.param_dtype))

  def __call__(self, x):
    wide = jnp.promote_types(x.dtype, jnp.float32)
    wide_x = x.astype(wide)
    axes = tuple(range(1, x.ndim - 1))

    def per_group(per_channel):   # [B, C] -> [B, 1, ..., 1, C], each group's mean
      batch, channels = per_channel.shape
      grouped = per_channel.reshape(batch, self.groups, channels // self.groups).mean(-1)
      return jnp.repeat(grouped, channels // self.groups, axis=-1).reshape(
          (batch,) + (1,) * len(axes) + (channels,))

    centred = wide_x - per_group(jnp.mean(wide_x, axis=axes))
    variance = per_group(jnp.mean(jnp.square(centred), axis=axes))
    y = centred * jax.lax.rsqrt(variance + self.eps)
    y = y * self.scale[...].astype(wide) + self.bias[...].astype(wide)
    return y.astype(self.dtype)


def group_norm(channels: int, groups: int, eps: float, init: Init) -> GroupNorm:
  return GroupNorm(channels, groups, eps, init)


def layer_norm(features: int, eps: float, init: Init) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=init.dtype,
                       param_dtype=init.param_dtype, rngs=init.rngs)


def multi_head_attention(q, k, v, num_heads: int, *, is_causal: bool = False,
                         kv_lengths=None, upcast: bool = False,
                         implementation: str | None = None):
  """Scaled dot-product attention over [B, T, D] inputs (`attention.dot_product_attention`).

  Args:
    q: [B, Tq, D]; k, v: [B, Tk, D], with D = num_heads * head_dim.
    kv_lengths: optional [B] int, how many leading keys each row attends to (the rest are
      padding, exactly invisible).
    upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`).
    implementation: "blocked", "cudnn", "xla" or None (the platform's best; see
      `livo_jax.models.attention`).
  Returns:
    [B, Tq, D] in the dtype of `q`.
  """
  out_dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  split = lambda x: x.reshape(*x.shape[:2], num_heads, x.shape[-1] // num_heads)
  out = attention.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal,
                                        kv_lengths=kv_lengths, implementation=implementation)
  return out.reshape(*out.shape[:2], -1).astype(out_dtype)


class Attention(nnx.Module):
  """diffusers' `Attention`: q/k/v projections, attention, `to_out.0` projection.

  With `norm_groups` it is the VAE's spatial self-attention block: a group norm first, the input
  added back at the end, and 4-D [B, H, W, C] inputs flattened to a sequence.
  """

  def __init__(self, query_dim: int, heads: int, head_dim: int, init: Init, *,
               cross_attention_dim: int | None = None, qkv_bias: bool = False,
               upcast: bool = False, norm_groups: int | None = None, norm_eps: float = 1e-6,
               attention_impl: str | None = None):
    inner = heads * head_dim
    context_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.upcast = upcast
    self.attention_impl = attention_impl
    self.group_norm = (group_norm(query_dim, norm_groups, norm_eps, init)
                       if norm_groups else None)
    self.to_q = linear(query_dim, inner, init, bias=qkv_bias)
    self.to_k = linear(context_dim, inner, init, bias=qkv_bias)
    self.to_v = linear(context_dim, inner, init, bias=qkv_bias)
    self.to_out = nnx.List([linear(inner, query_dim, init)])

  def __call__(self, x, context=None, context_lengths=None):
    """x [B, T, C] or [B, H, W, C]; context [B, L, Dc] (default: x); context_lengths [B]."""
    residual = x
    if self.group_norm is not None:
      x = self.group_norm(x)
    spatial_shape = x.shape
    if x.ndim == 4:
      x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, H*W, C]
    context = x if context is None else context
    out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                               kv_lengths=context_lengths, upcast=self.upcast,
                               implementation=self.attention_impl)
    out = self.to_out[0](out).reshape(spatial_shape)
    return out + residual if self.group_norm is not None else out


class ResnetBlock2D(nnx.Module):
  """diffusers' `ResnetBlock2D` (default time-embedding shift, output scale 1)."""

  def __init__(self, in_channels: int, out_channels: int, init: Init, *,
               temb_channels: int | None, groups: int, eps: float):
    self.norm1 = group_norm(in_channels, groups, eps, init)
    self.conv1 = conv(in_channels, out_channels, 3, init)
    self.time_emb_proj = linear(temb_channels, out_channels, init) if temb_channels else None
    self.norm2 = group_norm(out_channels, groups, eps, init)
    self.conv2 = conv(out_channels, out_channels, 3, init)
    self.conv_shortcut = (conv(in_channels, out_channels, 1, init)
                          if in_channels != out_channels else None)

  def __call__(self, x, temb=None):  # x [B, H, W, Cin], temb [B, T]
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """A stride-2 3x3 conv. `padding=0` pads only bottom/right, as the VAE encoder does."""

  def __init__(self, channels: int, init: Init, *, padding: int = 1):
    self.pad_bottom_right = padding == 0
    self.conv = conv(channels, channels, 3, init, stride=2, padding=padding)

  def __call__(self, x):
    if self.pad_bottom_right:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, init: Init):
    self.conv = conv(channels, channels, 3, init)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


def _call(module, *args):
  return module(*args)


# What a block keeps from its forward pass for the backward pass (`remat=`):
#   "none": everything (fastest, most memory);
#   "dots": the outputs of its convolutions and matmuls; norms, activations and attention
#     softmaxes are recomputed;
#   "blocks": only its inputs; the whole block is recomputed (least memory).
REMAT_POLICIES = ("none", "dots", "blocks")

# Tree mode: the forward pass changes no state, and graph mode (flax 0.12's default) fails when
# the model is merged inside `jax.grad`, which is how the trainer differentiates through it.
_rematerialised = {
    "dots": nnx.remat(_call, policy=jax.checkpoint_policies.dots_saveable, graph_updates=False),
    "blocks": nnx.remat(_call, graph_updates=False)}


def check_remat(remat: str) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat = {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
  return remat


def call(module, *args, remat: str):
  """`module(*args)`, its activations kept for the backward pass as `remat` says."""
  return _call(module, *args) if remat == "none" else _rematerialised[remat](module, *args)
