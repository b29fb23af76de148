"""The base-model pretraining, shortened: the folder it writes, its losses, its determinism.

The quality of the full run (colour and shape accuracy, the learned red bias) is measured by
`pretrain.judge_base_model` and reported, not asserted: minutes of CPU per run.
"""

import json
import os
import pathlib

import diffusers
import numpy as np
import pytest
import transformers

from livo_jax.demo import pretrain
from livo_jax import sampling
from livo_jax.demo import shapes
from livo_jax import weights
from livo_jax.weights import load_vae

# Small everything: the run's cost is compilation, which the second build skips (same shapes).
TINY = dict(
    num_images=256, vae_steps=30, unet_steps=30, batch_size=16, vae_batch_size=16,
    configs=dict(vae=dict(block_out_channels=(8, 16)),
                 text_encoder=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2),
                 unet=dict(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",))))
COMPONENTS = (("text_encoder", transformers.CLIPTextModel),
              ("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrain")
  lines = []
  folder = pretrain.build_base_model(str(root / "base"), seed=0, log=lines.append, **TINY)
  return folder, lines


def test_writes_a_complete_sd_folder(built):
  folder, lines = built
  assert sorted(os.listdir(os.path.dirname(folder))) == ["base"]   # no temporary left over
  assert sorted(os.listdir(folder)) == ["model_index.json", pretrain.LOG_FILE, "scheduler",
                                        "text_encoder", "tokenizer", "unet", "vae"]
  assert lines[0].startswith("pretrain:") and lines[-1].startswith("pretrain: done")
  for name, cls in COMPONENTS:
    _, info = cls.from_pretrained(os.path.join(folder, name), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), name
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
  assert pipe.safety_checker is None and pipe.feature_extractor is None
  assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 16
  assert pipe.tokenizer("a small red circle").input_ids[1:-1] == [
      pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "small", "red", "circle")]


def test_vae_scaling_gives_unit_variance_latents(built):
  vae = load_vae(os.path.join(built[0], "vae"))
  images, _, _ = shapes.base_training_set(TINY["num_images"], seed=0)   # the training set
  mean, logvar = vae.encode(images.astype(np.float32) / 127.5 - 1)
  # The variance of posterior draws: of the means, plus the mean posterior variance.
  variance = (np.var(mean) + np.mean(np.exp(logvar))) * vae.scaling_factor**2
  assert variance == pytest.approx(1, abs=1e-3)


def test_our_sampler_generates_at_16_px(built):
  sd = weights.load_sd(built[0])
  assert sd.default_size == 16
  images = sampling.generate(sd, ["a red circle", "a square"], steps=4, guidance=5.0)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_losses_go_down(built):
  with open(os.path.join(built[0], pretrain.LOG_FILE)) as f:
    record = json.load(f)
  for stage in ("vae", "unet"):
    losses = record[stage]["losses"]
    assert len(losses) == TINY[f"{stage}_steps"]
    # Measured: VAE 1.0 -> 0.3, UNet 1.2 -> 0.6.
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), stage


def test_same_seed_same_weights(built, tmp_path):
  def weights(folder):
    return {(name, file): pathlib.Path(folder, name, file).read_bytes()
            for name, _ in COMPONENTS for file in os.listdir(os.path.join(folder, name))}

  again = pretrain.build_base_model(str(tmp_path / "again"), seed=0, log=lambda _: None, **TINY)
  assert weights(again) == weights(built[0])


def test_refuses_an_existing_folder_and_bad_configs(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError):
    pretrain.build_base_model(str(tmp_path / "taken"), **TINY)
  with pytest.raises(ValueError, match="unknown components"):
    pretrain.build_base_model(str(tmp_path / "new"), **dict(TINY, configs=dict(clip={})))
  assert sorted(os.listdir(tmp_path)) == ["taken"]


class Interrupted(Exception):
  pass


def test_a_failure_midway_leaves_no_folder(tmp_path):
  def log(line):
    if line.startswith("unet:"):    # the tokenizer and the VAE stage are done by then
      raise Interrupted

  with pytest.raises(Interrupted):
    pretrain.build_base_model(str(tmp_path / "base"), log=log, **TINY)
  assert not os.listdir(tmp_path)
