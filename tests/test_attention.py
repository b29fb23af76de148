"""The query-blocked attention against the softmax formula in numpy and XLA's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livo_jax.models import attention


def numpy_attention(q, k, v, kv_lengths=None):
  """softmax(q k^T / sqrt(d)) v in float64, [B, T, H, d] inputs."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if kv_lengths is not None:
    s = np.where(np.arange(k.shape[1]) < np.asarray(kv_lengths)[:, None, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Blocks of 16 queries at these sizes, so 100 queries make 7 blocks and 12 padded rows."""
  monkeypatch.setattr(attention, "_BLOCK_SCORES", 4096)


def inputs(batch=2, queries=100, keys=37, heads=3, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((batch, n, heads, head_dim)).astype(np.float32)
               for n in (queries, keys, keys))


@pytest.mark.parametrize("kv_lengths", [None, np.array([37, 20])])
def test_forward_matches_the_formula(kv_lengths):
  q, k, v = inputs()
  assert attention.query_block(6, 100, 37) == 16
  lengths = None if kv_lengths is None else jnp.asarray(kv_lengths)
  out = jax.jit(attention.blocked_attention)(q, k, v, lengths)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, numpy_attention(q, k, v, kv_lengths), atol=2e-6)


@pytest.mark.parametrize("kv_lengths", [None, np.array([37, 20])])
def test_gradients_match_xla_autodiff(kv_lengths):
  q, k, v = inputs(seed=1)
  cotangent = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  lengths = None if kv_lengths is None else jnp.asarray(kv_lengths)

  def grads(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  ours = grads(lambda q, k, v: attention.blocked_attention(q, k, v, lengths))
  xla = grads(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths, implementation="xla"))
  for name, a, b in zip("qkv", ours, xla):
    np.testing.assert_allclose(a, b, atol=3e-6, err_msg=f"d{name}")
  if kv_lengths is not None:   # keys past a row's length get no gradient
    assert not np.any(ours[1][1, 20:]) and not np.any(ours[2][1, 20:])
    assert np.all(np.abs(ours[2][1, :20]).sum(-1) > 0)


def test_bfloat16_inputs_keep_float32_softmax():
  q, k, v = inputs(queries=64, keys=64, head_dim=16, seed=3)
  out = attention.blocked_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  exact = numpy_attention(*(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
                            for x in (q, k, v)))
  # bf16 keeps 8 bits: the output's rounding (2^-8 relative) plus the probabilities'.
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=2e-2)


def test_dispatch():
  q, k, v = inputs(queries=16, keys=16)
  xla = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  # Causal attention is never blocked: "blocked" and the CPU default take XLA's path.
  for implementation in ("blocked", None):
    np.testing.assert_array_equal(attention.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation), xla)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), numpy_attention(q, k, v),
                             atol=2e-6)
  with pytest.raises(ValueError, match="'flash'.*blocked, cudnn, xla"):
    attention.dot_product_attention(q, k, v, implementation="flash")


def test_query_block_sizes(monkeypatch):
  monkeypatch.setattr(attention, "_BLOCK_SCORES", 2 ** 20)
  # 2 * block * batch_heads * keys must stay within 2^20 scores for the block to double.
  assert attention.query_block(batch_heads=32, queries=1024, keys=1024) == 32
  assert attention.query_block(batch_heads=32, queries=1024, keys=78) == 256
  assert attention.query_block(batch_heads=8, queries=64, keys=4096) == 32
  assert attention.query_block(batch_heads=1, queries=10, keys=10) == 16


def test_float64_stays_float64():
  with jax.enable_x64(True):
    q, k, v = (x.astype(np.float64) for x in inputs(seed=4))
    out = attention.blocked_attention(q, k, v)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=1e-12)
    dq = jax.grad(lambda q: jnp.sum(attention.blocked_attention(q, k, v) ** 2))(q)
    assert dq.dtype == jnp.float64


def test_float16_causal_attention_on_cpu():
  """The CLIP towers' causal path in float16: XLA's CPU dots refuse float16 inputs with float32
  accumulation, so the CPU computes it in float32 and returns float16."""
  q, k, v = inputs(queries=16, keys=16, head_dim=8, seed=4)
  half = [jnp.asarray(x, jnp.float16) for x in (q, k, v)]
  out = attention.dot_product_attention(*half, is_causal=True)
  assert out.dtype == jnp.float16
  exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in half), is_causal=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=2e-3)
