"""Every key the trainer reads, set to LiVO's published recipe for Stable Diffusion 1.5.

  config = recipe.sd15()          # what configs/sd15.py returns; other configs start from it

The recipe (docs/method.md §5): batch 8, 15,000 steps, AdamW lr 1e-6 constant (betas
0.9/0.999, weight decay 1e-2, eps 1e-8; the original's warmup setting had no effect on its
constant schedule, so there is none), gradient clipping at global norm 1, hinge beta 1000, alpha
500, gamma1 1, gamma2 0.5, 512 px, center crop + random flip, a checkpoint every 1000 steps
keeping 20, validation images every 1000 steps. Mixed precision: the frozen nets compute in
fp16 on GPUs (the original's precision) and fp32 elsewhere (`dtype = "auto"`), the value
encoder's master weights and the loss stay fp32; the UNet is rematerialised on accelerators (the
original's gradient checkpointing; not on CPUs, where it costs time and saves no memory:
`model.remat = "auto"`). The VAE moments of every image and the text encoder's states of every
prompt are computed once and cached (`data.cache_latents`, `data.cache_text`): the same
mathematics as the original's encoding in every step, without its cost. docs/training.md
explains every key.
"""

import ml_collections

from livo_jax.errors import ConfigError
from livo_jax.train import sharding

# Sections whose entries a config may add to (named rule sets).
_OPEN = ("sharding.rules",)


def sd15() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""           # diffusers SD folder or Hub repo id (required)
  config.model.revision = ""             # of a Hub id: branch, tag or commit; "" = main
  config.model.variant = ""              # weights files variant, e.g. "fp16"; "" = the plain ones
  config.model.value_encoder_init = ""   # HF CLIPTextModel folder or repo id; "" = SD's text encoder
  config.model.value_encoder_init_subfolder = ""   # e.g. "value_encoder" in a LiVO release repo
  config.model.value_encoder_init_revision = ""
  config.model.remat = "auto"            # kept for the backward pass: auto (none on CPUs, blocks
                                         # elsewhere) / none / dots / blocks
  config.model.attention_impl = ""       # "" (per platform), blocked, cudnn, xla
  config.model.merge_unet_passes = True  # theta_w/theta_l in one UNet call of 2B (False: four)

  config.dtype = "auto"                  # the frozen nets' compute dtype: auto (float16 on GPUs,
                                         # float32 elsewhere) / float16 / bfloat16 / float32

  config.data = ml_collections.ConfigDict()
  config.data.train_dir = ""             # livo_data folder, or one `prepare` made (required)
  config.data.cache_dir = ""             # prepared datasets; "" = ~/.cache/livo_jax/datasets
  config.data.resolution = 512
  config.data.center_crop = True         # False: random crop
  config.data.random_flip = True
  config.data.skip_bad = False           # True: count and skip bad samples instead of refusing
  config.data.cache_latents = True       # VAE moments computed once (needs center_crop); False:
                                         # the VAE encodes both images in every step
  config.data.cache_text = True          # the prompts' text-encoder states computed once
  config.data.num_threads = 4            # image decoding threads per process
  config.data.prefetch = 2               # batches decoded ahead
  config.data.log_positions = False      # write data_positions/process_<i>.jsonl (audit)

  config.batch_size = 8                  # global batch, split over all devices
  config.total_steps = 15_000
  config.seed = 0

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "livo"              # livo / dpo / sft
  config.loss.beta = 1000.0
  config.loss.alpha = 500.0
  config.loss.gamma1 = 1.0
  config.loss.gamma2 = 0.5
  config.loss.margins = "absolute"       # livo's margins: absolute (the paper) / relative (to ref)
  config.loss.relative_beta = 100.0      # margins = relative: slopes on gap / ref error, margins
  config.loss.relative_alpha = 50.0      # gamma1 / relative_beta, gamma2 / relative_alpha (1%)
  config.loss.beta_dpo = 5000.0
  config.loss.snr_gamma = 0.0            # > 0: min-SNR-gamma weighting
  config.loss.prediction_type = ""       # "" = the SD folder's scheduler; epsilon / v_prediction
  config.loss.noise_offset = 0.0
  config.loss.input_perturbation = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-6
  config.optim.schedule = "constant"     # constant / warmup_constant / cosine
  config.optim.warmup_steps = 0
  config.optim.final_lr_fraction = 0.0   # cosine: the last learning rate, a fraction of lr
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 1e-2
  config.optim.max_grad_norm = 1.0
  config.optim.grad_accum_steps = 1      # micro-batches per step (batch_size stays global)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                  # -1: the devices fsdp does not take
  config.mesh.fsdp = 1
  config.mesh.dcn_data = 1               # slices (or processes) multiplying the data axis

  config.sharding = ml_collections.ConfigDict()
  # name -> ((regex on the parameter path, rule), ...), first match wins (train/sharding.py).
  config.sharding.rules = ml_collections.ConfigDict(dict(sharding.PRESETS))
  config.sharding.trainable = "fsdp"     # the value encoder and its optimizer state
  config.sharding.frozen = "replicated"  # the frozen UNet, VAE and text encoder ("fsdp": split)

  # A step with a non-finite loss or gradient is skipped (weights unchanged); this many in a row
  # stop the run with exit 1, leaving the checkpoints and any export as they were.
  config.max_nonfinite_steps = 3
  config.checkpoint_every = 1000
  config.keep_checkpoints = 20
  config.log_every = 1
  config.report_to = "tensorboard"       # also "wandb", "tensorboard,wandb", or "none"
  config.wandb_project = "livo_jax"      # the W&B project (report_to wandb)
  # JAX's persistent compilation cache: a restart loads the compiled step. "" = off.
  config.compilation_cache_dir = "~/.cache/livo_jax/compilation"

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 1000               # 0: never
  config.eval.prompts = ("a photo of a doctor", "a photo of a nurse")
  config.eval.value_statements = ("gender equality",)   # one for all prompts, or one each
  config.eval.steps = 25
  config.eval.guidance = 7.5
  config.eval.seed = 42
  return config


def check_keys(config) -> None:
  """A config built some other way than from `sd15()` has exactly its keys, or a ConfigError
  names the first one missing or unknown."""
  expected, given = _keys(sd15()), _keys(config)
  for key in sorted(expected - given):
    raise ConfigError(f"config has no key {key!r} (every config starts from "
                      "livo_jax.train.recipe.sd15())")
  for key in sorted(given - expected):
    raise ConfigError(f"unknown config key {key!r}")


def _keys(node, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in node.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict) and name not in _OPEN:
      keys |= _keys(value, name + ".")
    else:
      keys.add(name)
  return keys
