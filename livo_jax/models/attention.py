"""Scaled dot-product attention: which implementation runs where, and a CPU-friendly one.

`dot_product_attention(q, k, v, implementation=...)` takes [B, T, heads, head_dim] inputs:
  - "blocked": `blocked_attention` below (not causal);
  - "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU, 16-bit);
  - "xla": `jax.nn.dot_product_attention`'s XLA path, which materialises every [T, S] score
    matrix and its softmax (and keeps them for the backward pass);
  - None: "blocked" on CPU, "cudnn" on GPU where cuDNN takes the shape and dtype, "xla" else.
Causal attention (the CLIP text towers, 77 tokens) always goes through
`jax.nn.dot_product_attention`. `record()` tells which implementation each traced call ran.
"""

import collections
import contextlib
import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("blocked", "cudnn", "xla")

# Score elements per query block of `blocked_attention`: 2^20 float32 scores (4 MiB) stay in a
# CPU's cache. Measured on a 2-core EPYC (fwd+bwd, B*heads = 32, 1024 tokens, head_dim 8):
# blocks of 32 queries 58 ms, 64: 70 ms, 256: 84 ms, one block (no blocking) 135 ms.
_BLOCK_SCORES = 2 ** 20

_records = []  # the counters of the `record()` blocks open now


@contextlib.contextmanager
def record():
  """Yields a Counter of the implementations that the attention calls traced in the block ran.

  Keys: "blocked", "cudnn", "xla", and where the per-platform default passed cuDNN over on a GPU,
  "xla (cuDNN refused q [B, T, heads, head_dim] dtype: the first line of its error)". Only
  tracing counts: a call that jit finds in its cache runs what was traced before.
  """
  counts = collections.Counter()
  _records.append(counts)
  try:
    yield counts
  finally:
    _records.remove(counts)


def _ran(implementation: str) -> None:
  for counts in _records:
    counts[implementation] += 1


def dot_product_attention(q, k, v, *, is_causal: bool = False, kv_lengths=None,
                          implementation: str | None = None):
  """softmax(q k^T / sqrt(head_dim)) v over [B, T, heads, head_dim] inputs."""
  if implementation not in IMPLEMENTATIONS + (None,):
    raise ValueError(f"attention implementation {implementation!r}: expected one of "
                     f"{', '.join(IMPLEMENTATIONS)} or None (choose per platform)")
  backend = jax.default_backend()
  if implementation is None and not is_causal and backend == "cpu":
    implementation = "blocked"
  if implementation == "blocked" and not is_causal:
    _ran("blocked")
    return blocked_attention(q, k, v, kv_lengths)
  dtype = q.dtype
  if backend == "cpu" and dtype == jnp.float16:
    # XLA's CPU dots refuse float16 inputs with float32 accumulation, which the XLA path asks.
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  call = functools.partial(jax.nn.dot_product_attention, q, k, v, is_causal=is_causal,
                           key_value_seq_lengths=kv_lengths)
  kernel, refused = ("cudnn" if implementation == "cudnn" else "xla"), ""
  if implementation is None and backend == "gpu":
    # At trace time, cuDNN raises for a shape or dtype it does not take, or is not there (ROCm).
    try:
      out = call(implementation="cudnn")
    except (NotImplementedError, RuntimeError) as e:
      refused = f" (cuDNN refused q {list(q.shape)} {q.dtype}: {e}".splitlines()[0] + ")"
    else:
      _ran("cudnn")
      return out
  out = call(implementation=kernel).astype(dtype)
  _ran(kernel + refused)
  return out


def query_block(batch_heads: int, queries: int, keys: int) -> int:
  """Queries per block: a power of two in [16, 256] whose scores fill about `_BLOCK_SCORES`."""
  block = 16
  while block < 256 and block < queries and 2 * block * batch_heads * keys <= _BLOCK_SCORES:
    block *= 2
  return block


def blocked_attention(q, k, v, kv_lengths=None):
  """Attention computed a block of queries at a time, with a flash-attention backward pass.

  `kv_lengths` [B] (optional, each >= 1): row b attends to its first kv_lengths[b] keys only.

  Each block's [block, S] scores and softmax live only while that block is processed, so the
  working set stays in cache; the forward pass keeps only the output and each row's
  log-sum-exp, and the backward pass recomputes the block's probabilities from them. Scores and
  softmax statistics are at least float32 (float64 stays float64). Queries are padded to a whole
  number of blocks (padded rows are dropped and get no gradient).
  """
  batch, queries, heads, _ = q.shape
  block = query_block(batch * heads, queries, k.shape[1])
  pad = -queries % block
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  return _blocked(q, k, v, kv_lengths, block)[:, :queries]


def _to_blocks(x, block):      # [B, T, ...] -> [T / block, B, block, ...]
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]).swapaxes(0, 1)


def _from_blocks(x):           # [T / block, B, block, ...] -> [B, T, ...]
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _wide(dtype):              # the dtype of scores and statistics: at least float32
  return jnp.promote_types(dtype, jnp.float32)


def _scores(q, k, kv_lengths):  # [B, t, H, d], [B, S, H, d], [B] -> wide [B, H, t, S]
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  s = jnp.einsum("bthd,bshd->bhts", q * scale, k, preferred_element_type=_wide(q.dtype))
  if kv_lengths is None:
    return s
  visible = jnp.arange(k.shape[1]) < kv_lengths[:, None, None, None]
  return jnp.where(visible, s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, kv_lengths, block):
  return _blocked_forward(q, k, v, kv_lengths, block)[0]


def _blocked_forward(q, k, v, kv_lengths, block):
  def one(q_block):
    s = _scores(q_block, k, kv_lengths)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - row_max)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v,
                     preferred_element_type=_wide(q.dtype))
    out = out / jnp.swapaxes(row_sum, 1, 2)
    return out.astype(q.dtype), row_max + jnp.log(row_sum)

  out, logsumexp = jax.lax.map(one, _to_blocks(q, block))
  out = _from_blocks(out)
  return out, (q, k, v, kv_lengths, out, logsumexp)


def _blocked_backward(block, residuals, d_out):
  q, k, v, kv_lengths, out, logsumexp = residuals
  wide = _wide(q.dtype)

  def one(carry, xs):
    dk, dv = carry
    q_block, out_block, d_out_block, lse_block = xs
    p = jnp.exp(_scores(q_block, k, kv_lengths) - lse_block)                     # [B, H, t, S]
    dv = dv + jnp.einsum("bhts,bthd->bshd", p, d_out_block.astype(wide))
    dp = jnp.einsum("bthd,bshd->bhts", d_out_block, v, preferred_element_type=wide)
    row_dot = jnp.sum(d_out_block.astype(wide) * out_block.astype(wide), axis=-1)  # [B, t, H]
    ds = p * (dp - jnp.swapaxes(row_dot, 1, 2)[..., None]) * q.shape[-1] ** -0.5
    dq = jnp.einsum("bhts,bshd->bthd", ds, k.astype(wide))
    dk = dk + jnp.einsum("bhts,bthd->bshd", ds, q_block.astype(wide))
    return (dk, dv), dq.astype(q.dtype)

  zeros = (jnp.zeros(k.shape, wide), jnp.zeros(v.shape, wide))
  (dk, dv), dq = jax.lax.scan(
      one, zeros, (_to_blocks(q, block), _to_blocks(out, block), _to_blocks(d_out, block),
                   logsumexp))
  return _from_blocks(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_forward, _blocked_backward)
