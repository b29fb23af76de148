"""The LiVO trainer: a value encoder against a frozen Stable Diffusion.

  from livo_jax import train
  train.train(config, workdir)        # config: livo_jax.train.recipe.sd15() or a configs/ file

Modules: `recipe` (every config key, the published recipe), `setup` (checks, data, models, the
train state and jitted step), `step` (the pure step), `loop` (`train`), `optim`, `sharding`,
`checkpoint`, `outputs` (metrics, TensorBoard, grids), `runtime` (multi-process JAX,
preemption, compilation cache).
"""

from livo_jax.train.loop import train

__all__ = ["train"]
