"""A tiny random Stable Diffusion in diffusers' torch format, built by the tests.

Its parts are SD 1.5 in miniature: a character-level CLIP tokenizer (77 tokens), a legacy
`eos_token_id == 2` CLIP text encoder, a two-level UNet with cross-attention, a two-level VAE
(images are 2x the latents) and SD 1.5's PNDM scheduler config.
"""

import json
import os
import string

import diffusers
import torch
import transformers

import testutil

_CHARS = list(string.ascii_lowercase) + list(",.!?'-0123456789")
VOCAB = _CHARS + [c + "</w>" for c in _CHARS] + ["<|startoftext|>", "<|endoftext|>"]

CLIP_CONFIG = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                   eos_token_id=2, bos_token_id=0, pad_token_id=1)
UNET_CONFIG = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                   attention_head_dim=4, norm_num_groups=8, sample_size=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
VAE_CONFIG = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, sample_size=16,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False}


def write_tokenizer(folder: str) -> None:
  """A character-level CLIP BPE tokenizer (no merges) that `CLIPTokenizer` loads."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({token: i for i, token in enumerate(VOCAB)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f)


def torch_component(kind: str, seed: int = 0, std: float = 0.1, **overrides):
  """A random torch text encoder, UNet or VAE of the tiny SD (`overrides` change its config)."""
  return testutil.randomize({
      "text_encoder": lambda: transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**{**CLIP_CONFIG, **overrides})),
      "unet": lambda: diffusers.UNet2DConditionModel(**{**UNET_CONFIG, **overrides}),
      "vae": lambda: diffusers.AutoencoderKL(**{**VAE_CONFIG, **overrides}),
  }[kind](), seed=seed, std=std)


def make_sd_folder(root: str, seed: int = 0, std: float = 0.1, *, clip=None, unet=None,
                   vae=None):
  """Writes a whole diffusers SD folder; returns the torch pipeline read back from it.

  `clip`, `unet`, `vae` override parts of the tiny configs (the benchmarks make bigger ones).
  The scheduler config is SD 1.5's file verbatim: which keys it lacks decides the defaults of
  the samplers made from it (diffusers' `from_config` uses each class's own default for those).
  """
  write_tokenizer(os.path.join(root, "tokenizer"))
  pipe = diffusers.StableDiffusionPipeline(
      vae=torch_component("vae", seed, std, **(vae or {})),
      text_encoder=torch_component("text_encoder", seed, std, **(clip or {})),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
      unet=torch_component("unet", seed, std, **(unet or {})),
      scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root)
  with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SD15_SCHEDULER, f)
  return diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None)


def make_component(kind: str, folder: str, *, dtype=torch.float32, seed: int = 0,
                   std: float = 0.1):
  """Writes one torch component folder; returns the torch model."""
  model = torch_component(kind, seed, std).to(dtype)
  model.save_pretrained(folder)
  return model
