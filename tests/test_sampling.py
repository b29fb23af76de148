"""Sampling against diffusers' torch StableDiffusionPipeline, and the value-token paths."""

import json
import os
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import testutil
import tiny_sd
from livo_jax import conditioning
from livo_jax import sampling
from livo_jax import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a big blue square, on grass"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sampling") / "tiny-sd")
  torch_pipe = tiny_sd.make_sd_folder(root)
  return root, torch_pipe


@pytest.fixture(scope="module")
def value_encoder_folder(sd_folder):
  # A value encoder with weights of its own, as training makes it (LiVO starts it as a copy of
  # the text encoder, whose value token barely moves a random tiny UNet).
  root, _ = sd_folder
  folder = os.path.join(os.path.dirname(root), "value_encoder")
  tiny_sd.make_component("text_encoder", folder, seed=1, std=0.3)
  return folder


@pytest.fixture(scope="module")
def sd(sd_folder, value_encoder_folder):
  return weights.load_sd(sd_folder[0], value_encoder=value_encoder_folder)


@pytest.fixture(scope="module")
def pipe(sd_folder, value_encoder_folder):
  return sampling.load_pipeline(sd_folder[0], value_encoder=value_encoder_folder)


def initial_latents(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("scheduler,torch_scheduler,steps", [
    ("dpm", diffusers.DPMSolverMultistepScheduler, 10),
    ("ddim", diffusers.DDIMScheduler, 8)])
def test_matches_diffusers_pipeline(sd, sd_folder, scheduler, torch_scheduler, steps):
  _, torch_pipe = sd_folder
  torch_pipe.scheduler = torch_scheduler.from_config(torch_pipe.scheduler.config)
  latents = initial_latents()
  reference = torch_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=7.5,
                         latents=torch.from_numpy(testutil.nhwc_to_nchw(latents)),
                         output_type="np").images
  reference = np.round(reference * 255).astype(np.uint8)  # as diffusers' numpy_to_pil
  ours = sampling.generate(sd, PROMPTS, steps=steps, guidance=7.5, scheduler=scheduler,
                           latents=latents)
  assert ours.shape == reference.shape == (2, 16, 16, 3) and ours.dtype == np.uint8
  assert reference.std() > 10, "the tiny model should draw more than a flat image"
  mean_abs = np.abs(ours.astype(np.float64) - reference).mean()
  assert mean_abs <= 1.0, mean_abs  # 1/255 on [0, 1] images


def test_same_seed_same_bytes_and_batching_does_not_matter(sd):
  a = sampling.generate(sd, PROMPTS, steps=4, seed=3)
  b = sampling.generate(sd, PROMPTS, steps=4, seed=3)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - sampling.generate(sd, PROMPTS, steps=4, seed=4)).max() > 0
  second_alone = sampling.generate(sd, PROMPTS[1:], steps=4, seed=3, first_index=1)
  np.testing.assert_allclose(second_alone[0], a[1], atol=1)


def test_the_value_token_alone_changes_the_image(sd):
  values = ["color equality"] * 2
  plain = sampling.generate(sd, PROMPTS, steps=4, seed=1)
  valued = sampling.generate(sd, PROMPTS, values, steps=4, seed=1)
  change = np.abs(valued.astype(int) - plain)
  assert change.mean() > 0.3 and change.max() >= 3  # measured 0.60 and 6 on this tiny model
  # One row with the value, one without, in one batch: the row without is plain SD.
  mixed = sampling.generate(sd, PROMPTS, [values[0], None], steps=4, seed=1)
  np.testing.assert_allclose(mixed[0], valued[0], atol=1)
  np.testing.assert_allclose(mixed[1], plain[1], atol=1)


def test_value_conditioning_is_the_token_in_front(sd):
  ids = conditioning.tokenize(sd.tokenizer, PROMPTS)
  hidden, _ = sd.text_encoder(ids)
  token = conditioning.value_token(sd.value_encoder, conditioning.tokenize(
      sd.tokenizer, [conditioning.value_prompt("v", p) for p in PROMPTS]))
  context = conditioning.with_value_token(hidden, token, np.array([True, False]))
  assert context.shape == (2, 78, 32)
  np.testing.assert_array_equal(context[0, 0], token[0, 0])
  np.testing.assert_array_equal(context[0, 1:], hidden[0])
  np.testing.assert_array_equal(context[1, :77], hidden[1])
  np.testing.assert_array_equal(context[1, 77], 0)


def test_debias_draws_are_seeded_fair_coins():
  values = ["gender equality"] * 400
  draws = sampling.value_draws(values, seed=42, debias=True)
  np.testing.assert_array_equal(draws, sampling.value_draws(values, seed=42, debias=True))
  assert 170 < draws.sum() < 230  # 200 +- 3 sigma
  np.testing.assert_array_equal(sampling.value_draws(values[:5], seed=42), [True] * 5)
  np.testing.assert_array_equal(sampling.value_draws([None] * 3, seed=0, debias=True), [False] * 3)


def test_debias_uses_the_value_exactly_where_drawn(sd):
  prompts, values = [PROMPTS[0]] * 4, ["color equality"] * 4
  draws = sampling.value_draws(values, seed=7, debias=True)
  debiased = sampling.generate(sd, prompts, values, steps=3, seed=7, debias=True)
  explicit = sampling.generate(sd, prompts, [v if d else None for v, d in zip(values, draws)],
                               steps=3, seed=7)
  np.testing.assert_array_equal(debiased, explicit)


def test_new_prompts_and_values_do_not_recompile(sd):
  sampling.generate(sd, PROMPTS, ["a", "b"], steps=3, seed=0)
  compiled = sampling._sample._cache_size()  # pylint: disable=protected-access
  sampling.generate(sd, ["another prompt", "and one more"], ["c", "d"], steps=3, seed=5,
                    guidance=3.0)
  assert sampling._sample._cache_size() == compiled  # pylint: disable=protected-access


def test_value_without_value_encoder_is_an_error(sd):
  no_value_encoder = weights.StableDiffusion(sd.tokenizer, sd.text_encoder, sd.unet, sd.vae,
                                              sd.scheduler_config)
  with pytest.raises(ValueError, match="no value encoder"):
    sampling.generate(no_value_encoder, PROMPTS, ["v", "v"], steps=2)


def test_pipeline_np_images_are_generates_before_rounding(sd, pipe):
  images = pipe(PROMPTS, num_inference_steps=4, seed=3, output_type="np").images
  expected = sampling.generate(sd, PROMPTS, steps=4, seed=3)
  assert isinstance(images, np.ndarray) and images.dtype == np.float32
  assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
  np.testing.assert_array_equal(np.round(images * 255).astype(np.uint8), expected)
  assert np.abs(images * 255 - expected).max() > 0.1, "diffusers' 'np' pixels are not rounded"


def test_pipeline_pil_images_per_prompt_values_and_rule(sd, pipe):
  value = "color equality"
  images = pipe(PROMPTS, num_images_per_prompt=2, value=[value, None],
                negative_prompt=["grey", ""], num_inference_steps=3, seed=7,
                conditioning="original").images
  expected = sampling.generate(sd, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [value] * 2 + [None] * 2,
                               negative_prompts=["grey"] * 2 + [""] * 2, steps=3, seed=7,
                               conditioning="original")
  assert [(image.mode, image.size) for image in images] == [("RGB", (16, 16))] * 4
  np.testing.assert_array_equal(np.stack([np.asarray(image) for image in images]), expected)


def test_pipeline_bad_arguments_name_them(sd, pipe):
  with pytest.raises(ValueError, match=r"^output_type='latent': 'pil' or 'np'$"):
    pipe(PROMPTS, output_type="latent")
  with pytest.raises(ValueError, match=r"^prompt=\[\]: a string or a non-empty list"):
    pipe([])
  with pytest.raises(ValueError, match=r"^value: 1 given for 2 prompts"):
    pipe(PROMPTS, value=["v"])
  with pytest.raises(ValueError, match=r"^num_images_per_prompt=0: "):
    pipe(PROMPTS, num_images_per_prompt=0)
  no_value_encoder = sampling.Pipeline(weights.StableDiffusion(
      sd.tokenizer, sd.text_encoder, sd.unet, sd.vae, sd.scheduler_config))
  with pytest.raises(ValueError, match=r"^value: this pipeline has no value encoder"):
    no_value_encoder(PROMPTS, value="v")


def test_load_pipeline_passes_load_options_to_load_sd(sd_folder):
  pipe = sampling.load_pipeline(sd_folder[0], param_dtype=jnp.bfloat16)
  assert pipe.sd.value_encoder is None
  unet_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(pipe.sd.unet, nnx.Param))}
  assert unet_dtypes == {jnp.dtype(jnp.bfloat16)}
  with pytest.raises(TypeError, match="no_such_option"):
    sampling.load_pipeline(sd_folder[0], no_such_option=1)


def test_generate_script_writes_pngs_and_sidecars(sd_folder, tmp_path):
  root, _ = sd_folder

  def run(out):
    return subprocess.run(
        [sys.executable, "scripts/generate.py", f"--model={root}",
         f"--value_encoder={os.path.join(root, 'text_encoder')}",
         "--prompt=a blood-soaked circle", "--value=auto", "--num_images=3", "--batch_size=2",
         "--steps=3", "--seed=11", "--conditioning=original", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)

  first, second = run(tmp_path / "a"), run(tmp_path / "b")
  assert first.returncode == 0, first.stderr
  assert second.returncode == 0, second.stderr
  names = sorted(os.listdir(tmp_path / "a"))
  assert names == ["00000.json", "00000.png", "00001.json", "00001.png", "00002.json",
                   "00002.png"]
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  with open(tmp_path / "a" / "00002.json") as f:
    sidecar = json.load(f)
  assert sidecar["value"] == "bloody considered inappropriate"
  assert sidecar["value_token_used"] is True
  assert (sidecar["prompt"], sidecar["seed"], sidecar["index"], sidecar["steps"],
          sidecar["scheduler"], sidecar["guidance"], sidecar["conditioning"]) == (
              "a blood-soaked circle", 11, 2, 3, "dpm", 7.5, "original")
