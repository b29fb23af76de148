"""CLIP image-text model against transformers' torch `CLIPModel`, loaded through our loader."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import testutil
from livo_jax import weights
from livo_jax.errors import ConfigError
from livo_jax.models import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from livo_jax.weights import load_clip

VOCAB = 64
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12)
# As in test_clip.py: a modern text config pools at the first end-of-text token (also the
# padding here), a legacy one (`eos_token_id == 2`) at argmax(input_ids).
TEXT_CONFIGS = {
    "modern": dict(TEXT, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1,
                   hidden_act="gelu"),
    "legacy": dict(TEXT, eos_token_id=2, bos_token_id=0, pad_token_id=1, hidden_act="quick_gelu"),
}
# A vision width unlike the text width, so that swapped towers or projections cannot load.
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
PROJECTION_DIM = 16

INPUT_IDS = np.array([
    [VOCAB - 2, 5, 17, 9, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, VOCAB - 1, 1, 1],
    [VOCAB - 2, 30, VOCAB - 1, 2, 7, VOCAB - 1, 1, 1, 1, 1, 1, 1],
])
# Three images against two texts, so that a transposed logits matrix has the wrong shape.
PIXELS = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)  # NHWC

# openai/clip-vit-large-patch14's config.json (transformers 4.21 wrote it), its generic fields
# abridged. transformers builds each tower from its `*_config_dict` with defaults and lets that
# override `*_config`: the text tower ends up with the default eos_token_id 49407, not 2.
VIT_L14 = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPModel"],
    "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
    "projection_dim": 768, "torch_dtype": "float32", "transformers_version": None,
    "text_config": {
        "_name_or_path": "", "architectures": None, "attention_dropout": 0.0,
        "bad_words_ids": None, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
        "hidden_act": "quick_gelu", "hidden_size": 768, "id2label": {"0": "LABEL_0"},
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
        "projection_dim": 768, "pruned_heads": {}, "top_k": 50, "vocab_size": 49408},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                         "num_attention_heads": 12, "num_hidden_layers": 12,
                         "projection_dim": 768},
    "vision_config": {
        "_name_or_path": "", "architectures": None, "attention_dropout": 0.0,
        "bos_token_id": None, "dropout": 0.0, "eos_token_id": None, "hidden_act": "quick_gelu",
        "hidden_size": 1024, "image_size": 224, "initializer_range": 0.02,
        "intermediate_size": 4096, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
        "pad_token_id": None, "patch_size": 14, "projection_dim": 768, "top_k": 50},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                           "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                           "projection_dim": 768},
}


def rel_err(ours, ref) -> float:
  """Max abs error over the max abs reference value."""
  return testutil.max_abs_err(ours, ref) / float(np.abs(np.asarray(ref)).max())


def torch_inputs():
  return (torch.from_numpy(INPUT_IDS),
          torch.from_numpy(np.ascontiguousarray(testutil.nhwc_to_nchw(PIXELS))))


def torch_logits(torch_model):
  ids, pixels = torch_inputs()
  with torch.no_grad():
    return torch_model(input_ids=ids, pixel_values=pixels).logits_per_image


def tensors_of(folder):
  return load_file(os.path.join(folder, "model.safetensors"))


def assert_bit_exact(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    assert a[key].tobytes() == b[key].tobytes(), key


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def clip_pair(request, tmp_path_factory):
  config = transformers.CLIPConfig(text_config=TEXT_CONFIGS[request.param],
                                   vision_config=VISION, projection_dim=PROJECTION_DIM)
  torch_model = testutil.randomize(transformers.CLIPModel(config), seed=0)
  folder = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
  torch_model.save_pretrained(folder)
  return torch_model, folder


def test_parity_with_transformers(clip_pair):
  torch_model, folder = clip_pair
  model = load_clip(folder)
  ids, pixels = torch_inputs()
  with torch.no_grad():
    ref_image = torch_model.get_image_features(pixel_values=pixels).pooler_output
    ref_text = torch_model.get_text_features(input_ids=ids).pooler_output
  ref_logits = torch_logits(torch_model)
  ids, pixels = jnp.asarray(INPUT_IDS), jnp.asarray(PIXELS)
  image = testutil.jitted(model, "get_image_features")(pixels)
  text = testutil.jitted(model, "get_text_features")(ids)
  logits = testutil.jitted(model)(ids, pixels)
  assert image.shape == (3, PROJECTION_DIM) and text.shape == (2, PROJECTION_DIM)
  assert logits.shape == (3, 2)
  # Measured (legacy / modern): image 3.5e-7 / 3.5e-7, text 3.2e-7 / 3.0e-7,
  # logits 2.7e-6 / 1.4e-6.
  assert rel_err(image, ref_image) <= 1e-4
  assert rel_err(text, ref_text) <= 1e-4
  assert rel_err(logits, ref_logits) <= 1e-4


def test_position_ids_buffers_are_tolerated(clip_pair, tmp_path):
  _, src = clip_pair
  folder = str(tmp_path / "with_buffers")
  shutil.copytree(src, folder)
  tensors = tensors_of(folder)
  tensors["text_model.embeddings.position_ids"] = np.arange(TEXT["max_position_embeddings"])[None]
  tensors["vision_model.embeddings.position_ids"] = np.arange(17)[None]  # (32 / 8)^2 + 1
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  assert_bit_exact(weights.layout.flax_state_dict(load_clip(src)),
                   weights.layout.flax_state_dict(load_clip(folder)))


def test_import_export_round_trip_is_bit_exact_and_torch_reloads(clip_pair, tmp_path):
  torch_model, src = clip_pair
  flax_dir, torch_dir = str(tmp_path / "flax"), str(tmp_path / "torch")
  weights.conversion.import_folder(src, flax_dir)
  weights.conversion.export_folder(flax_dir, torch_dir)
  assert weights.tensors.is_flax_checkpoint(flax_dir)
  assert [info["kind"] for info in weights.conversion.describe_folder(flax_dir).values()] == ["clip"]
  assert_bit_exact(tensors_of(src), tensors_of(torch_dir))
  reloaded, info = transformers.CLIPModel.from_pretrained(torch_dir, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  # The written config.json rebuilds the same torch model, pooling rule included.
  assert torch.equal(torch_logits(reloaded.eval()), torch_logits(torch_model))


def test_model_built_in_jax_saves_as_torch_folder(tmp_path):
  config = CLIPConfig(text_config=CLIPTextConfig(**TEXT_CONFIGS["modern"]),
                      vision_config=CLIPVisionConfig(**VISION), projection_dim=PROJECTION_DIM)
  model = CLIPModel(config, rngs=nnx.Rngs(0))
  weights.save_pretrained(model, str(tmp_path / "clip"))
  torch_model, info = transformers.CLIPModel.from_pretrained(str(tmp_path / "clip"),
                                                             output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert torch_model.logit_scale.item() == pytest.approx(2.6592)
  logits = testutil.jitted(model)(jnp.asarray(INPUT_IDS), jnp.asarray(PIXELS))
  ref = torch_logits(torch_model.eval())
  assert rel_err(logits, ref) <= 1e-4


def test_openai_config_layout_resolves_as_transformers_does():
  ours = weights.CLIP.config_from_dict(VIT_L14, source="x/config.json")
  ref = transformers.CLIPConfig.from_dict(VIT_L14)
  for tower, ref_tower in ((ours.text_config, ref.text_config),
                           (ours.vision_config, ref.vision_config)):
    for name, value in vars(tower).items():
      assert value == getattr(ref_tower, name), name
  assert ours.text_config.eos_token_id == 49407
  assert ours.projection_dim == ref.projection_dim == 768


def test_vit_l14_parameter_count_matches_transformers():
  config = weights.CLIP.config_from_dict(VIT_L14, source="x/config.json")
  model = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0)))
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    torch_model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(VIT_L14))
  assert count == sum(p.numel() for p in torch_model.parameters()) == 427_616_513


def test_wrong_image_size_is_refused(clip_pair):
  _, folder = clip_pair
  with pytest.raises(ValueError, match="32x32"):
    load_clip(folder).get_image_features(np.zeros((1, 16, 16, 3), np.float32))


def tiny_config_dict(**edits):
  raw = {"model_type": "clip", "projection_dim": PROJECTION_DIM,
         "text_config": dict(TEXT_CONFIGS["modern"]), "vision_config": dict(VISION)}
  for key, value in edits.items():
    if isinstance(value, dict):
      raw[key].update(value)
    else:
      raw[key] = value
  return raw


@pytest.mark.parametrize("edits,message", [
    (dict(rope_theta=1e4), r"x/config.json: unknown config field 'rope_theta'"),
    (dict(vision_config={"use_rope": True}),
     r"\(vision_config\): unknown config field 'use_rope'"),
    (dict(text_config={"hidden_act": "relu"}), r"\(text_config\): field 'hidden_act'"),
    (dict(vision_config={"patch_size": [8, 4]}), r"\(vision_config\): field 'patch_size'"),
])
def test_bad_config_field_is_named(edits, message):
  with pytest.raises(ConfigError, match=message):
    weights.CLIP.config_from_dict(tiny_config_dict(**edits), source="x/config.json")
