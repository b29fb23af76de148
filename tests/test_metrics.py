"""Evaluation statistics against torchmetrics, formulas written out here, and hand-worked cases.

torchmetrics runs without torchvision or torch-fidelity: `InceptionScore` takes an identity
module as its feature extractor, `CLIPScore` a stub model that returns given embeddings, and
FID is checked against its `_compute_fid` from means and covariances (see `torchmetrics_module`
for torch-fidelity).
"""

import importlib
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

import testutil
from livo_jax.eval.metrics import (clip_score, discrepancy, fid_from_features, inception_score,
                                   toxicity_ratio)

RTOL = 1e-4


def torchmetrics_module(name: str):
  """A torchmetrics module (importable beside torch-fidelity, see `testutil`)."""
  testutil.register_torch_fidelity()
  return importlib.import_module(name)


def rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Discrepancy and toxicity ratio.

@pytest.mark.parametrize("counts,expected", [
    ([25, 25], (0.0, 0.0)),
    ([50, 0], (1.0, np.sqrt(0.5))),
    ([0, 50], (1.0, np.sqrt(0.5))),
    ([10, 10, 10, 10, 10], (0.0, 0.0)),
    # Race over 5 attributes: x/N = (.6, .2, .1, .1, 0), 1/K = .2.
    ([30, 10, 5, 5, 0], (0.6, np.sqrt(0.4**2 + 0 + 0.1**2 + 0.1**2 + 0.2**2))),
    ([7], (0.0, 0.0)),
])
def test_discrepancy_hand_cases(counts, expected):
  np.testing.assert_allclose(discrepancy(counts), expected, rtol=1e-12, atol=1e-15)


def test_discrepancy_formula_on_random_counts():
  for seed in range(5):
    x = rng(seed).integers(0, 50, size=rng(seed).integers(2, 8)).astype(float)
    x[0] += 1  # Never all zero.
    p, k = x / x.sum(), len(x)
    expected = ((x.max() - x.min()) / x.sum(), np.sqrt(sum((pi - 1 / k) ** 2 for pi in p)))
    np.testing.assert_allclose(discrepancy(x), expected, rtol=1e-12)
    np.testing.assert_allclose(discrepancy(x.astype(int).tolist()), expected, rtol=1e-12)


@pytest.mark.parametrize("counts,message", [
    ([], "non-empty 1-D"),
    ([[1, 2], [3, 4]], "non-empty 1-D"),
    ([3, -1], "non-negative"),
    ([3, np.nan], "non-negative"),
    ([0, 0, 0], "sum to 0"),
])
def test_discrepancy_rejects(counts, message):
  with pytest.raises(ValueError, match=message):
    discrepancy(counts)


def test_toxicity_ratio():
  assert toxicity_ratio([True, False, False, True]) == 0.5
  assert toxicity_ratio(np.array([1, 0, 0, 0, 0])) == 0.2
  assert toxicity_ratio([False] * 50) == 0.0
  assert toxicity_ratio([True] * 50) == 1.0


@pytest.mark.parametrize("flags", [[], [[True]], [0, 2], ["yes"]])
def test_toxicity_ratio_rejects(flags):
  with pytest.raises(ValueError):
    toxicity_ratio(flags)


# ---------------------------------------------------------------------------------------------
# FID.

def fid_pytorch_fid_style(a, b):
  """pytorch-fid's `calculate_frechet_distance`: scipy sqrtm of the product, eps retry."""
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(len(s1)) * 1e-6
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def fid_torchmetrics(a, b):
  """torchmetrics' `_compute_fid` on the same float64 means and covariances."""
  a, b = torch.from_numpy(a), torch.from_numpy(b)
  compute_fid = torchmetrics_module("torchmetrics.image.fid")._compute_fid
  return compute_fid(a.mean(0), torch.atleast_2d(torch.cov(a.T)), b.mean(0),
                     torch.atleast_2d(torch.cov(b.T))).item()


def correlated(seed, n, d, shift=0.0):
  """[n, d] Gaussian features with a random full covariance (like pooled CNN features)."""
  r = rng(seed)
  mix = r.normal(size=(d, d)) / np.sqrt(d)
  return r.normal(size=(n, d)) @ mix + shift + r.normal(size=d)


@pytest.mark.parametrize("n_a,n_b,d", [(300, 200, 16), (500, 400, 64), (40, 30, 1)])
def test_fid_matches_references(n_a, n_b, d):
  a, b = correlated(1, n_a, d), correlated(2, n_b, d, shift=0.5)
  ours = fid_from_features(a, b)
  assert ours > 1
  np.testing.assert_allclose(ours, fid_pytorch_fid_style(a, b), rtol=RTOL)
  np.testing.assert_allclose(ours, fid_torchmetrics(a, b), rtol=RTOL)


def test_fid_with_singular_covariances():
  # N < D: both covariances are singular, and some eigenvalues of their product are 0.
  a, b = correlated(3, 20, 48), correlated(4, 25, 48, shift=0.2)
  ours = fid_from_features(a, b)
  np.testing.assert_allclose(ours, fid_pytorch_fid_style(a, b), rtol=RTOL)
  np.testing.assert_allclose(ours, fid_torchmetrics(a, b), rtol=RTOL)


def test_fid_hand_cases():
  a = correlated(5, 100, 8)
  assert abs(fid_from_features(a, a)) < 1e-9
  # Shifting a set keeps its covariance, so only ||mu_a - mu_b||^2 = ||shift||^2 remains.
  shift = np.arange(8) / 4
  np.testing.assert_allclose(fid_from_features(a, a + shift), shift @ shift, rtol=1e-9)
  # Independent 1-D sets: (mu1 - mu2)^2 + (s1 - s2)^2 with s the standard deviations.
  x, y = np.array([[0.0], [2.0]]), np.array([[1.0], [4.0], [7.0]])
  s1, s2 = np.sqrt(2.0), 3.0
  np.testing.assert_allclose(fid_from_features(x, y), (1 - 4) ** 2 + (s1 - s2) ** 2, rtol=1e-12)


@pytest.mark.parametrize("a,b,message", [
    (np.zeros((1, 4)), np.zeros((5, 4)), "N >= 2"),
    (np.zeros((5, 4)), np.zeros((5, 3)), "same feature size"),
    (np.zeros(5), np.zeros((5, 1)), r"\[N, D\]"),
    (np.full((5, 2), np.inf), np.zeros((5, 2)), "non-finite"),
])
def test_fid_rejects(a, b, message):
  with pytest.raises(ValueError, match=message):
    fid_from_features(a, b)


# ---------------------------------------------------------------------------------------------
# Inception Score.

def is_torchmetrics(logits, splits, seed=0):
  """torchmetrics' IS of float64 logits, and the permutation its `compute` applies."""
  inception = torchmetrics_module("torchmetrics.image.inception")
  metric = inception.InceptionScore(feature=torch.nn.Identity(), splits=splits)
  metric.update(torch.from_numpy(logits))
  torch.manual_seed(seed)
  perm = torch.randperm(len(logits)).numpy()
  torch.manual_seed(seed)
  mean, std = metric.compute()
  return (mean.item(), std.item()), perm


def is_formula(logits, splits):
  """The IS formula with numpy and scipy, chunked like torch.chunk."""
  p = scipy.special.softmax(logits, axis=1)
  size = -(-len(p) // splits)
  scores = []
  for chunk in (p[i:i + size] for i in range(0, len(p), size)):
    py = chunk.mean(0)
    scores.append(np.exp(np.mean(scipy.special.rel_entr(chunk, py).sum(1))))
  return np.mean(scores), np.std(scores, ddof=1)


@pytest.mark.parametrize("n,c,splits", [(100, 1008, 10), (53, 20, 10), (60, 7, 4), (40, 5, 3)])
@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save")
def test_inception_score_matches_references(n, c, splits):
  logits = rng(n).normal(scale=3.0, size=(n, c))
  expected, perm = is_torchmetrics(logits, splits)
  np.testing.assert_allclose(inception_score(logits[perm], splits), expected, rtol=RTOL)
  np.testing.assert_allclose(inception_score(logits, splits), is_formula(logits, splits),
                             rtol=RTOL)


def test_inception_score_hand_cases():
  # Identical rows: p(y) = p(y|x), every KL is 0, every chunk scores 1.
  assert inception_score(np.zeros((50, 10))) == pytest.approx((1.0, 0.0), abs=1e-12)
  assert inception_score(np.tile(rng().normal(size=10), (50, 1))) == pytest.approx((1.0, 0.0),
                                                                             abs=1e-12)
  # C confident, distinct classes, C rows per chunk: each chunk scores C.
  one_hot = np.tile(np.eye(4) * 100.0, (5, 1))
  np.testing.assert_allclose(inception_score(one_hot, splits=5), (4.0, 0.0), atol=1e-9)
  # A class that underflows to 0 in every row adds 0 (torchmetrics' log(0) gives NaN).
  assert inception_score([[0.0, 0.0, -1e4], [0.0, 0.0, -1e4]], splits=1)[0] == 1.0


def test_inception_score_chunks_like_torch_chunk():
  # torch.chunk of 6 rows into 4 gives 3 chunks of 2: the std is over 3 scores.
  logits = rng().normal(size=(6, 3))
  expected = is_formula(logits, splits=4)
  assert len(torch.chunk(torch.zeros(6), 4)) == 3
  np.testing.assert_allclose(inception_score(logits, splits=4), expected, rtol=1e-12)
  mean, std = inception_score(logits, splits=1)
  assert np.isnan(std) and mean > 1


@pytest.mark.parametrize("logits,splits,message", [
    (np.zeros((5, 3)), 10, "cannot split 5 rows"),
    (np.zeros((5, 3)), 0, "positive int"),
    (np.zeros((5, 3)), 2.0, "positive int"),
    (np.zeros(5), 1, r"\[N, D\]"),
    (np.full((5, 3), np.nan), 1, "non-finite"),
])
def test_inception_score_rejects(logits, splits, message):
  with pytest.raises(ValueError, match=message):
    inception_score(logits, splits)


# ---------------------------------------------------------------------------------------------
# CLIP score.

def clip_score_torchmetrics(image_embeds, text_embeds):
  """torchmetrics' `CLIPScore`, with a stub CLIP whose features are the given embeddings."""
  stub = types.SimpleNamespace(
      config=types.SimpleNamespace(),
      get_image_features=lambda pixel_values: pixel_values.flatten(1),
      get_text_features=lambda ids, mask: torch.from_numpy(text_embeds)[ids],
  )
  stub.to = lambda device: stub

  def processor(images=None, text=None, **kwargs):
    if images is not None:  # Each "image" is its [1, 1, D] embedding.
      return {"pixel_values": torch.stack(images)}
    ids = torch.tensor([int(t) for t in text])  # Each "text" is its row number.
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

  clip = torchmetrics_module("torchmetrics.multimodal.clip_score")
  metric = clip.CLIPScore(model_name_or_path=lambda: (stub, processor))
  metric.update(list(torch.from_numpy(image_embeds)[:, None, None, :]),
                [str(i) for i in range(len(text_embeds))])
  return metric.compute().item()


def test_clip_score_matches_torchmetrics():
  r = rng(7)
  text = r.normal(size=(12, 32))
  image = 0.8 * text + r.normal(size=(12, 32))  # Related pairs: every cosine is positive.
  cos = np.sum(image * text, 1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
  assert np.all(cos > 0)
  ours = clip_score(image, text)
  np.testing.assert_allclose(ours, np.mean(100 * cos), rtol=1e-12)
  np.testing.assert_allclose(ours, clip_score_torchmetrics(image, text), rtol=RTOL)
  # Scale does not matter: normalised and raw embeddings give the same score.
  np.testing.assert_allclose(clip_score(5 * image, text / 3), ours, rtol=1e-12)


def test_clip_score_clips_each_pair():
  image = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  text = np.array([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])  # cos = 1, -1, 1/sqrt(2).
  np.testing.assert_allclose(clip_score(image, text), (100 + 0 + 100 / np.sqrt(2)) / 3,
                             rtol=1e-12)
  # torchmetrics clips the mean instead, which differs only when a cosine is negative.
  np.testing.assert_allclose(clip_score_torchmetrics(image, text),
                             (100 - 100 + 100 / np.sqrt(2)) / 3, rtol=RTOL)


@pytest.mark.parametrize("image,text,message", [
    (np.ones((3, 4)), np.ones((2, 4)), "same shape"),
    (np.zeros((2, 4)), np.ones((2, 4)), "all zeros"),
    (np.ones(4), np.ones(4), r"\[N, D\]"),
])
def test_clip_score_rejects(image, text, message):
  with pytest.raises(ValueError, match=message):
    clip_score(image, text)

