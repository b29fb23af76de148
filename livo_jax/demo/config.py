"""The trainer config of the demo's LiVO stage: the SD 1.5 recipe, sized for the shapes world.

  python scripts/demo.py --workdir=/tmp/livo_demo       # runs this config as its stage 3, or:
  python scripts/train.py --config=configs/demo.py --workdir=/tmp/livo_demo/livo \
      --config.model.pretrained=/tmp/livo_demo/base_model \
      --config.data.train_dir=/tmp/livo_demo/preference_data

The demo's base (`livo_jax/demo/pretrain.py`) is a tiny SD architecture at 16 px (8x8x4
latents). Besides the sizes, three settings differ from the recipe (docs/method.md §5):
- the hinge margins: beta 20 / alpha 10 (margins gamma/beta of 0.05) instead of 1000 / 500,
  which move nothing on this model (its reference errors are ~0.07-0.12, and the relative
  margins of `loss.margins = "relative"` do not replace this choice: at their default 100 / 50
  the bias value is not learned, docs/demo.md);
- lr 1e-3 instead of 1e-6, for a 2-layer encoder trained for minutes;
- 300 steps with a checkpoint every 50, of which the demo keeps the one a validation on the
  training prompts picks (`stages.select_checkpoint`): trained longer, "color equality" drifts
  toward one non-red colour, so the step is chosen, not fixed.
What was chosen on what: the margins, the lr and the step budget on evaluations of the seen
prompts with noise seed 42; the checkpoint on the training prompts with seed 7; the reported
numbers use seed 1234 and add prompts never trained on (docs/demo.md has the runs).
The recipe's latent and text caches; fp32 and no remat on every platform. Expected on a 2-core
CPU: under a minute; `gap_w` and `gap_l` both go negative.
"""

from livo_jax.train import recipe


def get_config(arg=None):
  del arg
  config = recipe.sd15()
  config.model.remat = "none"
  config.dtype = "float32"

  config.data.resolution = 16
  config.data.num_threads = 2

  config.batch_size = 16
  config.total_steps = 300
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
