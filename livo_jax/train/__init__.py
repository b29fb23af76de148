"""The LiVO trainer: a value encoder against a frozen Stable Diffusion.

  from livo_jax import train
  train.train(config, workdir)        # config: livo_jax.train.recipe.sd15() or a configs/ file
  train.export(workdir, step, out)    # the value encoder of any of its checkpoints

Modules: `recipe` (every config key, the published recipe), `setup` (checks, data, models, the
train state and jitted step), `step` (the pure step), `loop` (`train`, `export`), `optim`,
`sharding`, `checkpoint`, `outputs` (run records, metrics, TensorBoard, W&B, grids, model
cards), `runtime` (multi-process JAX, preemption, compilation cache).
"""

from livo_jax.train.loop import export, train

__all__ = ["export", "train"]
