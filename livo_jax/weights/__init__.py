"""The weights layer: model folders in and out, the parameter rule, and the SD bundle.

  from livo_jax import weights
  sd = weights.load_sd("sd15", value_encoder="livo/value_encoder")   # everything SD needs
  unet = weights.load_unet("sd15/unet", dtype=jnp.bfloat16)           # one component
  weights.save_pretrained(unet, "out/unet")                           # torch layout again
  weights.load_unet(weights.ModelRef("ORG/SD", subfolder="unet", variant="fp16"))  # a Hub id

Modules: `hub` (a folder, or a Hub repo id fetched into the HF cache), `layout` (Flax path <->
torch key, filling models), `kinds` (the four model kinds and their configs), `tensors`
(safetensors, torch pickles, orbax), `folders` (one model's folder), `conversion` (whole
folders, `tools/convert_weights.py`), `sd` (the SD bundle), `inception` (the FID InceptionV3's
file). Above `livo_jax.models`, below everything that uses a model.
"""

from livo_jax.weights import conversion, folders, hub, inception, kinds, layout, sd, tensors
from livo_jax.weights.folders import (kind_of_folder, load_clip, load_clip_text, load_model,
                                      load_unet, load_vae, read_config, save_flax,
                                      save_pretrained)
from livo_jax.weights.hub import HubError, ModelRef
from livo_jax.weights.inception import load_fid_inception
from livo_jax.weights.kinds import CLIP, CLIP_TEXT, UNET, VAE, ModelKind
from livo_jax.weights.sd import (StableDiffusion, load_scheduler_config, load_sd,
                                 load_tokenizer)

__all__ = [
    "CLIP", "CLIP_TEXT", "HubError", "ModelKind", "ModelRef", "StableDiffusion", "UNET", "VAE",
    "kind_of_folder", "load_clip", "load_clip_text", "load_fid_inception", "load_model",
    "load_scheduler_config", "load_sd", "load_tokenizer", "load_unet", "load_vae",
    "read_config", "save_flax", "save_pretrained",
]
