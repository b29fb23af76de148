"""Our trainer learns like the original: 150 steps of each on the same tiny model and data.

The torch side is the original algorithm (torch_livo.OriginalLiVO: four UNet calls, autograd,
torch AdamW and clipping) fed the same batches as our pipeline yields, with its own noise draws.
The recipe is the published one (hinge beta 1000 / alpha 500 / gamma1 1 / gamma2 0.5, AdamW
betas 0.9/0.999, wd 1e-2, clip 1) at lr 1e-3, which a 2-layer value encoder needs to move within
150 steps. The statistics of the last 50 steps must agree within their sampling noise.

What both show on a random-weight UNet: the first gap (theta_w - ref_w) settles near
-gamma1/beta = -1e-3, where its hinge term switches off; the second (ref_l - theta_l) stays
slightly positive: random features give the value token no image-dependent lever, so lowering
the error on aligned images lowers it on violating ones too.
"""

import json
import os

import numpy as np
import pytest

import torch_livo
from livo_jax import data
from livo_jax import train
from livo_jax import weights
from livo_data_fixture import write_livo_data
from train_fixtures import load_config

STEPS, LAST, LR = 150, 50, 1e-3
BATCH = 4


def stats(values):
  """(mean, standard error) of the last LAST values."""
  tail = np.asarray(values[-LAST:], np.float64)
  return tail.mean(), tail.std(ddof=1) / np.sqrt(LAST)


@pytest.fixture(scope="module")
def runs(sd_folder, tmp_path_factory):
  train_dir = write_livo_data(str(tmp_path_factory.mktemp("livo_data")), size=(16, 16))
  cache = str(tmp_path_factory.mktemp("prepared"))
  workdir = str(tmp_path_factory.mktemp("ours"))
  config = load_config(sd_folder, train_dir, **{
      "data.cache_dir": cache, "total_steps": STEPS, "batch_size": BATCH, "optim.lr": LR,
      "checkpoint_every": STEPS, "log_every": 1})
  train.train(config, workdir)
  with open(f"{workdir}/metrics.jsonl") as f:
    ours = [json.loads(line) for line in f]

  # The original, on the batches our pipeline makes (same seed), with its own draws.
  source = data.PreferenceSource(data.prepare(train_dir, cache_root=cache))
  tokenizer = weights.load_tokenizer(os.path.join(sd_folder, "tokenizer"))
  batches = data.train_iterator(source, tokenizer=tokenizer, resolution=16, global_batch=BATCH,
                                seed=config.seed, num_threads=1)
  original = torch_livo.OriginalLiVO(sd_folder, lr=LR)
  rng = np.random.default_rng(0)
  theirs = []
  for _ in range(STEPS):
    batch = next(batches)
    batch = {k: batch[k] for k in ("pixels_w", "pixels_l", "prompt_ids", "value_ids")}
    theirs.append(original.step(batch, torch_livo.random_draws(rng, BATCH, (8, 8, 4), 1000)))
  for m in theirs:
    m["gap_w"] = m["loss_theta_w"] - m["loss_ref_w"]
    m["gap_l"] = m["loss_ref_l"] - m["loss_theta_l"]
  return ours, theirs


@pytest.mark.parametrize("key", ["loss", "gap_w", "gap_l"])
def test_last_steps_agree_with_the_original(runs, key):
  ours, theirs = runs
  (mean_ours, se_ours), (mean_theirs, se_theirs) = (stats([m[key] for m in r]) for r in runs)
  assert abs(mean_ours - mean_theirs) <= 4 * np.hypot(se_ours, se_theirs), (
      f"{key}: ours {mean_ours:.4g} +- {se_ours:.2g}, original {mean_theirs:.4g} +- "
      f"{se_theirs:.2g}")


def test_gaps_settle_where_the_hinge_says(runs):
  gamma1_over_beta = 1.0 / 1000.0
  for metrics in runs:
    gap_w, _ = stats([m["gap_w"] for m in metrics])
    gap_l, _ = stats([m["gap_l"] for m in metrics])
    assert -1.4 * gamma1_over_beta < gap_w < -0.6 * gamma1_over_beta
    assert 0 < gap_l < 5 * gamma1_over_beta
    # and the loss came down from its start (about gamma1 + gamma2 = 1.5)
    first = np.mean([m["loss"] for m in metrics[:5]])
    assert stats([m["loss"] for m in metrics])[0] < first - 0.2
