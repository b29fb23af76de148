"""Helpers shared by the tests: tiny torch reference models and layout conversions."""

import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import torch
from flax import nnx

from livo_jax import weights


def torch_numpy_state(torch_module) -> dict[str, np.ndarray]:
  """A torch module's state dict as numpy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}


def copy_torch_weights(flax_model: nnx.Module, torch_module) -> nnx.Module:
  """Loads the torch module's weights into the Flax model (through the real converter)."""
  weights.layout.fill_from_torch(flax_model, torch_numpy_state(torch_module),
                          source=type(torch_module).__name__)
  return flax_model


def nchw_to_nhwc(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def max_abs_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def randomize(torch_module, seed: int, std: float = 0.1):
  """Overwrites every torch parameter with noise (norm scales around 1), in eval mode.

  Libraries zero-initialise some layers (output convs, projections), which would hide bugs in
  the layers before them.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_module.named_parameters():
      mean = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
      p.copy_(mean + std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
  return torch_module.eval()


def jitted(model: nnx.Module, method: str = "__call__"):
  """`model.method` compiled, with the parameters as a jit argument rather than constants."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
  return lambda *args: fn(state, *args)


def register_torch_fidelity() -> bool:
  """Makes torch-fidelity's modules importable without its package `__init__`.

  torch-fidelity (our InceptionV3 reference, and imported by torchmetrics whenever it is
  installed) imports torchvision in its `__init__`, which does not import beside this torch. Its
  InceptionV3 modules need only torch, so an empty package stands in for it. Returns whether
  torch-fidelity is installed (requirements-dev-nodeps.txt).
  """
  if "torch_fidelity" in sys.modules:
    return True
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    return False
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules["torch_fidelity"] = package
  return True
