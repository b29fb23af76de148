"""The original LiVO training algorithm in PyTorch (docs/method.md §4), written from the text.

It is the reference the JAX trainer is checked against: the numerical reference of its losses, the
"original algorithm" of the learning comparison and the torch side of the training benchmark. It
uses diffusers/transformers torch models as the original does. Every array crossing the API is
numpy with images and latents NHWC (the JAX convention); conversion to torch's NCHW is inside.

  model = OriginalLiVO(sd_folder)
  draws = random_draws(np.random.default_rng(0), batch=2, latent_shape=(64, 64, 4),
                       num_train_timesteps=model.num_train_timesteps)
  metrics = model.step(batch, draws)   # batch: pixels_w, pixels_l, prompt_ids, value_ids

Imports only torch, diffusers, transformers and numpy (no JAX), so the benchmark can load it
beside either framework.
"""

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers

OBJECTIVES = ("livo", "dpo", "sft")


def livo_hinge(theta_w, theta_l, ref_w, ref_l, beta, alpha, gamma1, gamma2):
  """LiVO's hinge loss on the four per-sample errors, averaged over the batch."""
  return torch.mean(F.relu(gamma1 + beta * (theta_w - ref_w))
                    + F.relu(gamma2 + alpha * (ref_l - theta_l)))


def dpo_loss(theta_w, theta_l, ref_w, ref_l, beta_dpo):
  """Diffusion-DPO's loss (Wallace et al. 2023) on the same four errors, batch mean."""
  inside = -0.5 * beta_dpo * ((theta_w - theta_l) - (ref_w - ref_l))
  return torch.mean(-F.logsigmoid(inside))


def sft_loss(theta_w):
  """Plain fine-tuning on the aligned images: the value-conditioned error, batch mean."""
  return torch.mean(theta_w)


def min_snr_weights(alphas_cumprod, timesteps, gamma, prediction_type):
  """Min-SNR-gamma weights per sample, as diffusers' train_text_to_image computes them.

  `min(snr, gamma) / snr` for epsilon prediction; v-prediction divides by `snr + 1` instead.
  """
  acp = alphas_cumprod[timesteps]
  snr = acp / (1.0 - acp)
  clipped = torch.clamp(snr, max=gamma)
  if prediction_type == "epsilon":
    return clipped / snr
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  raise ValueError(f"unknown prediction_type {prediction_type!r}")


def per_sample_mse(prediction, target):
  """Mean squared error over every axis but the batch, in float32."""
  dtype = torch.promote_types(prediction.dtype, torch.float32)   # float64 stays float64
  squared = F.mse_loss(prediction.to(dtype), target.to(dtype), reduction="none")
  return squared.mean(dim=tuple(range(1, squared.ndim)))


def random_draws(rng: np.random.Generator, batch: int, latent_shape, num_train_timesteps: int
                 ) -> dict[str, np.ndarray]:
  """The random inputs of one step: posterior draws, diffusion noise, timesteps.

  Args:
    rng: the numpy generator to draw from.
    batch: batch size.
    latent_shape: (h, w, C) of one latent, NHWC.
    num_train_timesteps: T; timesteps are uniform integers in [0, T).

  Returns:
    latent_noise_w, latent_noise_l, noise: float32 standard normals [batch, h, w, C];
    timesteps: int64 [batch].
  """
  shape = (batch, *latent_shape)
  return {
      "latent_noise_w": rng.standard_normal(shape, dtype=np.float32),
      "latent_noise_l": rng.standard_normal(shape, dtype=np.float32),
      "noise": rng.standard_normal(shape, dtype=np.float32),
      "timesteps": rng.integers(0, num_train_timesteps, size=batch, dtype=np.int64),
  }


class OriginalLiVO:
  """The original algorithm: frozen SD (text encoder, UNet, VAE), a trainable value encoder.

  Args:
    sd_folder: a diffusers SD folder (scheduler/ text_encoder/ unet/ vae/).
    value_encoder_folder: a `CLIPTextModel` folder to start the value encoder from; None starts
      it from sd_folder/text_encoder, as the original does.
    objective: "livo" (the hinge loss), "dpo" (Diffusion-DPO) or "sft" (theta_w only).
    beta, alpha, gamma1, gamma2: the hinge loss's scales and margins.
    beta_dpo: Diffusion-DPO's temperature.
    snr_gamma: min-SNR-gamma weighting of the four errors; None for none.
    prediction_type: "epsilon" or "v_prediction"; None takes the scheduler config's.
    lr, betas, weight_decay, eps: AdamW's, constant learning rate.
    max_grad_norm: the global gradient norm is clipped to this.
    device: where the models run.
    dtype: dtype of the frozen models' weights (float16 in the original's mixed precision); the
      value encoder trains in float32, or in float64 when dtype is float64 (the precision the
      loss-parity tests need: beta = 1000 multiplies the errors' rounding).
    autocast_dtype: run the forward under torch autocast with this dtype (float16 on cuda, as the
      original's fp16 mixed precision); None for none. float16 also scales the loss (GradScaler).
    gradient_checkpointing: recompute the value encoder's activations in the backward pass.
    attention: "sdpa" (diffusers' default AttnProcessor2_0, transformers' sdpa) or "eager".
  """

  def __init__(self, sd_folder: str, value_encoder_folder: str | None = None, *,
               objective: str = "livo", beta: float = 1000., alpha: float = 500.,
               gamma1: float = 1., gamma2: float = 0.5, beta_dpo: float = 5000.,
               snr_gamma: float | None = None, prediction_type: str | None = None,
               lr: float = 1e-6, betas=(0.9, 0.999), weight_decay: float = 1e-2,
               eps: float = 1e-8, max_grad_norm: float = 1.0, device="cpu",
               dtype=torch.float32, autocast_dtype=None, gradient_checkpointing: bool = False,
               attention: str = "sdpa"):
    if objective not in OBJECTIVES:
      raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if attention not in ("sdpa", "eager"):
      raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    self.objective = objective
    self.beta, self.alpha, self.gamma1, self.gamma2 = beta, alpha, gamma1, gamma2
    self.beta_dpo = beta_dpo
    self.snr_gamma = snr_gamma
    self.max_grad_norm = max_grad_norm
    self.device = torch.device(device)
    self.dtype = dtype
    # Latents, noise and errors: float32, or float64 for a float64 reference.
    self.float_dtype = torch.promote_types(dtype, torch.float32)
    self.autocast_dtype = autocast_dtype

    scheduler = diffusers.DDPMScheduler.from_pretrained(sd_folder, subfolder="scheduler")
    self.prediction_type = prediction_type or scheduler.config.prediction_type
    if self.prediction_type not in ("epsilon", "v_prediction"):
      raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
    self.num_train_timesteps = scheduler.config.num_train_timesteps
    self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)

    self.vae = diffusers.AutoencoderKL.from_pretrained(sd_folder, subfolder="vae", dtype=dtype)
    self.unet = diffusers.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet",
                                                               dtype=dtype)
    if attention == "eager":
      self.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
    self.text_encoder = transformers.CLIPTextModel.from_pretrained(
        sd_folder, subfolder="text_encoder", attn_implementation=attention, dtype=dtype)
    for model in (self.vae, self.unet, self.text_encoder):
      model.requires_grad_(False).eval().to(self.device)
    self.scaling_factor = self.vae.config.scaling_factor

    if value_encoder_folder is None:
      source = dict(pretrained_model_name_or_path=sd_folder, subfolder="text_encoder")
    else:
      source = dict(pretrained_model_name_or_path=value_encoder_folder)
    self.value_encoder = transformers.CLIPTextModel.from_pretrained(
        **source, attn_implementation=attention, dtype=self.float_dtype).to(self.device)
    if gradient_checkpointing:
      self.value_encoder.activation_checkpointing_enable()
    # Training mode as the original (checkpointing acts only then); CLIP has no dropout.
    self.value_encoder.requires_grad_(True).train()

    self.trainable_parameters = list(self.value_encoder.parameters())
    self.optimizer = torch.optim.AdamW(self.trainable_parameters, lr=lr, betas=tuple(betas),
                                       weight_decay=weight_decay, eps=eps)
    # Accelerate's fp16 mixed precision scales the loss; bf16 and fp32 need no scaling.
    self.scaler = torch.amp.GradScaler(self.device.type,
                                       enabled=autocast_dtype == torch.float16)

  def _tensor(self, array, dtype=None):
    """A numpy array as a tensor on the device."""
    return torch.as_tensor(np.asarray(array), device=self.device, dtype=dtype)

  def _nchw(self, array):
    """An NHWC numpy array as an NCHW float tensor (float32 or float64) on the device."""
    return self._tensor(array, self.float_dtype).permute(0, 3, 1, 2)

  def _latents(self, pixels, latent_noise):
    """The scaled VAE posterior sample `(mean + exp(logvar / 2) * n) * scaling_factor`.

    float32 NCHW; logvar is diffusers' (clamped to [-30, 20]).
    """
    with torch.no_grad():
      posterior = self.vae.encode(self._nchw(pixels).to(self.dtype)).latent_dist
      std = torch.exp(0.5 * posterior.logvar.to(self.float_dtype))
      z = posterior.mean.to(self.float_dtype) + std * self._nchw(latent_noise)
    return z * self.scaling_factor

  def _unet_error(self, noisy, timesteps, context, target):
    prediction = self.unet(noisy.to(self.dtype), timesteps, context.to(self.dtype)).sample
    return per_sample_mse(prediction, target)

  def errors(self, pixels_w, pixels_l, prompt_ids, value_ids, latent_noise_w, latent_noise_l,
             noise, timesteps) -> dict[str, torch.Tensor]:
    """The four per-sample errors and the objective's loss for one batch.

    Args:
      pixels_w, pixels_l: aligned / violating images, float32 NHWC [B, H, W, 3] in [-1, 1].
      prompt_ids: prompt token ids [B, 77].
      value_ids: token ids of `value + ", " + prompt` [B, 77].
      latent_noise_w, latent_noise_l: standard-normal draws of the VAE posterior samples, NHWC
        [B, h, w, C].
      noise: diffusion noise shared by w and l, NHWC [B, h, w, C].
      timesteps: int [B], shared by w and l.

    Returns:
      theta_w, theta_l, ref_w, ref_l: float32 [B] (min-SNR weighted when snr_gamma is set);
      loss: the objective's scalar. theta_* carry gradients to the value encoder.
    """
    t = self._tensor(timesteps, torch.long)
    eps = self._nchw(noise)
    acp = self.alphas_cumprod[t][:, None, None, None]
    with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      with torch.no_grad():
        text = self.text_encoder(self._tensor(prompt_ids, torch.long))[0]
      value = self.value_encoder(self._tensor(value_ids, torch.long))[1]
      # The value vector is one extra token in front of the frozen prompt embeddings: 78 tokens.
      augmented = torch.cat([value[:, None, :].to(text.dtype), text], dim=1)

      errors = {}
      for side, pixels, latent_noise in (("w", pixels_w, latent_noise_w),
                                         ("l", pixels_l, latent_noise_l)):
        z = self._latents(pixels, latent_noise)
        noisy = acp.sqrt() * z + (1.0 - acp).sqrt() * eps
        if self.prediction_type == "epsilon":
          target = eps
        else:
          target = acp.sqrt() * eps - (1.0 - acp).sqrt() * z
        # Separate UNet calls, as the original; the reference passes see the plain prompt.
        errors[f"theta_{side}"] = self._unet_error(noisy, t, augmented, target)
        with torch.no_grad():
          errors[f"ref_{side}"] = self._unet_error(noisy, t, text, target)

    if self.snr_gamma is not None:
      weights = min_snr_weights(self.alphas_cumprod, t, self.snr_gamma, self.prediction_type)
      errors = {k: v * weights for k, v in errors.items()}
    errors["loss"] = self.loss(**errors)
    return errors

  def loss(self, theta_w, theta_l, ref_w, ref_l):
    """The chosen objective on the four per-sample errors."""
    if self.objective == "livo":
      return livo_hinge(theta_w, theta_l, ref_w, ref_l, self.beta, self.alpha, self.gamma1,
                        self.gamma2)
    if self.objective == "dpo":
      return dpo_loss(theta_w, theta_l, ref_w, ref_l, self.beta_dpo)
    return sft_loss(theta_w)

  def step(self, batch: dict, draws: dict) -> dict[str, float]:
    """One optimisation step of the value encoder.

    Args:
      batch: pixels_w, pixels_l, prompt_ids, value_ids (numpy, as `errors` takes them).
      draws: latent_noise_w, latent_noise_l, noise, timesteps (see `random_draws`).

    Returns:
      loss, loss_theta_w, loss_ref_w, loss_theta_l, loss_ref_l (batch means) and grad_norm (the
      global gradient norm before clipping). Under float16 autocast the first steps overflow
      the loss scale and are skipped (grad_norm inf or nan) until it has come down, as with
      accelerate's fp16.
    """
    self.optimizer.zero_grad(set_to_none=True)
    errors = self.errors(batch["pixels_w"], batch["pixels_l"], batch["prompt_ids"],
                         batch["value_ids"], **draws)
    self.scaler.scale(errors["loss"]).backward()
    self.scaler.unscale_(self.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.max_grad_norm)
    self.scaler.step(self.optimizer)
    self.scaler.update()
    metrics = {"loss": errors["loss"].item()}
    for name in ("theta_w", "ref_w", "theta_l", "ref_l"):
      metrics[f"loss_{name}"] = errors[name].mean().item()
    metrics["grad_norm"] = grad_norm.item()
    return metrics

  def value_encoder_state(self) -> dict[str, np.ndarray]:
    """A copy of the value encoder's state dict as numpy arrays."""
    # A copy: on the CPU `.numpy()` shares memory with the live parameters.
    return {k: v.detach().cpu().numpy().copy()
            for k, v in self.value_encoder.state_dict().items()}
