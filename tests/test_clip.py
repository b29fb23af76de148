"""CLIP text model against transformers' torch `CLIPTextModel`, loaded through our loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import testutil
from livo_jax.errors import ConfigError
from livo_jax import weights
from livo_jax.models import CLIPTextConfig, CLIPTextModel
from livo_jax.weights import load_clip_text

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12)
# A modern config: the end-of-text id is a real token and pooling takes its first occurrence
# (here it is also the padding token, so the *first* one matters), with exact gelu.
MODERN = dict(TINY, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1,
              hidden_act="gelu")
# SD 1.5's legacy config: `eos_token_id == 2` pools at argmax(input_ids), quick_gelu.
LEGACY = dict(TINY, eos_token_id=2, bos_token_id=0, pad_token_id=1, hidden_act="quick_gelu")

# [bos, tokens..., eos, pad...]; in the legacy rows the eos (VOCAB - 1) is the largest id.
INPUT_IDS = np.array([
    [VOCAB - 2, 5, 17, 9, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, 1, 1],
    [VOCAB - 2, 30, VOCAB - 1, 2, 7, VOCAB - 1, 1, 1, 1, 1, 1, 1],
])


def torch_clip(config_kwargs, folder):
  model = testutil.randomize(
      transformers.CLIPTextModel(transformers.CLIPTextConfig(**config_kwargs)), seed=0)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module", params=["modern", "legacy"])
def clip_pair(request, tmp_path_factory):
  config = {"modern": MODERN, "legacy": LEGACY}[request.param]
  folder = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
  return torch_clip(config, folder), folder


def test_parity_with_transformers(clip_pair):
  torch_model, folder = clip_pair
  model = load_clip_text(folder)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(INPUT_IDS))
  hidden, pooled = testutil.jitted(model)(jnp.asarray(INPUT_IDS))
  assert hidden.shape == (2, 12, 32) and pooled.shape == (2, 32)
  assert testutil.max_abs_err(hidden, ref.last_hidden_state) <= 1e-5
  assert testutil.max_abs_err(pooled, ref.pooler_output) <= 1e-5


def test_pool_index_follows_hf_rule(clip_pair):
  _, folder = clip_pair
  model = load_clip_text(folder)
  index = np.asarray(model.pool_index(jnp.asarray(INPUT_IDS)))
  if model.config.eos_token_id == 2:
    np.testing.assert_array_equal(index, INPUT_IDS.argmax(-1))
  else:  # the first end-of-text token, not the padding after it
    np.testing.assert_array_equal(index, [4, 2])


def test_bf16_compute_close_to_fp32(clip_pair):
  _, folder = clip_pair
  ids = jnp.asarray(INPUT_IDS)
  hidden32, _ = load_clip_text(folder)(ids)
  hidden16, _ = load_clip_text(folder, dtype=jnp.bfloat16)(ids)
  assert hidden16.dtype == jnp.bfloat16
  rel = testutil.max_abs_err(hidden16, hidden32) / float(jnp.abs(hidden32).max())
  assert rel < 2e-2  # measured 9.0e-3 (modern) and 9.6e-3 (legacy)


def test_remat_gives_same_values_and_gradients(clip_pair):
  _, folder = clip_pair
  ids = jnp.asarray(INPUT_IDS)

  def pooled_grad(model):
    loss = lambda m: jnp.sum(m(ids)[1] ** 2)
    return nnx.value_and_grad(loss)(model)

  value, grads = pooled_grad(load_clip_text(folder))
  value_r, grads_r = pooled_grad(load_clip_text(folder, remat="blocks"))
  assert float(value) == pytest.approx(float(value_r), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sd15_text_encoder_parameter_count():
  config = weights.CLIP_TEXT.config_from_dict({
      "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
      "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
      "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
      "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
      "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
      "projection_dim": 768, "torch_dtype": "float32", "transformers_version": "4.22.0.dev0",
      "vocab_size": 49408})
  model = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == 123_060_480


@pytest.mark.parametrize("field,value", [("hidden_act", "relu"), ("num_attention_heads", 5)])
def test_unsupported_config_value_names_the_field(field, value):
  with pytest.raises(ConfigError, match=field):
    weights.CLIP_TEXT.config_from_dict(dict(TINY, **{field: value}), source="x/config.json")


def test_unknown_config_field_is_named():
  with pytest.raises(ConfigError, match="unknown config field 'rope_theta'"):
    weights.CLIP_TEXT.config_from_dict(dict(TINY, rope_theta=10000.0), source="x/config.json")
