"""Value-conditioned Stable Diffusion sampling, the whole loop compiled once.

  sd = weights.load_sd("sd15", value_encoder="livo/value_encoder")
  images = generate(sd, ["a photo of a doctor"] * 4, values=["gender equality"] * 4,
                    debias=True, seed=42)                # uint8 [4, 512, 512, 3]

  pipe = load_pipeline("sd15", value_encoder="livo/value_encoder")   # diffusers' call
  image = pipe("a photo of a doctor", value="gender equality", seed=42).images[0]

One jitted function does everything between token ids and pixels: the text and value
encoders, classifier-free guidance (cond and uncond in one UNet call of 2B), the scheduler steps
in a `lax.scan`, and the VAE decode. Prompts, values and the guidance scale are traced inputs, so
changing them never recompiles; a new batch size, image size, step count or scheduler does.
`conditioning=` picks the rule of the value token's conditioning ("training", the default, or
"original"; docs/method.md section 2), also without recompiling.

Noise is drawn per image from `fold_in(PRNGKey(seed), index)`, so image `index` of a seed is the
same whatever the batch it is generated in.

Errors name the flag of scripts/generate.py that sets the argument at fault (`--height`, `--out`,
...), since the command lines report them as they are; the pipeline call's own checks name its
arguments (`output_type`, `prompt`, `value`, ...).
"""

import dataclasses
import functools
import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from PIL import Image

from livo_jax import conditioning as conditioning_lib
from livo_jax import files
from livo_jax import images as image_lib
from livo_jax import schedulers
from livo_jax.weights import ModelRef, StableDiffusion, load_sd

# The files `write_images` writes: `00000.png`, `00000.json`, ...
_IMAGE_FILE = re.compile(r"\d{5,}\.(png|json)")


class NonFiniteImages(ValueError):
  """The sampler made NaN or infinite pixels (black ones after the uint8 conversion): a model
  holds non-finite weights, or the inputs are extreme."""


def generate(sd: StableDiffusion, prompts: Sequence[str], values: Sequence[str | None] = None,
             *, negative_prompts: Sequence[str] | None = None, steps: int = 25,
             guidance: float = 7.5, scheduler: str = "dpm", seed: int = 0,
             height: int | None = None, width: int | None = None, latents=None,
             debias: bool = False, first_index: int = 0, conditioning: str = "training",
             float_pixels: bool = False, check_finite: bool = False) -> np.ndarray:
  """Generates one image per prompt.

  Args:
    sd: the loaded models.
    prompts: B prompts.
    values: B value statements, or None entries (or no list) for plain SD.
    negative_prompts: B unconditional prompts for guidance (default "").
    steps, guidance, scheduler: sampler settings ("dpm" = DPM-Solver++ 2M, or "ddim").
    seed: noise seed; image i uses `fold_in(PRNGKey(seed), first_index + i)`.
    height, width: image size (default: the latents', else the UNet's training size;
      `image_size` checks it).
    latents: optional initial noise [B, h, w, C] (NHWC, float32), instead of the seed's.
    debias: use each row's value token with probability 0.5, drawn from the image's key.
    first_index: index of the first image, for generating a long run in batches.
    conditioning: the value token's rule, "training" (78 tokens, as the value encoder was
      trained) or "original" (as the original LiVO samples); `conditioning.RULES`.
    float_pixels: return float32 pixels in [0, 1] (diffusers' output_type="np") instead.
    check_finite: raise `NonFiniteImages` naming a prompt whose image came out NaN or infinite,
      instead of returning it black (writers of image files ask for this).
  Returns:
    uint8 images [B, height, width, 3] (float32 with `float_pixels`).
  """
  batch = len(prompts)
  values = list(values) if values is not None else [None] * batch
  negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * batch
  if len(values) != batch or len(negative_prompts) != batch:
    raise ValueError(f"{batch} prompts need {batch} values and negative prompts, got "
                     f"{len(values)} and {len(negative_prompts)}")
  if latents is not None and len(latents) != batch:
    raise ValueError(f"{batch} prompts need {batch} initial latents, got {len(latents)}")
  has_value = np.array([bool(v) for v in values])
  if has_value.any() and sd.value_encoder is None:
    raise ValueError("a value was given but no value encoder is loaded "
                     "(weights.load_sd(..., value_encoder=DIR) / --value_encoder)")

  height, width = image_size(sd, height, width, latents)
  factor = sd.vae_scale_factor
  noise_keys, _ = _image_keys(seed, first_index, batch)
  if latents is None:
    shape = (height // factor, width // factor, sd.unet.config.in_channels)
    latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(noise_keys)
  else:
    latents = jnp.asarray(latents, jnp.float32)
  use_value = value_draws(values, seed=seed, first_index=first_index, debias=debias)

  tokens = conditioning_lib.guidance_tokens(sd.tokenizer, prompts, negative_prompts, use_value,
                                            conditioning)
  value_ids = conditioning_lib.tokenize(sd.tokenizer, [
      conditioning_lib.value_prompt(v, p) if v else p for v, p in zip(values, prompts)])
  with_value = sd.value_encoder is not None and bool(has_value.any())
  # [2B] attended context tokens, uncond rows first; plain SD attends to all of its 77.
  lengths = np.concatenate([tokens.uncond_lengths, tokens.cond_lengths]) if with_value else None
  sampler = _sampler(scheduler, sd.scheduler_config, steps)
  models = (sd.text_encoder, sd.unet, sd.vae) + ((sd.value_encoder,) if with_value else ())
  graphdefs, states = zip(*(nnx.split(m) for m in models))
  images, finite = _sample(states, tokens.prompt_ids, value_ids, use_value, tokens.negative_ids,
                           lengths, latents, jnp.float32(guidance), graphdefs=graphdefs,
                           sampler=sampler)
  finite = np.asarray(finite)
  if check_finite and not finite.all():
    i = int(np.argmin(finite))
    raise NonFiniteImages(
        f"{int((~finite).sum())} of {batch} images came out NaN or infinite (they would be "
        f"black), e.g. prompt {prompts[i]!r} "
        + (f"with value {values[i]!r}" if use_value[i] else "without a value token")
        + "; check the weights for NaN or inf")
  return np.asarray(images if float_pixels else _to_uint8(images))


def size_multiple(sd: StableDiffusion) -> int:
  """What image sides must be multiples of: the VAE's factor times the UNet's downsampling."""
  return sd.vae_scale_factor * 2 ** (len(sd.unet.config.down_block_types) - 1)


def image_size(sd: StableDiffusion, height: int | None = None, width: int | None = None,
               latents=None) -> tuple[int, int]:
  """The (height, width) to sample at: as given, else the latents', else the model's.

  Raises ValueError naming `--height`, `--width` or `--latents` when the model cannot make that
  size: each side a positive multiple of `size_multiple(sd)`, and latents [N, height / f,
  width / f, C] (f the VAE's factor, C the UNet's input channels).
  """
  factor, multiple = sd.vae_scale_factor, size_multiple(sd)
  scales = f"(VAE x{factor}, UNet x{multiple // factor})"
  if latents is not None:
    shape, channels = tuple(np.shape(latents)), sd.unet.config.in_channels
    if len(shape) != 4 or shape[3] != channels or shape[1] % (multiple // factor) or (
        shape[2] % (multiple // factor)):
      raise ValueError(f"--latents: shape {shape}, this model takes [N, h, w, {channels}] "
                       f"with h and w multiples of {multiple // factor} {scales}")
    height = shape[1] * factor if height is None else height
    width = shape[2] * factor if width is None else width
  height = sd.default_size if height is None else height
  width = sd.default_size if width is None else width
  for name, size in (("height", height), ("width", width)):
    if size < 1 or size % multiple:
      raise ValueError(f"--{name}={size}: this model makes sides that are positive multiples "
                       f"of {multiple} {scales}")
  if latents is not None and shape[1:3] != (height // factor, width // factor):
    raise ValueError(f"--latents: shape {shape} makes {shape[1] * factor}x{shape[2] * factor} "
                     f"images, not the {height}x{width} of --height and --width")
  return height, width


def read_latents(path: str, num_images: int) -> np.ndarray:
  """float32 [num_images, h, w, C] initial noise from a .npy file; ValueError naming it."""
  try:
    latents = np.load(path)
  except (OSError, ValueError) as e:   # unreadable, or not .npy (pickles are refused)
    raise ValueError(f"--latents {path}: not a readable .npy file ({e})") from None
  if not isinstance(latents, np.ndarray):
    raise ValueError(f"--latents {path}: an .npz archive, not one .npy array")
  if (latents.ndim != 4 or len(latents) != num_images
      or not np.issubdtype(latents.dtype, np.floating)):
    raise ValueError(f"--latents {path}: {latents.dtype} {latents.shape}, expected float "
                     f"[{num_images}, h, w, C] (NHWC, one per image of --num_images)")
  if not np.isfinite(latents).all():
    raise ValueError(f"--latents {path}: holds NaN or inf")
  return latents.astype(np.float32)


def check_out(out: str, *, overwrite: bool = False) -> None:
  """Refuses an `out` that is a file, or a folder with anything in it unless `overwrite`."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"--out {out}: exists and is not a folder")
  if not overwrite and os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f"--out {out}: not empty (--overwrite replaces the images in it)")


def write_images(sd: StableDiffusion, out: str, *, prompt: str, value: str | None,
                 num_images: int, batch_size: int = 4, negative_prompt: str = "",
                 steps: int = 25, guidance: float = 7.5, scheduler: str = "dpm", seed: int = 0,
                 height: int | None = None, width: int | None = None, latents=None,
                 debias: bool = False, conditioning: str = "training",
                 record: dict | None = None, overwrite: bool = False) -> list[str]:
  """`out/00000.png`, ... and a JSON sidecar per image (prompt, value, whether its value token
  was used, seed, index, the sampler settings, the conditioning rule and `record`); returns the
  PNG paths.

  The arguments are `generate`'s, for `num_images` images of one prompt made `batch_size` at a
  time; `latents`: [num_images, h, w, C] initial noise, or None for the seed's. `out` must be
  new or empty, so that one run's images are never mixed with another's; `overwrite` removes
  the images of an earlier run there first (and nothing else). `record` (generate.py: the
  model and value encoder folders) also names the models when their images come out NaN.
  """
  image_size(sd, height, width, latents)   # a bad size or rule fails before `out` is touched
  conditioning_lib.check_rule(conditioning)
  check_out(out, overwrite=overwrite)
  os.makedirs(out, exist_ok=True)
  if overwrite:
    files.remove_leftovers(out)
    for name in os.listdir(out):
      if _IMAGE_FILE.fullmatch(name):
        os.remove(os.path.join(out, name))
  sampler = dict(steps=steps, guidance=guidance, scheduler=scheduler, conditioning=conditioning)
  models = ", ".join(f"--{k} {record[k]}" for k in ("model", "value_encoder")
                     if (record or {}).get(k))
  paths = []
  for start in tqdm.tqdm(range(0, num_images, batch_size), desc="batches", unit="batch"):
    n = min(batch_size, num_images - start)
    try:
      images = generate(sd, [prompt] * n, [value] * n, negative_prompts=[negative_prompt] * n,
                        seed=seed, latents=None if latents is None else latents[start:start + n],
                        debias=debias, first_index=start, height=height, width=width,
                        check_finite=True, **sampler)
    except NonFiniteImages as e:
      raise NonFiniteImages(f"{models}: {e}" if models else str(e)) from None
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


def load_pipeline(id_or_folder: str | ModelRef, *, value_encoder: str | ModelRef | None = None,
                  dtype=jnp.float32, **load_kwargs) -> "Pipeline":
  """`weights.load_sd(id_or_folder, value_encoder=..., dtype=..., **load_kwargs)` as a Pipeline.

  `id_or_folder` and `value_encoder` are SD folders or Hub repo ids (or `weights.ModelRef`s);
  the keyword arguments go to `load_sd` as they are (`param_dtype=`, `attention_impl=`, ...).
  """
  return Pipeline(load_sd(id_or_folder, value_encoder=value_encoder, dtype=dtype, **load_kwargs))


@dataclasses.dataclass
class PipelineOutput:
  """What a Pipeline call returns, like diffusers' StableDiffusionPipelineOutput."""
  images: list | np.ndarray   # PIL images ("pil"), or float32 [N, H, W, 3] in [0, 1] ("np")


class Pipeline:
  """A loaded SD (and value encoder) with diffusers' call; `load_pipeline` makes one.

    pipe = load_pipeline("sd15", value_encoder="livo/value_encoder")
    pipe(["a photo of a doctor", "a nurse"], value="gender equality", seed=42).images

  `generate`, `write_images` and `image_size` are this module's functions on `sd`.
  """

  def __init__(self, sd: StableDiffusion):
    self.sd = sd

  def generate(self, prompts: Sequence[str], values: Sequence[str | None] = None, **kwargs):
    return generate(self.sd, prompts, values, **kwargs)

  def write_images(self, out: str, **kwargs) -> list[str]:
    return write_images(self.sd, out, **kwargs)

  def image_size(self, height: int | None = None, width: int | None = None, latents=None):
    return image_size(self.sd, height, width, latents)

  def __call__(self, prompt: str | Sequence[str], *, num_inference_steps: int = 25,
               guidance_scale: float = 7.5, num_images_per_prompt: int = 1, seed: int = 0,
               negative_prompt: str | Sequence[str] = "", height: int | None = None,
               width: int | None = None, value: str | Sequence[str | None] | None = None,
               output_type: str = "pil", latents=None, scheduler: str = "dpm",
               conditioning: str = "training") -> PipelineOutput:
    """`num_images_per_prompt` images of each prompt, as `generate` makes them.

    Args:
      prompt: a prompt or a list of them.
      num_inference_steps, guidance_scale, scheduler: `generate`'s steps, guidance, scheduler.
      num_images_per_prompt: images of each prompt, one after the other (image i of the call
        is `generate`'s image i of the same seed).
      seed: noise seed.
      negative_prompt, value: one for all prompts, or one per prompt (value None: plain SD).
      height, width, latents, conditioning: as `generate` takes them (`latents` NHWC numpy,
        one per image).
      output_type: "pil" (a list of PIL images) or "np" (float32 [N, H, W, 3] in [0, 1]).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompt={prompt!r}: a string or a non-empty list of strings")
    if output_type not in ("pil", "np"):
      raise ValueError(f"output_type={output_type!r}: 'pil' or 'np'")
    if num_images_per_prompt < 1:
      raise ValueError(f"num_images_per_prompt={num_images_per_prompt}: at least 1")
    values = _per_prompt("value", value, len(prompts))
    if any(values) and self.sd.value_encoder is None:
      raise ValueError("value: this pipeline has no value encoder "
                       "(load_pipeline(..., value_encoder=DIR))")
    negative_prompts = _per_prompt("negative_prompt", negative_prompt or "", len(prompts))
    repeat = lambda items: [x for x in items for _ in range(num_images_per_prompt)]
    images = generate(self.sd, repeat(prompts), repeat(values),
                      negative_prompts=repeat(negative_prompts), steps=num_inference_steps,
                      guidance=guidance_scale, scheduler=scheduler, seed=seed, height=height,
                      width=width, latents=latents, conditioning=conditioning,
                      float_pixels=output_type == "np")
    return PipelineOutput(images if output_type == "np" else [Image.fromarray(i) for i in images])


def _per_prompt(name: str, given, num_prompts: int) -> list:
  """A pipeline argument that is one for all prompts (a string or None) or a list of them."""
  if given is None or isinstance(given, str):
    return [given] * num_prompts
  given = list(given)
  if len(given) != num_prompts:
    raise ValueError(f"{name}: {len(given)} given for {num_prompts} prompts (give one, or one "
                     "per prompt)")
  return given


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
def _sample(states, prompt_ids, value_ids, use_value, negative_ids, lengths, latents, guidance, *,
            graphdefs, sampler):
  """Token ids, attended lengths ([2B] or None) and initial noise -> (float32 images in [0, 1],
  [B] whether each was finite); see `generate`."""
  text_encoder, unet, vae, *value_encoder = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  cond, _ = text_encoder(prompt_ids)         # [B, 77, D]
  uncond, _ = text_encoder(negative_ids)     # [B, 77, D]
  if value_encoder:
    token = conditioning_lib.value_token(value_encoder[0], value_ids)
    cond = conditioning_lib.with_value_token(cond, token, use_value)                # [B, 78, D]
    uncond = conditioning_lib.with_value_token(uncond, token, jnp.zeros_like(use_value))
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
  finite = jnp.isfinite(images).all(axis=(1, 2, 3))   # [B]: NaN would be black in uint8
  return jnp.clip(images / 2 + 0.5, 0, 1), finite      # diffusers' [-1, 1] -> [0, 1]


@jax.jit
def _to_uint8(images):
  """[0, 1] -> uint8 as diffusers' numpy_to_pil: *255, round."""
  return jnp.round(images * 255).astype(jnp.uint8)
