"""Flax NNX models of SD's CLIP text encoder, UNet and VAE, of CLIP, and of the FID InceptionV3.

Model code only: each module holds its Flax modules and the config dataclass that shapes them,
and nothing here reads a file or imports from the rest of `livo_jax`. The weights layer
above (`livo_jax.weights`: `load_unet`, `load_vae`, `load_clip_text`, `load_sd`, ...) reads
config.json files into these dataclasses and fills the parameters.
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
