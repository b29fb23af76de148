"""The FID InceptionV3's weights: pytorch-fid's / torch-fidelity's torch state dict.

  model = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")   # or a .safetensors copy
  pool3, logits = model(images)

Parameters follow the generic rule (`layout`); the batch-norm statistics, which are not
parameters, take the torch names `models.inception.BATCH_STAT_KEYS` gives them.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax.errors import WeightsError
from livo_jax.models.inception import BATCH_STAT_KEYS, InceptionV3
from livo_jax.weights import layout
from livo_jax.weights import tensors as tensor_files


def _stat_key(path: tuple) -> str:
  return ".".join(map(str, path[:-1])) + "." + BATCH_STAT_KEYS[path[-1]]


def fill_fid_inception(model: InceptionV3, tensors, source: str, dtype=None) -> None:
  """Sets every parameter and batch-norm statistic of `model` from a torch state dict.

  `num_batches_tracked` entries (training counters) are ignored. Raises `WeightsError` naming
  the missing, unexpected and mis-shaped keys; nothing is changed unless all keys match. `dtype`
  casts the values (None keeps the stored dtypes).
  """
  tensors = {k: v for k, v in tensors.items() if not k.endswith(".num_batches_tracked")}
  stats = {_stat_key(path): var
           for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  problems = [f"missing key {key}" for key in sorted(set(stats) - set(tensors))]
  problems += [f"mis-shaped key {key}: file {tuple(tensors[key].shape)}, model expects "
               f"{tuple(var.shape)}"
               for key, var in stats.items()
               if key in tensors and tuple(tensors[key].shape) != tuple(var.shape)]
  if problems:
    raise WeightsError(f"{source}: batch-norm statistics do not match InceptionV3: "
                       + "; ".join(problems))
  # Checks the parameters (naming missing, unexpected and mis-shaped keys) and sets them.
  layout.fill_from_torch(model, {k: v for k, v in tensors.items() if k not in stats}, source,
                         dtype=dtype)
  for key, var in stats.items():
    var.set_value(jnp.asarray(np.asarray(tensors[key]), dtype=dtype))


def load_fid_inception(path: str, dtype=jnp.float32, param_dtype=None) -> InceptionV3:
  """The FID InceptionV3 with the weights of a torch state-dict file.

  Args:
    path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
      `weights-inception-2015-12-05-6726825d.pth` is the same file), any `.pth`/`.pt`/`.bin`
      state dict (needs torch), or a safetensors file with the same keys.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters; None keeps the file's dtypes.
  """
  tensors = tensor_files.open_tensors(path)
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype))
  fill_fid_inception(model, tensors, path, dtype=param_dtype)
  return model
