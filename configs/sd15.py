"""LiVO's published recipe: a value encoder for a frozen Stable Diffusion 1.5.

  python scripts/train.py --config=configs/sd15.py --workdir=/tmp/livo_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.train_dir=/path/to/livo_data

`model.pretrained` is a diffusers SD folder (scheduler/ text_encoder/ tokenizer/ unet/ vae/) or
a Hub repo id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (with `model.revision`,
`model.variant`; docs/weights.md); `data.train_dir` a livo_data folder (docs/method.md §3,
docs/data.md). The keys and their values are `livo_jax/train/recipe.py`'s, the recipe of
docs/method.md §5 (batch 8, 15,000 steps, AdamW lr 1e-6, hinge beta 1000 / alpha 500 / gamma1
1 / gamma2 0.5, 512 px, fp16 frozen nets on GPUs and fp32 elsewhere, UNet remat on
accelerators, latents and prompt states cached once before the first step: each "auto" choice is
logged); any can be overridden with `--config.KEY=VALUE`, and an unknown key is an error.

What to expect: in `metrics.jsonl`, `gap_w` (= loss_theta_w - loss_ref_w) moves below 0 toward
-gamma1/beta = -1e-3 and `gap_l` (= loss_ref_l - loss_theta_l) below 0 toward -gamma2/alpha; then
the hinge terms go to 0. At the end `value_encoder/` loads in torch transformers and in
`scripts/generate.py --value_encoder`. This recipe has not been timed on SD 1.5 hardware yet
(docs/performance.md has the step benchmarks).
"""

from livo_jax.train import recipe


def get_config(arg=None):
  """The recipe; `arg` is unused (big_vision's convention: `--config=configs/sd15.py:ARG`)."""
  del arg
  return recipe.sd15()
