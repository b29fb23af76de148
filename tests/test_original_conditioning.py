"""conditioning="original" against the original LiVO's sampling, re-run in torch.

The reference is the original's evaluation code (its `LiVO.generate`) on the tiny SD: the prompt
tokenised to 76 without padding, the torch value encoder's pooled output of "<value>, <prompt>"
put in front, and diffusers' StableDiffusionPipeline given those `prompt_embeds`, which builds
the unconditional half of guidance itself; a row without a value is the plain pipeline.
"""

import json
import os

import diffusers
import numpy as np
import pytest
import torch
import transformers

import testutil
import tiny_sd
from livo_jax import conditioning
from livo_jax import sampling
from livo_jax import weights

VALUE = "color equality"
SHORT = "a red circle"         # 10 characters (one id each): 12 ids with BOS and EOS
LONG = ("a big blue square on green grass next to a small yellow triangle, under a grey sky, "
        "drawn with thick lines")   # 86 characters and spaces: cut at 76 ids, or at 77
ROWS = [  # (prompt, value, negative prompt)
    (SHORT, VALUE, "a blurry grey picture"),   # the negative is cut to the 13 ids of the row
    (LONG, VALUE, ""),
    ("a square", None, "grey"),                # no value: plain SD
]
STEPS = 8
# On [0, 1] pixels. Measured: 6.3e-6 at most (the training rule: 0.18 and 4.1e-3 off on the two
# value rows, 3.6e-6 on the plain one).
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def models(sd_folder, tmp_path_factory):
  """(our bundle, the torch pipeline, the torch value encoder), from the same folders."""
  value_encoder = str(tmp_path_factory.mktemp("original") / "value_encoder")
  tiny_sd.make_component("text_encoder", value_encoder, seed=1, std=0.3)
  torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
  torch_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
      torch_pipe.scheduler.config)
  torch_pipe.set_progress_bar_config(disable=True)
  return (weights.load_sd(sd_folder, value_encoder=value_encoder), torch_pipe,
          transformers.CLIPTextModel.from_pretrained(value_encoder))


@torch.no_grad()
def original_image(torch_pipe, value_encoder, prompt, value, negative_prompt, latents):
  """One image as the original's evaluation makes it: float32 [H, W, 3] in [0, 1]."""
  tokenizer = torch_pipe.tokenizer
  common = dict(negative_prompt=negative_prompt, num_inference_steps=STEPS, guidance_scale=7.5,
                latents=torch.from_numpy(testutil.nhwc_to_nchw(latents[None])),
                output_type="np")
  if value is None:
    return torch_pipe(prompt, **common).images[0]
  input_ids = tokenizer(prompt, max_length=tokenizer.model_max_length - 1, truncation=True,
                        return_tensors="pt").input_ids
  prompt_embeds = torch_pipe.text_encoder(input_ids)[0]
  value_input_ids = tokenizer(value + ", " + prompt, truncation=True,
                              return_tensors="pt").input_ids
  value_embeds = value_encoder(value_input_ids)[1]
  concat_embeds = torch.cat([value_embeds.unsqueeze(1), prompt_embeds], dim=1)
  return torch_pipe(prompt_embeds=concat_embeds, **common).images[0]


def test_original_token_ids_and_lengths(models):
  sd, _, _ = models
  vocab = {token: i for i, token in enumerate(tiny_sd.VOCAB)}
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  prompts, values, negatives = zip(*ROWS)
  use_value = [v is not None for v in values]
  original = conditioning.guidance_tokens(sd.tokenizer, prompts, negatives, use_value, "original")
  training = conditioning.guidance_tokens(sd.tokenizer, prompts, negatives, use_value)
  # SHORT: 12 ids plus the value token; LONG: 76 ids plus the value token; plain SD: 77.
  np.testing.assert_array_equal(original.cond_lengths, [13, 77, 77])
  np.testing.assert_array_equal(original.uncond_lengths, [13, 77, 77])
  np.testing.assert_array_equal(training.cond_lengths, [78, 78, 77])
  np.testing.assert_array_equal(training.uncond_lengths, [77, 77, 77])
  # The negative prompt of SHORT's row cut to 13 ids: its first 11 characters between BOS, EOS.
  chars = ["a</w>", "b", "l", "u", "r", "r", "y</w>", "g", "r", "e", "y</w>"]
  np.testing.assert_array_equal(original.negative_ids[0, :13], [bos, *map(vocab.get, chars), eos])
  np.testing.assert_array_equal(original.negative_ids[0, 13:], eos)  # eos is also the padding
  # LONG cut at 76 ids ends with EOS at 75, where 77 ids hold its 75th character ("t").
  assert original.prompt_ids[1, 75] == eos and training.prompt_ids[1, 75] == vocab["t"]
  np.testing.assert_array_equal(original.prompt_ids[1, :75], training.prompt_ids[1, :75])
  np.testing.assert_array_equal(original.prompt_ids[2], training.prompt_ids[2])
  np.testing.assert_array_equal(original.negative_ids[2], training.negative_ids[2])


def test_an_unknown_rule_names_conditioning(models):
  sd, _, _ = models
  with pytest.raises(ValueError, match=r"^conditioning='paper': one of 'training', 'original'$"):
    sampling.generate(sd, [SHORT], [VALUE], steps=2, conditioning="paper")


def test_original_matches_the_torch_loop(models):
  sd, torch_pipe, value_encoder = models
  prompts, values, negatives = zip(*ROWS)
  latents = np.random.default_rng(0).standard_normal((len(ROWS), 8, 8, 4)).astype(np.float32)
  reference = np.stack([original_image(torch_pipe, value_encoder, *row, x)
                        for row, x in zip(ROWS, latents)])
  run = lambda rule: sampling.generate(sd, prompts, values, negative_prompts=negatives,
                                       steps=STEPS, scheduler="dpm", latents=latents,
                                       conditioning=rule, float_pixels=True)
  ours, training = run("original"), run("training")
  assert ours.shape == reference.shape == (3, 16, 16, 3) and ours.dtype == np.float32
  assert reference.std() > 0.05, "the tiny model should draw more than a flat image"
  difference = np.abs(ours - reference).max(axis=(1, 2, 3))
  assert (difference <= TOLERANCE).all(), difference
  # The test tells the rules apart: the training rule is far off the original on value rows.
  training_difference = np.abs(training - reference).max(axis=(1, 2, 3))
  assert (training_difference[:2] > 10 * TOLERANCE).all(), training_difference
  assert training_difference[2] <= TOLERANCE, training_difference


def test_write_images_records_the_rule(models, tmp_path):
  sd, _, _ = models
  out = str(tmp_path / "out")
  paths = sampling.write_images(sd, out, prompt=SHORT, value=VALUE, num_images=1, steps=2,
                                conditioning="original")
  with open(paths[0].replace(".png", ".json")) as f:
    assert json.load(f)["conditioning"] == "original"
  with pytest.raises(ValueError, match="conditioning='x'"):
    sampling.write_images(sd, str(tmp_path / "bad"), prompt=SHORT, value=VALUE, num_images=1,
                          conditioning="x")
  assert not os.path.exists(tmp_path / "bad")
