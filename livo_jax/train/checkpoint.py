"""Training checkpoints (orbax) with automatic resume.

A checkpoint holds the whole train state (value-encoder params, optimizer state, step, RNG) and
the data iterator's state, so a resumed run continues with exactly the batches and noise it
would have seen. Restores go straight onto the target shardings (abstract arrays), so a run can
resume on another mesh.
"""

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """`workdir/checkpoints`: save every N steps, keep the last K, restore the latest."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any]) -> None:
    """Starts an asynchronous save; training goes on while it is written."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at `step`, placed as `abstract_state`'s shardings say, and the data state."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def close(self) -> None:
    """Waits for pending saves."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`: a restore target."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
