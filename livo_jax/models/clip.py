"""CLIP text transformer with the semantics of HF transformers' `CLIPTextModel`.

`CLIPTextModel(config)(input_ids [B, L]) -> (last_hidden_state [B, L, D], pooled [B, D])`:
token + position embeddings, pre-norm causal transformer layers, final layer norm, and the
pooled vector taken at the end-of-text token exactly where HF takes it.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from livo_jax.errors import ConfigError
from livo_jax.models import layers
from livo_jax.models.configs import parse_config

# `gelu` is the exact erf form in transformers; `gelu_new`/`gelu_pytorch_tanh` the tanh form.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Generic `PretrainedConfig` fields that transformers writes into config.json (older releases
# write many of them) and that do not change a CLIP text forward pass.
_GENERIC_HF_FIELDS = (
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

  @classmethod
  def from_dict(cls, raw, source: str = "config.json") -> "CLIPTextConfig":
    return parse_config(cls, raw, ignored=_GENERIC_HF_FIELDS, source=source)

  def validate(self, source: str) -> None:
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(f"{source}: field 'hidden_act' = {self.hidden_act!r} is not supported "
                        f"(supported: {', '.join(_ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{source}: field 'hidden_size' = {self.hidden_size} is not divisible "
                        f"by 'num_attention_heads' = {self.num_attention_heads}")


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

  def __init__(self, config: CLIPTextConfig, init: layers.Init, attention_impl: str | None):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.attention_impl = attention_impl
    self.q_proj = layers.linear(d, d, init)
    self.k_proj = layers.linear(d, d, init)
    self.v_proj = layers.linear(d, d, init)
    self.out_proj = layers.linear(d, d, init)

  def __call__(self, x):
    out = layers.multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                      self.num_heads, is_causal=True,
                                      implementation=self.attention_impl)
    return self.out_proj(out)


class CLIPMLP(nnx.Module):

  def __init__(self, config: CLIPTextConfig, init: layers.Init):
    self.activation = _ACTIVATIONS[config.hidden_act]
    self.fc1 = layers.linear(config.hidden_size, config.intermediate_size, init)
    self.fc2 = layers.linear(config.intermediate_size, config.hidden_size, init)

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, config: CLIPTextConfig, init: layers.Init, attention_impl: str | None):
    self.layer_norm1 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)
    self.self_attn = CLIPAttention(config, init, attention_impl)
    self.layer_norm2 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)
    self.mlp = CLIPMLP(config, init)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, config: CLIPTextConfig, init: layers.Init, attention_impl: str | None):
    self.layers = nnx.List([CLIPEncoderLayer(config, init, attention_impl)
                            for _ in range(config.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
  """HF `CLIPTextModel` in Flax. Parameter paths are HF's keys without the `text_model.` prefix.

  Args:
    config: the text config.
    rngs: initialisation randomness (weights are normally loaded over it).
    dtype: compute dtype.
    param_dtype: storage dtype of freshly initialised parameters.
    remat: recompute each transformer layer in the backward pass (saves activation memory when
      the model is trained, as the value encoder is).
    attention_impl: `implementation` for `jax.nn.dot_product_attention`.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: bool = False, attention_impl: str | None = None):
    init = layers.Init(rngs, dtype, param_dtype)
    self.config = config
    self.remat = remat
    self.embeddings = CLIPTextEmbeddings(config, init)
    self.encoder = CLIPEncoder(config, init, attention_impl)
    self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps, init)

  def __call__(self, input_ids):
    """input_ids [B, L] int -> (last_hidden_state [B, L, D], pooled [B, D])."""
    input_ids = jnp.asarray(input_ids)
    x = self.embeddings(input_ids)
    for layer in self.encoder.layers:
      x = layers.call(layer, x, remat=self.remat)
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
