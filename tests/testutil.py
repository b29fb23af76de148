"""Helpers shared by the tests: tiny torch reference models and layout conversions."""

import numpy as np
from flax import nnx

from livo_jax import convert


def torch_numpy_state(torch_module) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}


def copy_torch_weights(flax_model: nnx.Module, torch_module, *, drop=()) -> nnx.Module:
  """Loads the torch module's weights into the Flax model (through the real converter)."""
  tensors = {k: v for k, v in torch_numpy_state(torch_module).items() if k not in drop}
  convert.fill_from_torch(flax_model, tensors, source=type(torch_module).__name__)
  return flax_model


def nchw_to_nhwc(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def max_abs_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
