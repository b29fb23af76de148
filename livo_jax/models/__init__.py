"""Flax NNX models of SD's CLIP text encoder, UNet and VAE, of CLIP, and of the FID InceptionV3.

Model code only: each module holds its Flax modules and the config dataclass that shapes them,
and nothing here reads a file or imports from the rest of `livo_jax`. The weights layer
(`livo_jax.weights`) reads config.json files into these dataclasses and fills the parameters:

  from livo_jax import weights
  unet = weights.load_unet("sd15/unet", dtype=jnp.bfloat16)   # unet(latents, t, context)
"""

from livo_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                  CLIPVisionConfig)
from livo_jax.models.inception import InceptionV3
from livo_jax.models.unet import UNet2DConditionModel, UNetConfig
from livo_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "CLIPVisionConfig", "InceptionV3", "UNet2DConditionModel", "UNetConfig", "VAEConfig",
]
