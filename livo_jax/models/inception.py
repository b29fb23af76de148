"""The InceptionV3 of FID and Inception Score: a Flax NNX port of the "2015-12-05" network.

This is the network of TensorFlow's original FID and IS code, as pytorch-fid (`FIDInceptionV3`)
and torch-fidelity (`FeatureExtractorInceptionV3`) port it: torchvision's InceptionV3 without
the auxiliary head, with a 1008-class `fc`, pools that do not count padding in averages, and a
max pool in the last block. Both libraries share one weights file
(`...inception-2015-12-05-6726825d.pth`); its state-dict keys (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, `fc.bias`, ...) are this model's parameter paths, so
`livo_jax.weights.load_fid_inception` reads it, or a safetensors copy of it, by name.

Preprocessing follows torch-fidelity, which matches TensorFlow's graph to float precision:
images in [0, 255] are resized to 299x299 with TF 1.x's bilinear resize, then mapped to
[-1, 1] by `(x - 128) / 128`. pytorch-fid differs from the TensorFlow graph in both steps: it
resizes with torch's half-pixel bilinear interpolation, and normalises by `x / 255 * 2 - 1`.

Inference only: every batch norm uses its stored running statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax.models import layers

INPUT_SIZE = 299
_BN_EPS = 1e-3
# Batch-norm statistics are `nnx.BatchStat`s named `mean`/`var`, not parameters, so the weights
# layer's generic parameter rule does not name them; their torch keys are these.
BATCH_STAT_KEYS = {"mean": "running_mean", "var": "running_var"}


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nnx.Module):
  """A convolution without bias, a batch norm (eps 1e-3) and a relu."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size, init: layers.Init, *,
               stride: int = 1, padding=0):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                         padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                         dtype=init.dtype, param_dtype=init.param_dtype, rngs=init.rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=_BN_EPS,
                            dtype=init.dtype, param_dtype=init.param_dtype, rngs=init.rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
  # TensorFlow's average pool divides by the number of real (unpadded) pixels in the window.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int = 0):
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nnx.Module):
  """pytorch-fid's `FIDInceptionA` (35x35 grid)."""

  def __init__(self, in_channels: int, pool_features: int, init: layers.Init):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, init)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, init)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, init, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, init)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, init, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, init, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, init)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """torchvision's `InceptionB`: 35x35 -> 17x17."""

  def __init__(self, in_channels: int, init: layers.Init):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, init, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, init)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, init, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, init, stride=2)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3(x, stride=2),
    ], axis=-1)


class InceptionC(nnx.Module):
  """pytorch-fid's `FIDInceptionC` (17x17 grid, factorised 7x7 convolutions)."""

  def __init__(self, in_channels: int, channels_7x7: int, init: layers.Init):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, init)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, init)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), init, padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), init, padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, init)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), init, padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), init, padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), init, padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), init, padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, 1, init)

  def __call__(self, x):
    branch7x7dbl = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      branch7x7dbl = conv(branch7x7dbl)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        branch7x7dbl,
        self.branch_pool(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionD(nnx.Module):
  """torchvision's `InceptionD`: 17x17 -> 8x8."""

  def __init__(self, in_channels: int, init: layers.Init):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, init)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, init, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, init)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), init, padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), init, padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, init, stride=2)

  def __call__(self, x):
    branch7x7x3 = x
    for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                 self.branch7x7x3_4):
      branch7x7x3 = conv(branch7x7x3)
    return jnp.concatenate([
        self.branch3x3_2(self.branch3x3_1(x)),
        branch7x7x3,
        _max_pool_3x3(x, stride=2),
    ], axis=-1)


class InceptionE(nnx.Module):
  """pytorch-fid's `FIDInceptionE_1` (average pool) or `FIDInceptionE_2` (`max_pool`).

  The 2015 TensorFlow graph max-pools in its last block where the paper average-pools; the FID
  weights were trained that way.
  """

  def __init__(self, in_channels: int, init: layers.Init, *, max_pool: bool):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, init)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, init)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), init, padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), init, padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, init)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, init, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), init, padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), init, padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, 1, init)

  def __call__(self, x):
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool_3x3(x, stride=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled),
    ], axis=-1)


def resize_bilinear_tf1(images: jax.Array, size: int) -> jax.Array:
  """TensorFlow 1.x's `resize_bilinear` (align_corners=False) of [B, H, W, C] to size x size.

  Output pixel i samples the input at `i * in / out` (no half-pixel offset, unlike
  `jax.image.resize` and torch), as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
  does, with the same float32 coordinates and the same order of operations. Same-size inputs are
  returned unchanged.
  """
  def taps(n_in):
    src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
    low = src.astype(np.int64)  # floor: coordinates are non-negative
    return low, np.minimum(low + 1, n_in - 1), src - low.astype(np.float32)

  y_low, y_high, dy = taps(images.shape[1])
  x_low, x_high, dx = taps(images.shape[2])

  def lerp_x(rows):
    left, right = rows[:, :, x_low], rows[:, :, x_high]
    return left + (right - left) * dx[:, None]

  top, bottom = lerp_x(images[:, y_low]), lerp_x(images[:, y_high])
  return top + (bottom - top) * dy[:, None, None]


class InceptionV3(nnx.Module):
  """The FID InceptionV3 (pytorch-fid's `FIDInceptionV3`), NHWC, inference only.

  `model(images)` returns `(pool3, logits)`, both float32 whatever the compute dtype:
  - pool3 [B, 2048]: the average-pooled last block, the features of FID (and KID).
  - logits [B, 1008]: `pool3 @ fc.weight.T` *without* the fc bias, torch-fidelity's
    `logits_unbiased`. The original TensorFlow Inception Score takes its softmax over exactly
    these (it reads the graph's `softmax/logits/MatMul`), and torch-fidelity and torchmetrics
    compute IS from them. Add `model.fc.bias` for the biased logits.
  """

  def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    """Builds the model with freshly initialised parameters.

    Args:
      rngs: initialisers' randomness (use `nnx.eval_shape` to build without any).
      dtype: compute dtype of the convolutions and batch norms.
      param_dtype: storage dtype of the parameters and batch-norm statistics.
    """
    init = layers.Init(rngs, dtype, param_dtype)
    self.dtype = dtype
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, init, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, init)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, init, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, init)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, init)
    self.Mixed_5b = InceptionA(192, 32, init)
    self.Mixed_5c = InceptionA(256, 64, init)
    self.Mixed_5d = InceptionA(288, 64, init)
    self.Mixed_6a = InceptionB(288, init)
    self.Mixed_6b = InceptionC(768, 128, init)
    self.Mixed_6c = InceptionC(768, 160, init)
    self.Mixed_6d = InceptionC(768, 160, init)
    self.Mixed_6e = InceptionC(768, 192, init)
    self.Mixed_7a = InceptionD(768, init)
    self.Mixed_7b = InceptionE(1280, init, max_pool=False)
    self.Mixed_7c = InceptionE(2048, init, max_pool=True)
    self.fc = nnx.Linear(2048, 1008, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Features of images [B, H, W, 3], uint8 or float, with values in [0, 255].

    FID is defined on uint8 images: quantise generated images (round and clip) before calling,
    as torch-fidelity insists; float inputs are used as they are.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE)
    x = ((x - 128.0) / 128.0).astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = pool3 @ self.fc.kernel[...].astype(jnp.float32)
    return pool3, logits
