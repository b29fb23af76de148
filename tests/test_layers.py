"""Group norm against its formula in numpy; the convolution against torch's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from livo_jax.models import layers


def numpy_group_norm(x, groups, scale, bias, eps):
  x = np.asarray(x, np.float64)
  grouped = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape", [(2, 5, 6, 12), (3, 7, 12)])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.float64, 1e-12)])
def test_group_norm_is_the_formula(shape, dtype, atol):
  with jax.enable_x64(dtype == jnp.float64):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, shape)   # an offset mean: a one-pass variance would lose digits
    norm = layers.group_norm(12, 4, 1e-5, layers.Init(nnx.Rngs(0), dtype, dtype))
    norm.scale[...] = jnp.asarray(rng.normal(size=12), dtype)
    norm.bias[...] = jnp.asarray(rng.normal(size=12), dtype)
    out = norm(jnp.asarray(x, dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out, numpy_group_norm(x, 4, np.asarray(norm.scale[...]),
                                                     np.asarray(norm.bias[...]), 1e-5),
                               atol=atol)


def test_group_norm_bfloat16_output_and_bad_groups():
  norm = layers.group_norm(8, 2, 1e-6, layers.Init(nnx.Rngs(0), jnp.bfloat16, jnp.float32))
  assert norm(jnp.ones((1, 2, 2, 8), jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
    layers.group_norm(10, 4, 1e-6, layers.Init(nnx.Rngs(0)))


@pytest.mark.parametrize("size,stride,padding", [(2, 1, None), (4, 2, 1), (5, 2, 0), (6, 1, 0)])
@pytest.mark.parametrize("max_positions", [0, 10**6])   # XLA's convolution / the patch matmul
def test_conv_is_torchs(size, stride, padding, max_positions, monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers, "IM2COL_MAX_POSITIONS", max_positions)
  monkeypatch.setattr(layers, "IM2COL_MIN_FEATURES", 0)
  conv = layers.conv(6, 5, 3, layers.Init(nnx.Rngs(0)), stride=stride, padding=padding)
  rng = np.random.default_rng(0)
  conv.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  x = rng.normal(size=(2, size, size, 6)).astype(np.float32)
  weight = torch.tensor(np.asarray(conv.kernel[...]), dtype=torch.float64).permute(3, 2, 0, 1)
  x_torch = torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
  expected = torch.nn.functional.conv2d(
      x_torch, weight, torch.tensor(np.asarray(conv.bias[...]), dtype=torch.float64),
      stride=stride, padding=1 if padding is None else padding)
  (expected ** 2).sum().backward()
  out = conv(jnp.asarray(x))
  grad = jax.grad(lambda x: jnp.sum(conv(x) ** 2))(jnp.asarray(x))
  np.testing.assert_allclose(out, expected.detach().permute(0, 2, 3, 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(grad, x_torch.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4)
