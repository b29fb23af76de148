"""LiVO on the shapes-world demo model: the trainer and loop of configs/sd15.py, sized for a CPU.

  python scripts/demo.py --workdir=/tmp/livo_demo       # runs this config as its stage 3:
  python scripts/train.py --config=configs/demo.py --workdir=/tmp/livo_demo/livo \
      --config.model.pretrained=/tmp/livo_demo/base_model \
      --config.data.train_dir=/tmp/livo_demo/preference_data

The demo's base (`livo_jax/pretrain.py`) is a tiny SD architecture at 16 px (8x8x4 latents). Three
things change from the recipe besides the sizes:
- the hinge margins: beta 20 / alpha 10 (margins gamma/beta of 0.05) instead of 1000 / 500.
  SD's recipe fits its latent MSE scale (margins of 1e-3); on this model they moved nothing in
  the prototype (the value token learned an image-independent gain instead), while 20 / 10 move
  red to other colours;
- lr 1e-3 instead of 1e-6, for a 2-layer encoder trained for minutes;
- 150 steps: the toxicity value is learned within them, while longer training collapses
  "color equality" images onto a single non-red colour (on an earlier base, D2 over colours
  fell 51% below the base's at 150 steps, 48% at 200, 40% at 600; on the current one 65% at
  150).
Cached VAE moments (`data.cache_latents`) and fp32 throughout. Expected on a 2-core CPU: under a
minute; `gap_w` and `gap_l` both go negative (the pretrained base's features tell the colours
apart); scripts/demo.py reports what the value token does to the images.
"""

import importlib.util
import os


def _recipe():
  """configs/sd15.py's get_config (configs/ is a folder of files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15.py")
  spec = importlib.util.spec_from_file_location("sd15_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  del arg
  config = _recipe()
  config.model.remat = "none"
  config.dtype = "float32"

  config.data.resolution = 16
  config.data.cache_latents = True
  config.data.num_threads = 2

  config.batch_size = 16
  config.total_steps = 150                # more steps collapse colourless prompts to one colour
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
