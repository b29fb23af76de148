"""Value-conditioned Stable Diffusion sampling, the whole loop compiled once.

  sd = weights.load_sd("sd15", value_encoder="livo/value_encoder")
  images = generate(sd, ["a photo of a doctor"] * 4, values=["gender equality"] * 4,
                    debias=True, seed=42)                # uint8 [4, 512, 512, 3]

One jitted function does everything between token ids and uint8 pixels: the text and value
encoders, classifier-free guidance (cond and uncond in one UNet call of 2B), the scheduler steps
in a `lax.scan`, and the VAE decode. Prompts, values and the guidance scale are traced inputs, so
changing them never recompiles; a new batch size, image size, step count or scheduler does.

Noise is drawn per image from `fold_in(PRNGKey(seed), index)`, so image `index` of a seed is the
same whatever the batch it is generated in.
"""

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from livo_jax import conditioning
from livo_jax import files
from livo_jax import images as image_lib
from livo_jax import schedulers
from livo_jax.weights import StableDiffusion


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
                     "(weights.load_sd(..., value_encoder=DIR) / --value_encoder)")

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


def write_images(sd: StableDiffusion, out: str, *, prompt: str, value: str | None,
                 num_images: int, batch_size: int = 4, negative_prompt: str = "",
                 steps: int = 25, guidance: float = 7.5, scheduler: str = "dpm", seed: int = 0,
                 height: int | None = None, width: int | None = None, latents=None,
                 debias: bool = False, record: dict | None = None) -> list[str]:
  """`out/00000.png`, ... and a JSON sidecar per image (prompt, value, whether its value token
  was used, seed, index, the sampler settings and `record`); returns the PNG paths.

  The arguments are `generate`'s, for `num_images` images of one prompt made `batch_size` at a
  time; `latents`: [num_images, h, w, C] initial noise, or None for the seed's.
  """
  sampler = dict(steps=steps, guidance=guidance, scheduler=scheduler)
  os.makedirs(out, exist_ok=True)
  paths = []
  for start in tqdm.tqdm(range(0, num_images, batch_size), desc="batches", unit="batch"):
    n = min(batch_size, num_images - start)
    images = generate(sd, [prompt] * n, [value] * n, negative_prompts=[negative_prompt] * n,
                      seed=seed, latents=None if latents is None else latents[start:start + n],
                      debias=debias, first_index=start, height=height, width=width,
                      **sampler)
    used = value_draws([value] * n, seed=seed, first_index=start, debias=debias)
    for offset, image in enumerate(images):
      index = start + offset
      path = os.path.join(out, f"{index:05d}")
      image_lib.save_png(image, path + ".png")
      files.write_json(dict(prompt=prompt, value=value, value_token_used=bool(used[offset]),
                            negative_prompt=negative_prompt, seed=seed, index=index,
                            **sampler, debias=debias,
                            height=int(image.shape[0]), width=int(image.shape[1]),
                            **(record or {})), path + ".json")
      paths.append(path + ".png")
  return paths


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
