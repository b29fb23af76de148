"""Value-conditioned Stable Diffusion sampling, the whole loop compiled once.

  sd = load_pipeline("sd15", value_encoder="livo/value_encoder")
  images = generate(sd, ["a photo of a doctor"] * 4, values=["gender equality"] * 4,
                    debias=True, seed=42)                # uint8 [4, 512, 512, 3]

One jitted function does everything between token ids and uint8 pixels: the text and value
encoders, classifier-free guidance (cond and uncond in one UNet call of 2B), the scheduler steps
in a `lax.scan`, and the VAE decode. Prompts, values and the guidance scale are traced inputs, so
changing them never recompiles; a new batch size, image size, step count or scheduler does.

Noise is drawn per image from `fold_in(PRNGKey(seed), index)`, so image `index` of a seed is the
same whatever the batch it is generated in.
"""

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax import conditioning
from livo_jax import schedulers
from livo_jax.models import load_clip_text, load_unet, load_vae


@dataclasses.dataclass
class StableDiffusion:
  """The frozen SD parts sampling needs, plus an optional LiVO value encoder."""
  tokenizer: Any
  text_encoder: nnx.Module
  unet: nnx.Module
  vae: nnx.Module
  scheduler_config: schedulers.SchedulerConfig
  value_encoder: nnx.Module | None = None

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    """The image size the UNet was trained at (512 for SD 1.5)."""
    return (self.unet.config.sample_size or 64) * self.vae_scale_factor


def load_tokenizer(folder: str):
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no tokenizer folder")
  return CLIPTokenizer.from_pretrained(folder)


def load_pipeline(model_dir: str, value_encoder: str | None = None, *, dtype=jnp.float32,
                  attention_impl: str | None = None) -> StableDiffusion:
  """Loads a diffusers SD folder (torch or Flax checkpoint) and an optional value encoder."""
  models = dict(dtype=dtype, attention_impl=attention_impl)
  return StableDiffusion(
      tokenizer=load_tokenizer(os.path.join(model_dir, "tokenizer")),
      text_encoder=load_clip_text(os.path.join(model_dir, "text_encoder"), **models),
      unet=load_unet(os.path.join(model_dir, "unet"), **models),
      vae=load_vae(os.path.join(model_dir, "vae"), **models),
      scheduler_config=schedulers.load_scheduler_config(os.path.join(model_dir, "scheduler")),
      value_encoder=load_clip_text(value_encoder, **models) if value_encoder else None)


def generate(sd: StableDiffusion, prompts: Sequence[str], values: Sequence[str | None] = None,
             *, negative_prompts: Sequence[str] | None = None, steps: int = 25,
             guidance: float = 7.5, scheduler: str = "dpm", seed: int = 0,
             height: int | None = None, width: int | None = None, latents=None,
             debias: bool = False, first_index: int = 0) -> np.ndarray:
  """Generates one image per prompt.

  Args:
    sd: the loaded models.
    prompts: B prompts.
    values: B value statements, or None entries (or no list) for plain SD.
    negative_prompts: B unconditional prompts for guidance (default "").
    steps, guidance, scheduler: sampler settings ("dpm" = DPM-Solver++ 2M, or "ddim").
    seed: noise seed; image i uses `fold_in(PRNGKey(seed), first_index + i)`.
    height, width: image size (default: the UNet's training size).
    latents: optional initial noise [B, h, w, C] (NHWC, float32), instead of the seed's.
    debias: use each row's value token with probability 0.5, drawn from the image's key.
    first_index: index of the first image, for generating a long run in batches.
  Returns:
    uint8 images [B, height, width, 3].
  """
  batch = len(prompts)
  values = list(values) if values is not None else [None] * batch
  negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * batch
  if len(values) != batch or len(negative_prompts) != batch:
    raise ValueError(f"{batch} prompts need {batch} values and negative prompts, got "
                     f"{len(values)} and {len(negative_prompts)}")
  has_value = np.array([bool(v) for v in values])
  if has_value.any() and sd.value_encoder is None:
    raise ValueError("a value was given but no value encoder is loaded "
                     "(load_pipeline(..., value_encoder=DIR) / --value_encoder)")

  height, width = height or sd.default_size, width or sd.default_size
  factor = sd.vae_scale_factor
  if height % factor or width % factor:
    raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
  noise_keys, _ = _image_keys(seed, first_index, batch)
  if latents is None:
    shape = (height // factor, width // factor, sd.unet.config.in_channels)
    latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(noise_keys)
  else:
    latents = jnp.asarray(latents, jnp.float32)
  use_value = value_draws(values, seed=seed, first_index=first_index, debias=debias)

  tokenize = functools.partial(conditioning.tokenize, sd.tokenizer)
  value_texts = [conditioning.value_prompt(v, p) if v else p for v, p in zip(values, prompts)]
  with_value = sd.value_encoder is not None and bool(has_value.any())
  sampler = _sampler(scheduler, sd.scheduler_config, steps)
  models = (sd.text_encoder, sd.unet, sd.vae) + ((sd.value_encoder,) if with_value else ())
  graphdefs, states = zip(*(nnx.split(m) for m in models))
  images = _sample(states, tokenize(prompts), tokenize(value_texts), use_value,
                   tokenize(negative_prompts), latents, jnp.float32(guidance),
                   graphdefs=graphdefs, sampler=sampler)
  return np.asarray(images)


def value_draws(values: Sequence[str | None], *, seed: int, first_index: int = 0,
                debias: bool = False) -> np.ndarray:
  """[B] bool: which images get the value token (all with a value, or a fair coin each)."""
  use_value = np.array([bool(v) for v in values])
  if debias:
    _, coin_keys = _image_keys(seed, first_index, len(values))
    use_value &= np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(coin_keys))
  return use_value


def _image_keys(seed: int, first_index: int, batch: int):
  """Per-image (noise key, coin key), from the image's index so batching does not matter."""
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
      jnp.arange(first_index, first_index + batch))
  noise_keys, coin_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
  return noise_keys, coin_keys


@functools.lru_cache(maxsize=16)
def _sampler(name: str, config: schedulers.SchedulerConfig, steps: int):
  """One sampler object per setting, so the jit cache (keyed on it) is reused."""
  return schedulers.make_sampler(name, config, steps)


@functools.partial(jax.jit, static_argnames=("graphdefs", "sampler"))
def _sample(states, prompt_ids, value_ids, use_value, negative_ids, latents, guidance, *,
            graphdefs, sampler):
  """Token ids and initial noise -> uint8 images; see `generate`."""
  text_encoder, unet, vae, *value_encoder = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  cond, _ = text_encoder(prompt_ids)         # [B, 77, D]
  uncond, _ = text_encoder(negative_ids)     # [B, 77, D]
  if value_encoder:
    token = conditioning.value_token(value_encoder[0], value_ids)
    cond, cond_lengths = conditioning.with_value_token(cond, token, use_value)
    uncond, uncond_lengths = conditioning.with_value_token(uncond, token,
                                                          jnp.zeros_like(use_value))
    lengths = jnp.concatenate([uncond_lengths, cond_lengths])
  else:
    lengths = None
  context = jnp.concatenate([uncond, cond])  # [2B, L, D]
  timesteps = jnp.asarray(sampler.timesteps)

  def denoise(carry, i):
    x, state = carry
    t = jnp.broadcast_to(timesteps[i], (2 * x.shape[0],))
    eps_uncond, eps_cond = jnp.split(unet(jnp.concatenate([x, x]), t, context, lengths), 2)
    guided = eps_uncond + guidance * (eps_cond - eps_uncond)
    x, state = sampler.step(state, guided, x, i)
    return (x, state), None

  x = latents * sampler.init_noise_sigma
  (x, _), _ = jax.lax.scan(denoise, (x, sampler.init_state(x)), jnp.arange(len(timesteps)))
  images = vae.decode(x / vae.scaling_factor).astype(jnp.float32)
  # diffusers' postprocessing: [-1, 1] -> [0, 1], clamp, *255, round.
  return jnp.round(jnp.clip(images / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
