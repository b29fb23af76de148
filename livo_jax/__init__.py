"""livo-jax: LiVO value alignment for Stable Diffusion, in JAX/Flax."""

__version__ = "0.1.0"
