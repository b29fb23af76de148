"""Pretrains the CPU demo's base model: a tiny Stable Diffusion of the shapes world.

  folder = pretrain.build_base_model("demo/base")     # a diffusers SD folder, minutes on a CPU

Two stages, each one jitted step in a loop, on `shapes.base_training_set` (16 px images):
1. the VAE (images 16 px <-> latents 8x8x4), on pixel MSE plus a small KL term; its
   `scaling_factor` is then set so that scaled latents have unit variance;
2. the CLIP text encoder and the UNet together, from scratch, on the epsilon loss over the
   scaled latents of the whole set (encoded once), with captions dropped to "" so that
   classifier-free guidance works (`CAPTION_DROPOUT`).

The folder is what diffusers' `StableDiffusionPipeline.from_pretrained` and `weights.load_sd`
read, plus `pretrain.json` (settings, per-step losses, timings). Colourless captions show red
70% of the time in the data: the base learns that bias, which the demo's "color equality" value
then removes. Everything is deterministic for a seed. Timings and the base's measured accuracy
are in docs/demo.md.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from livo_jax import conditioning
from livo_jax import files
from livo_jax import hf_config
from livo_jax import schedulers
from livo_jax import weights
from livo_jax.demo import shapes
from livo_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from livo_jax.models.vae import sample_latent
from livo_jax.train import optim as optim_lib

# diffusers-style config.json fields of each component; `build_base_model(configs=...)` overrides
# them. Sizes are what two CPU cores train in minutes.
VAE_CONFIG = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
    sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    # Single flat shapes reconstruct without it, and it is a large share of the step's time.
    mid_block_add_attention=False)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=shapes.MAX_LENGTH)
# Cross-attention at the 4x4 level (and the mid block) only: colour and shape are decided
# coarsely, and attention at 8x8 costs most of the step (docs/demo.md).
UNET_CONFIG = dict(
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
    sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
# SD 1.5's PNDM config but for two fields. beta_end 0.02 (SD: 0.012) leaves the mean colour of
# 8x8x4 latents unreadable at t = 999 (SD's leaves it an SNR near 1 over 256 latent values: the
# model could learn to read it there, and sampling from pure noise would lack it); "trailing"
# spacing starts sampling at t = 999 rather than 961.
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", "beta_start": 0.00085,
    "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False, "prediction_type": "epsilon",
    "timestep_spacing": "trailing"}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

# The share of captions dropped to "" for classifier-free guidance, drawn from the colourless
# captions only (half of them): the unconditional model then learns colourless images, red 70%
# of the time, so guidance sharpens what a prompt says (a colour, a shape) more than the red
# bias of prompts that name no colour (dropping from all captions makes "" the data's overall
# mix, and guidance then pushes colourless prompts to red; docs/demo.md has the measurements).
CAPTION_DROPOUT = 0.25
KL_WEIGHT = 1e-4     # per latent value, against a per-pixel MSE: latents stay near-deterministic
LOG_FILE = "pretrain.json"


WARMUP_STEPS = 50


def optim_settings(lr: float, steps: int) -> ml_collections.FrozenConfigDict:
  """The trainer's optimizer settings for one stage: AdamW, warmup then cosine decay to a
  tenth, clipping at global norm 1 (hashable: the jitted step takes them as static)."""
  return ml_collections.FrozenConfigDict(dict(
      lr=lr, schedule="cosine", warmup_steps=min(WARMUP_STEPS, steps // 2),
      final_lr_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, max_grad_norm=1.0))


def build_base_model(out_dir: str, *, num_images: int = 20_000, vae_steps: int = 300,
                     unet_steps: int = 1000, batch_size: int = 128, vae_batch_size: int = 64,
                     vae_lr: float = 2e-3, unet_lr: float = 2e-3, seed: int = 0,
                     configs: Mapping[str, Mapping[str, Any]] | None = None,
                     log: Callable[[str], None] = print) -> str:
  """Pretrains the base model and writes it as a diffusers SD folder; returns its path.

  Args:
    out_dir: the folder to create; it must not exist. It is written next to itself under a
      temporary name and renamed when complete, so it is never half written.
    num_images: size of the training set (`shapes.base_training_set(num_images, seed)`).
    vae_steps, vae_batch_size, vae_lr: the VAE stage.
    unet_steps, batch_size, unet_lr: the text encoder + UNet stage.
    seed: data, initialisation and training draws.
    configs: config.json fields overriding the defaults, per component: {"vae": {...},
      "text_encoder": {...}, "unet": {...}} (the UNet's cross_attention_dim always follows the
      text encoder's width).
    log: progress lines (a tqdm bar also shows each stage).
  Returns:
    The absolute path of the folder.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} exists; remove it to pretrain again")
  model_configs = _model_configs(configs or {})  # config errors before any work
  with files.atomic_folder(out_dir) as work:
    _build(work, num_images=num_images, vae_steps=vae_steps, unet_steps=unet_steps,
           batch_size=batch_size, vae_batch_size=vae_batch_size, vae_lr=vae_lr,
           unet_lr=unet_lr, seed=seed, configs=model_configs, log=log)
  return out_dir


def _model_configs(overrides: Mapping[str, Mapping[str, Any]]) -> dict:
  """The VAE, text encoder and UNet configs: the defaults with `overrides` applied."""
  unknown = set(overrides) - {"vae", "text_encoder", "unet"}
  if unknown:
    raise ValueError(f"configs: unknown components {sorted(unknown)} "
                     "(known: vae, text_encoder, unet)")
  text = weights.CLIP_TEXT.config_from_dict({
      "vocab_size": shapes.vocab_size(), **shapes.special_token_ids(), **TEXT_CONFIG,
      **overrides.get("text_encoder", {})})
  return dict(
      vae=weights.VAE.config_from_dict({**VAE_CONFIG, **overrides.get("vae", {})}),
      text_encoder=text,
      unet=weights.UNET.config_from_dict({**UNET_CONFIG, **overrides.get("unet", {}),
                                 "cross_attention_dim": text.hidden_size}))


def _build(folder, *, num_images, vae_steps, unet_steps, batch_size, vae_batch_size, vae_lr,
           unet_lr, seed, configs, log) -> None:
  start = time.perf_counter()
  images, captions, _ = shapes.base_training_set(num_images, seed)
  pixels = jnp.asarray(images, jnp.float32) / 127.5 - 1
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 5))
  record = dict(settings=dict(num_images=num_images, vae_steps=vae_steps, unet_steps=unet_steps,
                              batch_size=batch_size, vae_batch_size=vae_batch_size,
                              vae_lr=vae_lr, unet_lr=unet_lr, seed=seed),
                configs={k: hf_config.to_dict(c) for k, c in configs.items()})

  log(f"pretrain: {num_images} images; VAE {vae_steps} steps of {vae_batch_size}, "
      f"text encoder + UNet {unet_steps} steps of {batch_size}")
  vae = AutoencoderKL(configs["vae"], rngs=nnx.Rngs(next(keys)))
  record["vae"] = _fit("vae", vae, _vae_loss, dict(pixels=pixels), steps=vae_steps,
                       batch_size=vae_batch_size, optim=optim_settings(vae_lr, vae_steps),
                       key=next(keys), log=log)

  moments = _encode(vae, pixels)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  # SD's convention: 1 / std of the latents the diffusion model sees (posterior draws).
  variance = jnp.var(mean) + jnp.mean(jnp.exp(logvar))
  vae.config = dataclasses.replace(vae.config, scaling_factor=float(1 / jnp.sqrt(variance)))
  record["scaling_factor"] = vae.config.scaling_factor
  log(f"vae: scaling_factor {vae.config.scaling_factor:.4f}")

  shapes.write_tokenizer(os.path.join(folder, "tokenizer"))
  tokenizer = weights.load_tokenizer(os.path.join(folder, "tokenizer"))
  # The training set has a few dozen distinct captions: the text encoder runs on each once per
  # step (the unconditional "" last) and samples pick theirs by index.
  texts = sorted(set(captions)) + [""]
  index = {text: i for i, text in enumerate(texts)}
  text_encoder = CLIPTextModel(configs["text_encoder"], rngs=nnx.Rngs(next(keys)))
  unet = UNet2DConditionModel(configs["unet"], rngs=nnx.Rngs(next(keys)))
  scheduler_config = schedulers.SchedulerConfig.from_dict(SCHEDULER_CONFIG)
  # Each image's chance that its caption becomes "" (see CAPTION_DROPOUT).
  colourless = np.array([not set(c.split()) & set(shapes.COLOURS) for c in captions])
  dropout = np.minimum(colourless * CAPTION_DROPOUT / max(colourless.mean(), 1e-9), 1)
  data = dict(moments=moments, captions=jnp.asarray([index[c] for c in captions], jnp.int32),
              dropout=jnp.asarray(dropout, jnp.float32),
              text_ids=jnp.asarray(conditioning.tokenize(tokenizer, texts)),
              alphas_cumprod=jnp.asarray(schedulers.alphas_cumprod(scheduler_config)),
              scaling_factor=jnp.float32(vae.config.scaling_factor))
  record["unet"] = _fit("unet", (text_encoder, unet), _diffusion_loss, data, steps=unet_steps,
                        batch_size=batch_size, optim=optim_settings(unet_lr, unet_steps),
                        key=next(keys), log=log)

  for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
    weights.save_pretrained(model, os.path.join(folder, name))
  os.makedirs(os.path.join(folder, "scheduler"))
  files.write_json(SCHEDULER_CONFIG, os.path.join(folder, "scheduler", schedulers.CONFIG_NAME))
  files.write_json(MODEL_INDEX, os.path.join(folder, "model_index.json"))
  record["seconds"] = time.perf_counter() - start
  files.write_json(record, os.path.join(folder, LOG_FILE))
  log(f"pretrain: done in {record['seconds']:.0f} s")


def _vae_loss(vae, data, key, batch_size):
  """Pixel MSE of reconstructions from posterior draws, plus KL_WEIGHT x the mean KL."""
  pick, draw = jax.random.split(key)
  x = data["pixels"][jax.random.randint(pick, (batch_size,), 0, len(data["pixels"]))]
  mean, logvar = vae.encode(x)
  reconstruction = vae.decode(sample_latent(mean, logvar, jax.random.normal(draw, mean.shape)))
  kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1 - logvar)
  return jnp.mean((reconstruction - x) ** 2) + KL_WEIGHT * kl


def _diffusion_loss(models, data, key, batch_size):
  """SD's epsilon loss on scaled posterior draws, some colourless captions dropped to "".

  Timesteps are drawn with density rising linearly in t rather than uniformly. The epsilon loss
  weighs an error in the clean latent by SNR(t), tiny at the high noise levels where colour and
  shape are decided, so uniform draws learn the captions slowly (docs/demo.md).
  """
  text_encoder, unet = models
  pick, draw, drop, noise_key, time_key = jax.random.split(key, 5)
  rows = jax.random.randint(pick, (batch_size,), 0, len(data["moments"]))
  mean, logvar = jnp.split(data["moments"][rows], 2, axis=-1)
  latents = sample_latent(mean, logvar, jax.random.normal(draw, mean.shape))
  latents = latents * data["scaling_factor"]
  unconditional = len(data["text_ids"]) - 1
  captions = jnp.where(jax.random.bernoulli(drop, data["dropout"][rows]),
                       unconditional, data["captions"][rows])
  context = text_encoder(data["text_ids"])[0][captions]         # [B, 77, D]
  noise = jax.random.normal(noise_key, latents.shape)
  # Density rising linearly in t (see _diffusion_loss's docstring).
  t = (len(data["alphas_cumprod"]) * jnp.sqrt(jax.random.uniform(time_key, (batch_size,))))
  t = t.astype(jnp.int32)
  noisy = schedulers.add_noise(data["alphas_cumprod"], latents, noise, t)
  return jnp.mean((unet(noisy, t, context) - noise) ** 2)


def _fit(name, models, loss_fn, data, *, steps, batch_size, optim, key, log) -> dict:
  """Trains `models` in place for `steps` jitted steps; returns the per-step losses and time."""
  graphdef, params = nnx.split(models)
  step = functools.partial(_train_step, graphdef=graphdef, loss_fn=loss_fn,
                           batch_size=batch_size, optim=optim, steps=steps)
  opt_state = optim_lib.make_optimizer(optim, steps)[0].init(params)
  losses = []
  every = max(steps // 10, 1)
  start = time.perf_counter()
  with tqdm.tqdm(total=steps, desc=name, leave=False) as bar:
    for i, step_key in enumerate(jax.random.split(key, steps)):
      params, opt_state, loss = step(params, opt_state, data, step_key)
      losses.append(float(loss))
      bar.update()
      if i == 0:
        compiled = time.perf_counter()  # rates leave out the first step's compilation
      if (i + 1) % every == 0 or i + 1 == steps:
        rate = i * batch_size / max(time.perf_counter() - compiled, 1e-9)
        log(f"{name}: step {i + 1}/{steps}, loss {np.mean(losses[-every:]):.4f} "
            f"({rate:.0f} samples/s)")
  nnx.update(models, params)
  return dict(losses=losses, seconds=time.perf_counter() - start)


# Module-level, so that a second run with the same settings reuses the compiled step.
@functools.partial(jax.jit,
                   static_argnames=("graphdef", "loss_fn", "batch_size", "optim", "steps"))
def _train_step(params, opt_state, data, key, *, graphdef, loss_fn, batch_size, optim, steps):
  loss, grads = jax.value_and_grad(
      lambda p: loss_fn(nnx.merge(graphdef, p), data, key, batch_size))(params)
  updates, opt_state = optim_lib.make_optimizer(optim, steps)[0].update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _encode(vae, pixels, chunk: int = 1000):
  """VAE posterior moments [N, h, w, 2C] (mean, logvar) of all images, in jitted chunks."""
  graphdef, state = nnx.split(vae)
  return jnp.concatenate([_encode_chunk(state, pixels[i:i + chunk], graphdef=graphdef)
                          for i in range(0, len(pixels), chunk)])


@functools.partial(jax.jit, static_argnames="graphdef")
def _encode_chunk(state, pixels, *, graphdef):
  return nnx.merge(graphdef, state).moments(pixels)
