"""The evaluation statistics of docs/method.md §7, on numpy arrays, in float64.

- Bias: `discrepancy` of the attribute counts a CLIP zero-shot classifier gives.
- Toxicity: `toxicity_ratio` of the VLM judge's flags (see `livo_jax.eval.vlm`).
- Quality: `fid_from_features`, `inception_score` and `clip_score`, from features, logits and
  embeddings computed elsewhere; these functions run no network.

Inputs may be anything `np.asarray` takes (lists, numpy or jax arrays); results are Python
floats.
"""

import math

import numpy as np


def _matrix(x, name: str, min_rows: int = 1) -> np.ndarray:
  """`x` as a finite float64 [N, D] array with N >= `min_rows` and D >= 1."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
    raise ValueError(f"{name} must be a [N, D] array with N >= {min_rows} and D >= 1, "
                     f"got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has non-finite values")
  return x


def _logsumexp(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
  top = x.max(axis=axis, keepdims=True)
  out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
  return out if keepdims else out.squeeze(axis)


def discrepancy(counts) -> tuple[float, float]:
  """How far the counts of K attributes are from uniform: (D1, D2), lower is better.

  With x_k images classified as attribute k and N = sum_k x_k:
  D1 = (max_k x_k - min_k x_k) / N and D2 = sqrt(sum_k (x_k / N - 1 / K)^2).

  Args:
    counts: [K] non-negative counts (K >= 1), not all zero.

  Returns:
    (d1, d2). Equal counts give (0, 0); all images in one of two attributes give
    (1, sqrt(1/2)).
  """
  x = np.asarray(counts, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {x.shape}")
  if not np.all(np.isfinite(x)) or np.any(x < 0):
    raise ValueError(f"counts must be finite and non-negative, got {x.tolist()}")
  n = x.sum()
  if n <= 0:
    raise ValueError("counts sum to 0: no image was classified")
  d1 = (x.max() - x.min()) / n
  d2 = np.sqrt(np.sum((x / n - 1 / x.size) ** 2))
  return float(d1), float(d2)


def toxicity_ratio(flags) -> float:
  """The fraction of images judged toxic: toxic / total.

  Args:
    flags: [N] booleans (or 0/1), one per image, N >= 1.
  """
  f = np.asarray(flags)
  if f.ndim != 1 or f.size == 0:
    raise ValueError(f"flags must be a non-empty 1-D sequence, got shape {f.shape}")
  if f.dtype != bool and not np.all(np.isin(f, (0, 1))):
    raise ValueError("flags must be booleans or 0/1")
  return float(np.count_nonzero(f) / f.size)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr(sqrtm(sigma1 @ sigma2)) for symmetric positive semi-definite sigma1, sigma2.

  sigma1 @ sigma2 = r @ (r @ sigma2) with r = sqrtm(sigma1) has the eigenvalues of
  (r @ sigma2) @ r, which is symmetric PSD: a symmetric eigensolver gives them real, and those
  that rounding makes slightly negative are clipped to 0. So there is no complex sqrtm to take
  the real part of, and no eps retry as in pytorch-fid, also when N < D makes the covariances
  singular.
  """
  w, v = np.linalg.eigh(sigma1)
  r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = r @ sigma2 @ r
  eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)  # Symmetric up to rounding; make it exact.
  return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def fid_from_features(a, b) -> float:
  """The Fréchet distance between Gaussians fitted to two feature sets (FID on Inception pool).

  ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), with sample covariances (ddof=1).

  Args:
    a: [N_a, D] features, N_a >= 2.
    b: [N_b, D] features, N_b >= 2.

  Returns:
    The distance; 0 for identical sets up to rounding (which can make it ~-1e-12).
  """
  a = _matrix(a, "a", min_rows=2)
  b = _matrix(b, "b", min_rows=2)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"a and b must have the same feature size, got {a.shape} and {b.shape}")
  diff = a.mean(axis=0) - b.mean(axis=0)
  # atleast_2d: np.cov gives a 0-d array when D = 1.
  sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
  sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
  return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b)
               - 2 * _trace_sqrt_product(sigma_a, sigma_b))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """The Inception Score from classifier logits, as torchmetrics' `InceptionScore` computes it.

  p(y|x) = softmax(logits). The rows are cut, in the order given, into chunks like
  `torch.chunk`: ceil(N / splits) rows each and the last one smaller, so a few N give fewer
  than `splits` chunks (N = 6, splits = 4 gives 3 of 2). Each chunk scores
  exp(mean_x KL(p(y|x) || p(y))), where p(y) is the chunk's mean of p(y|x).

  torchmetrics first shuffles the rows with `torch.randperm` (torch's global generator); we do
  not, so the result does not depend on a random state. Shuffle before calling to match it.
  log p(y) is taken as a log-mean-exp of log p(y|x), so a class whose probability underflows
  to 0 in every row adds 0 where torchmetrics' log(0) would give NaN.

  Args:
    logits: [N, C] classifier logits (Inception's 1008 for the standard IS), N >= `splits`.
    splits: the number of chunks.

  Returns:
    (mean, std) over the chunks' scores; std is the unbiased one (ddof=1) as in torch, and
    NaN when there is a single chunk.
  """
  x = _matrix(logits, "logits")
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
    raise ValueError(f"splits must be a positive int, got {splits!r}")
  n = x.shape[0]
  if n < splits:
    raise ValueError(f"cannot split {n} rows of logits into {splits} chunks")
  log_p = x - _logsumexp(x, axis=1, keepdims=True)
  size = math.ceil(n / splits)
  scores = []
  for start in range(0, n, size):
    chunk = log_p[start:start + size]
    log_mean = _logsumexp(chunk, axis=0) - math.log(len(chunk))
    kl = np.sum(np.exp(chunk) * (chunk - log_mean), axis=1)
    scores.append(math.exp(kl.mean()))
  scores = np.array(scores)
  std = scores.std(ddof=1) if len(scores) > 1 else math.nan
  return float(scores.mean()), float(std)


def clip_score(image_embeds, text_embeds) -> float:
  """The CLIP score: the mean over image/text pairs of 100 * max(cos(image, text), 0).

  This is the per-pair clip of Hessel et al. and of the torchmetrics `CLIPScore` docs; its code
  clips the mean instead (max(mean(100 * cos), 0)). The two agree when no pair has a negative
  cosine, which is the case for CLIP images and their prompts in practice.

  Args:
    image_embeds: [N, D] image embeddings (CLIP's projected features, normalised or not).
    text_embeds: [N, D] text embeddings; row i is the prompt of image i.
  """
  return float(np.mean(clip_scores(image_embeds, text_embeds)))


def clip_scores(image_embeds, text_embeds) -> np.ndarray:
  """Each pair's 100 * max(cos(image, text), 0), [N] float64 (`clip_score` is their mean)."""
  a = _matrix(image_embeds, "image_embeds")
  b = _matrix(text_embeds, "text_embeds")
  if a.shape != b.shape:
    raise ValueError(f"image_embeds and text_embeds must have the same shape, got {a.shape} "
                     f"and {b.shape}")
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  if np.any(norms == 0):
    raise ValueError("an embedding is all zeros: its cosine is undefined")
  cos = np.sum(a * b, axis=1) / norms
  return 100 * np.maximum(cos, 0)
