"""LiVO's published recipe: a value encoder for a frozen Stable Diffusion 1.5.

  python scripts/train.py --config=configs/sd15.py --workdir=/tmp/livo_sd15 \
      --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
      --config.data.train_dir=/path/to/livo_data

`model.pretrained` is a local diffusers SD folder (scheduler/ text_encoder/ tokenizer/ unet/
vae/); `data.train_dir` a livo_data folder (REFERENCE section 3, docs/data.md). Any key below
can be overridden with `--config.KEY=VALUE`; an unknown key is an error.

The recipe (REFERENCE section 5): batch 8, 15,000 steps, AdamW lr 1e-6 constant (betas
0.9/0.999, weight decay 1e-2, eps 1e-8; the original's warmup setting had no effect on its
constant schedule, so there is none), gradient clipping at global norm 1, hinge beta 1000, alpha
500, gamma1 1, gamma2 0.5, 512 px, center crop + random flip, a checkpoint every 1000 steps
keeping 20, validation images every 1000 steps. Mixed precision: the frozen nets compute in
bf16, the value encoder's master weights and the loss stay fp32; the UNet is rematerialised (the
original's gradient checkpointing).

What to expect: in `metrics.jsonl`, `gap_w` (= loss_theta_w - loss_ref_w) moves below 0 toward
-gamma1/beta = -1e-3 and `gap_l` (= loss_ref_l - loss_theta_l) below 0 toward -gamma2/alpha; then
the hinge terms go to 0. At the end `value_encoder/` loads in torch transformers and in
`scripts/generate.py --value_encoder`. We have not yet timed this recipe on SD 1.5 hardware.
"""

import ml_collections


def get_config(arg=None):
  """The recipe; `arg` is unused (big_vision's convention: `--config=configs/sd15.py:ARG`)."""
  del arg
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.pretrained = ""           # diffusers SD folder (required)
  config.model.value_encoder_init = ""   # HF CLIPTextModel folder; "" = the SD text encoder
  config.model.remat = "blocks"          # kept for the backward pass: none / dots / blocks
  config.model.attention_impl = ""       # "" (per platform), blocked, cudnn, xla
  config.model.shard_frozen = False      # True: split the frozen UNet/VAE/text encoder over fsdp

  config.dtype = "bfloat16"              # compute dtype of the frozen nets: bfloat16 / float32

  config.data = ml_collections.ConfigDict()
  config.data.train_dir = ""             # livo_data folder, or one `prepare` made (required)
  config.data.cache_dir = ""             # prepared datasets; "" = ~/.cache/livo_jax/datasets
  config.data.resolution = 512
  config.data.center_crop = True         # False: random crop
  config.data.random_flip = True
  config.data.skip_bad = False           # True: count and skip bad samples instead of refusing
  config.data.cache_latents = False      # precompute VAE moments once (needs center_crop)
  config.data.cache_text = False         # precompute the prompts' text-encoder states once
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
  config.loss.beta_dpo = 5000.0
  config.loss.snr_gamma = 0.0            # > 0: min-SNR-gamma weighting
  config.loss.prediction_type = ""       # "" = the SD folder's scheduler; epsilon / v_prediction
  config.loss.noise_offset = 0.0
  config.loss.input_perturbation = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-6
  config.optim.schedule = "constant"     # constant / warmup_constant / cosine
  config.optim.warmup_steps = 0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 1e-2
  config.optim.max_grad_norm = 1.0
  config.optim.grad_accum_steps = 1      # micro-batches per step (batch_size stays global)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                  # -1: the devices fsdp does not take
  config.mesh.fsdp = 1

  config.checkpoint_every = 1000
  config.keep_checkpoints = 20
  config.log_every = 1
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
