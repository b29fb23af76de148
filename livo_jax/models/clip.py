"""CLIP with the semantics of HF transformers' `CLIPTextModel`, `CLIPVisionModel` and `CLIPModel`.

`CLIPTextModel(config)(input_ids [B, L]) -> (last_hidden_state [B, L, D], pooled [B, D])`:
token + position embeddings, pre-norm causal transformer layers, final layer norm, and the
pooled vector taken at the end-of-text token exactly where HF takes it.

`CLIPVisionModel(config)(pixel_values [B, H, W, C]) -> (last_hidden_state [B, 1 + N, D],
pooled [B, D])`: a class token and N patch embeddings, a layer norm, bidirectional transformer
layers, and the class token layer-normed as the pooled vector.

`CLIPModel(config)(input_ids, pixel_values) -> logits_per_image [B_img, B_txt]`: both towers,
their projections into a shared space, and the scaled cosine similarities.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from livo_jax.models import layers

# `gelu` is the exact erf form in transformers; `gelu_new`/`gelu_pytorch_tanh` the tanh form.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Generic `PretrainedConfig` fields that transformers writes into config.json (older releases
# write many of them) and that do not change a CLIP text forward pass: what the config readers
# of the weights layer ignore (`livo_jax.hf_config`).
HF_IGNORED_TEXT = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "dropout", "attention_dropout", "initializer_range", "initializer_factor",
    "projection_dim", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "problem_type", "use_cache", "gradient_checkpointing",
)
# Older releases also wrote the generic token ids (null) into vision configs.
HF_IGNORED_VISION = HF_IGNORED_TEXT + ("pad_token_id", "bos_token_id", "eos_token_id")
# At the top of a `CLIPConfig`, `projection_dim` is the real one (the towers' copies are unused).
HF_IGNORED_CLIP = tuple(f for f in HF_IGNORED_TEXT if f != "projection_dim")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of HF `CLIPTextConfig` that define the text transformer (HF defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Only `eos_token_id` affects the math (pooling); the others are kept for saving back.
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  def validate(self) -> None:
    _validate_transformer(self)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of HF `CLIPVisionConfig` that define the vision transformer (HF defaults)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def validate(self) -> None:
    _validate_transformer(self)
    for name in ("image_size", "patch_size"):
      value = getattr(self, name)
      if not isinstance(value, int):  # HF types allow [h, w] pairs; its model does not
        raise ValueError(f"field '{name}' = {value!r} is not supported "
                         "(only a single int is implemented)")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The fields of HF `CLIPConfig`: the two towers and their shared projection (HF defaults)."""
  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  # Only initialises `logit_scale` in a fresh model; loaded weights hold the value in use.
  logit_scale_init_value: float = 2.6592


def _validate_transformer(config: CLIPTextConfig | CLIPVisionConfig) -> None:
  if config.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"field 'hidden_act' = {config.hidden_act!r} is not supported "
                     f"(supported: {', '.join(_ACTIVATIONS)})")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"field 'hidden_size' = {config.hidden_size} is not divisible "
                     f"by 'num_attention_heads' = {config.num_attention_heads}")


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, config: CLIPTextConfig, init: layers.Init):
    self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=init.dtype,
                                     param_dtype=init.param_dtype, rngs=init.rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                        dtype=init.dtype, param_dtype=init.param_dtype,
                                        rngs=init.rngs)

  def __call__(self, input_ids):  # [B, L] -> [B, L, D]
    positions = jnp.arange(input_ids.shape[-1])
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, init: layers.Init,
               attention_impl: str | None, *, is_causal: bool):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.attention_impl = attention_impl
    self.is_causal = is_causal
    self.q_proj = layers.linear(d, d, init)
    self.k_proj = layers.linear(d, d, init)
    self.v_proj = layers.linear(d, d, init)
    self.out_proj = layers.linear(d, d, init)

  def __call__(self, x):
    out = layers.multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                      self.num_heads, is_causal=self.is_causal,
                                      implementation=self.attention_impl)
    return self.out_proj(out)


class CLIPMLP(nnx.Module):

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, init: layers.Init):
    self.activation = _ACTIVATIONS[config.hidden_act]
    self.fc1 = layers.linear(config.hidden_size, config.intermediate_size, init)
    self.fc2 = layers.linear(config.intermediate_size, config.hidden_size, init)

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, init: layers.Init,
               attention_impl: str | None, *, is_causal: bool):
    self.layer_norm1 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)
    self.self_attn = CLIPAttention(config, init, attention_impl, is_causal=is_causal)
    self.layer_norm2 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)
    self.mlp = CLIPMLP(config, init)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  """The transformer layers: causal in the text tower, bidirectional in the vision tower."""

  def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, init: layers.Init,
               attention_impl: str | None, *, is_causal: bool):
    self.layers = nnx.List([CLIPEncoderLayer(config, init, attention_impl, is_causal=is_causal)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x, *, remat: str):  # [B, T, D] -> [B, T, D]
    for layer in self.layers:
      x = layers.call(layer, x, remat=remat)
    return x


class CLIPTextModel(nnx.Module):
  """HF `CLIPTextModel` in Flax. Parameter paths are HF's keys without the `text_model.` prefix.

  Args:
    config: the text config.
    rngs: initialisation randomness (weights are normally loaded over it).
    dtype: compute dtype.
    param_dtype: storage dtype of freshly initialised parameters.
    remat: what each transformer layer keeps for the backward pass ("none", "dots", "blocks":
      `layers.REMAT_POLICIES`); saves activation memory when the model is trained.
    attention_impl: attention implementation (`livo_jax.models.attention`; None: the
      platform's best).
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str = "none",
               attention_impl: str | None = None):
    init = layers.Init(rngs, dtype, param_dtype)
    self.config = config
    self.remat = layers.check_remat(remat)
    self.embeddings = CLIPTextEmbeddings(config, init)
    self.encoder = CLIPEncoder(config, init, attention_impl, is_causal=True)
    self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)

  def __call__(self, input_ids):
    """input_ids [B, L] int -> (last_hidden_state [B, L, D], pooled [B, D])."""
    input_ids = jnp.asarray(input_ids)
    x = self.encoder(self.embeddings(input_ids), remat=self.remat)
    x = self.final_layer_norm(x)
    pooled = jnp.take_along_axis(x, self.pool_index(input_ids)[:, None, None], axis=1)[:, 0]
    return x, pooled

  def pool_index(self, input_ids):
    """The end-of-text position per sequence, as HF picks it.

    Configs from before transformers' fix of the EOS id (`eos_token_id == 2`, as in SD 1.5) take
    the largest token id, which is the end-of-text token of the original CLIP vocabulary. Others
    take the first occurrence of `eos_token_id` (position 0 if there is none, as torch does).
    """
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, init: layers.Init):
    d, p = config.hidden_size, config.patch_size
    self.image_size = config.image_size
    self.dtype = init.dtype
    self.class_embedding = nnx.Param(jax.random.normal(init.rngs.params(), (d,), init.param_dtype))
    self.patch_embedding = nnx.Conv(config.num_channels, d, (p, p), strides=p, padding="VALID",
                                    use_bias=False, dtype=init.dtype,
                                    param_dtype=init.param_dtype, rngs=init.rngs)
    num_patches = (config.image_size // p) ** 2
    self.position_embedding = nnx.Embed(num_patches + 1, d, dtype=init.dtype,
                                        param_dtype=init.param_dtype, rngs=init.rngs)

  def __call__(self, pixel_values):  # [B, H, W, C] -> [B, 1 + N, D]
    if pixel_values.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"pixel_values {pixel_values.shape} (NHWC): the model takes "
                       f"{self.image_size}x{self.image_size} images")
    patches = self.patch_embedding(pixel_values)  # [B, H/p, W/p, D]
    # Row-major over the patch grid, the order of torch's flatten of [B, D, H/p, W/p].
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    class_token = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                                   (patches.shape[0], 1, patches.shape[-1]))
    x = jnp.concatenate([class_token, patches], axis=1)
    return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionModel(nnx.Module):
  """HF `CLIPVisionModel` in Flax. Parameter paths are HF's keys without `vision_model.`.

  Args: as `CLIPTextModel`'s, with the vision config.
  """

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str = "none",
               attention_impl: str | None = None):
    init = layers.Init(rngs, dtype, param_dtype)
    self.config = config
    self.remat = layers.check_remat(remat)
    self.embeddings = CLIPVisionEmbeddings(config, init)
    # Sic: HF's spelling, which the torch keys carry.
    self.pre_layrnorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)
    self.encoder = CLIPEncoder(config, init, attention_impl, is_causal=False)
    self.post_layernorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)

  def __call__(self, pixel_values):
    """pixel_values [B, H, W, C] -> (last_hidden_state [B, 1 + N, D], pooled [B, D]).

    The pixels are normalised as CLIP's image processor does (per-channel mean and std).
    """
    x = self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values)))
    x = self.encoder(x, remat=self.remat)
    return x, self.post_layernorm(x[:, 0])  # pooled: the class token


class CLIPModel(nnx.Module):
  """HF `CLIPModel` in Flax: both towers, their projections and the logit scale.

  Parameter paths are HF's keys (`text_model.`, `vision_model.`, `visual_projection`,
  `text_projection`, `logit_scale`).

  Args:
    config: the CLIP config.
    rngs: initialisation randomness (weights are normally loaded over it).
    dtype: compute dtype.
    param_dtype: storage dtype of freshly initialised parameters.
    remat: what each transformer layer of both towers keeps for the backward pass.
    attention_impl: attention implementation (`livo_jax.models.attention`; None: the
      platform's best).
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str = "none",
               attention_impl: str | None = None):
    init = layers.Init(rngs, dtype, param_dtype)
    tower = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                 attention_impl=attention_impl)
    self.config = config
    self.text_model = CLIPTextModel(config.text_config, **tower)
    self.vision_model = CLIPVisionModel(config.vision_config, **tower)
    self.visual_projection = layers.linear(config.vision_config.hidden_size,
                                           config.projection_dim, init, bias=False)
    self.text_projection = layers.linear(config.text_config.hidden_size, config.projection_dim,
                                         init, bias=False)
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  def get_text_features(self, input_ids):
    """input_ids [B, L] int -> [B, P]: the pooled text vector projected (not normalised)."""
    return self.text_projection(self.text_model(input_ids)[1])

  def get_image_features(self, pixel_values):
    """pixel_values [B, H, W, C] normalised -> [B, P]: the pooled image vector projected."""
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def __call__(self, input_ids, pixel_values):
    """-> logits_per_image [B_img, B_txt]: exp(logit_scale) times the cosine similarities.

    The similarities are taken in float32 whatever the compute dtype: scaled by about 100, they
    are the scores that evaluation reads.
    """
    image = _unit(self.get_image_features(pixel_values).astype(jnp.float32))
    text = _unit(self.get_text_features(input_ids).astype(jnp.float32))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * image @ text.T


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
