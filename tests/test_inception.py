"""The FID InceptionV3 against torch-fidelity's `FeatureExtractorInceptionV3`, same random weights.

torch-fidelity (pip install --no-deps torch-fidelity==0.4.0) is the reference: its InceptionV3
module needs only torch, but its package `__init__` imports torchvision, which is not installed
beside our torch, so it is imported around that `__init__`. Without torch-fidelity the tests
are skipped.
"""

import importlib
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from livo_jax.errors import WeightsError
from livo_jax.models.inception import InceptionV3, resize_bilinear_tf1
from livo_jax.weights.inception import fill_fid_inception, load_fid_inception

import testutil

# The real architecture: parameters (conv weights, batch-norm scales and biases, fc: 2_065_392 of
# them) and batch-norm running statistics (buffers in torch).
NUM_PARAMS = 23_850_960
NUM_BATCH_STATS = 34_432


def torch_fidelity_module(name: str):
  """A torch-fidelity module (see `testutil.register_torch_fidelity`)."""
  if not testutil.register_torch_fidelity():
    pytest.skip("torch-fidelity is not installed (pip install --no-deps -r "
                "requirements-dev-nodeps.txt)")
  return importlib.import_module(f"torch_fidelity.{name}")


def randomize(model, seed: int):
  """Overwrites every parameter and batch-norm statistic with noise of a sensible scale.

  Convolutions get He-scaled weights so activations stay O(1) through the ~95 layers; running
  variances stay positive.
  """
  generator = torch.Generator().manual_seed(seed)
  noise = lambda t: torch.randn(t.shape, generator=generator)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():  # shares storage with the model
      if name.endswith("num_batches_tracked"):
        continue
      if tensor.ndim > 1:
        tensor.copy_(noise(tensor) * (2.0 / tensor[0].numel()) ** 0.5)
      elif name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
      elif name.endswith("bn.weight"):
        tensor.copy_(1.0 + 0.1 * noise(tensor))
      else:  # biases and running means
        tensor.copy_(0.1 * noise(tensor))
  return model.eval()


@pytest.fixture(scope="module")
def torch_model():
  module = torch_fidelity_module("feature_extractor_inceptionv3")
  # torch-fidelity loads (or downloads) its weights in the constructor: skip that, then randomise.
  with mock.patch.object(module, "load_state_dict_from_url", return_value={}), \
       mock.patch.object(module.FeatureExtractorInceptionV3, "load_state_dict"):
    model = module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"])
  return randomize(model, seed=0)


@pytest.fixture(scope="module")
def pth_path(torch_model, tmp_path_factory):
  """The state dict as `torch.save` writes it, `num_batches_tracked` included, as the real file."""
  path = str(tmp_path_factory.mktemp("weights") / "inception.pth")
  torch.save(torch_model.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def flax_model(pth_path):
  return load_fid_inception(pth_path)


def test_parameter_count(torch_model):
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  count = lambda kind: sum(var.size for _, var in nnx.to_flat_state(nnx.state(model, kind)))
  assert count(nnx.Param) == sum(p.numel() for p in torch_model.parameters()) == NUM_PARAMS
  torch_stats = sum(b.numel() for name, b in torch_model.named_buffers()
                    if name.endswith(("running_mean", "running_var")))
  assert count(nnx.BatchStat) == torch_stats == NUM_BATCH_STATS


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(flax_model, images):
  """(pool3, logits) of the float32 model."""
  return testutil.jitted(flax_model)(images)


def test_features_match_torch_fidelity(torch_model, flax_model, images, features):
  with torch.no_grad():
    ref_pool3, ref_unbiased, ref_logits = torch_model(
        torch.from_numpy(testutil.nhwc_to_nchw(images).copy()))
  pool3, logits = features
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  biased = np.asarray(logits) + np.asarray(flax_model.fc.bias[...])
  for ours, ref in ((pool3, ref_pool3), (logits, ref_unbiased), (biased, ref_logits)):
    ref = ref.numpy()
    assert testutil.max_abs_err(ours, ref) <= 1e-4 * np.abs(ref).max()


def test_bfloat16_compute_stays_close(pth_path, images, features):
  pool3, logits = testutil.jitted(load_fid_inception(pth_path, dtype=jnp.bfloat16))(images)
  assert pool3.dtype == logits.dtype == jnp.float32  # features stay float32 for the statistics
  for ours, ref in zip((pool3, logits), features):
    assert testutil.max_abs_err(ours, ref) <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("shape", [(37, 50), (512, 384)])
def test_resize_matches_tensorflow1_port(shape):
  interpolate = torch_fidelity_module("interpolate_compat_tensorflow")
  images = np.random.default_rng(1).uniform(0, 255, (2, *shape, 3)).astype(np.float32)
  ref = interpolate.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(testutil.nhwc_to_nchw(images).copy()), size=(299, 299),
      align_corners=False)
  ours = resize_bilinear_tf1(images, 299)
  assert ours.shape == (2, 299, 299, 3)
  assert testutil.max_abs_err(ours, testutil.nchw_to_nhwc(ref)) <= 1e-4


def test_safetensors_loads_the_same_weights(torch_model, flax_model, tmp_path):
  path = str(tmp_path / "inception.safetensors")
  save_file(testutil.torch_numpy_state(torch_model), path)
  loaded = nnx.to_flat_state(nnx.state(load_fid_inception(path)))
  expected = nnx.to_flat_state(nnx.state(flax_model))
  assert len(loaded) == len(expected) > 0
  for (path_a, a), (path_b, b) in zip(loaded, expected):
    assert path_a == path_b
    np.testing.assert_array_equal(a.get_value(), b.get_value())


@pytest.mark.parametrize("key", ["Mixed_6b.branch7x7_2.bn.running_var",
                                 "Mixed_7c.branch_pool.conv.weight", "fc.bias"])
def test_missing_key_is_named(torch_model, key):
  tensors = testutil.torch_numpy_state(torch_model)
  del tensors[key]
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError, match=f"missing key.*{key}"):
    fill_fid_inception(model, tensors, "test")


@pytest.mark.parametrize("key", ["Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch1x1.conv.weight"])
def test_mis_shaped_key_is_named(torch_model, key):
  tensors = testutil.torch_numpy_state(torch_model)
  tensors[key] = tensors[key][:-1]
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError, match=f"mis-shaped key.*{key}"):
    fill_fid_inception(model, tensors, "test")


def test_unexpected_key_is_named(torch_model):
  tensors = testutil.torch_numpy_state(torch_model)
  tensors["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError, match="unexpected key.*AuxLogits.fc.weight"):
    fill_fid_inception(model, tensors, "test")


def test_channels_first_images_are_refused(flax_model):
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    flax_model(np.zeros((1, 3, 299, 299), np.uint8))
