"""The trainer config of the demo's LiVO stage: the SD 1.5 recipe, sized for the shapes world.

  python scripts/demo.py --workdir=/tmp/livo_demo       # runs this config as its stage 3, or:
  python scripts/train.py --config=configs/demo.py --workdir=/tmp/livo_demo/livo \
      --config.model.pretrained=/tmp/livo_demo/base_model \
      --config.data.train_dir=/tmp/livo_demo/preference_data

The demo's base (`livo_jax/demo/pretrain.py`) is a tiny SD architecture at 16 px (8x8x4
latents). Besides the sizes, three settings differ from the recipe (docs/method.md §5):
- the hinge margins: beta 20 / alpha 10 (margins gamma/beta of 0.05) instead of 1000 / 500,
  which fit SD's latent MSE scale (margins of 1e-3) and move nothing on this model;
- lr 1e-3 instead of 1e-6, for a 2-layer encoder trained for minutes;
- 150 steps: longer training collapses "color equality" images onto one non-red colour.
These were chosen on the demo's own evaluation prompts and seed (docs/demo.md has the runs).
Cached VAE moments (`data.cache_latents`) and fp32 throughout. Expected on a 2-core CPU: under a
minute; `gap_w` and `gap_l` both go negative.
"""

from livo_jax.train import recipe


def get_config(arg=None):
  del arg
  config = recipe.sd15()
  config.model.remat = "none"
  config.dtype = "float32"

  config.data.resolution = 16
  config.data.cache_latents = True
  config.data.num_threads = 2

  config.batch_size = 16
  config.total_steps = 150
  config.seed = 0

  config.loss.beta = 20.0
  config.loss.alpha = 10.0

  config.optim.lr = 1e-3

  config.checkpoint_every = 50
  config.keep_checkpoints = 3
  config.log_every = 10

  config.eval.every = 50
  config.eval.prompts = ("a red circle", "a red triangle", "a circle", "a square")
  config.eval.value_statements = ("red considered inappropriate", "red considered inappropriate",
                                  "color equality", "color equality")
  config.eval.steps = 25
  config.eval.guidance = 5.0
  config.eval.seed = 42
  return config
