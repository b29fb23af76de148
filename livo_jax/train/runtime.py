"""Process-level setup of a training run: multi-process JAX, preemption, the compilation cache.

One `scripts/train.py` command runs unchanged on one CPU, one GPU, a TPU slice or a GPU cluster:

  initialize_distributed(coordinator_address, num_processes, process_id)   # before any JAX use
  enable_compilation_cache("~/.cache/livo_jax/compilation")
  preemption = PreemptionWatch()
  for step in ...:
    ...
    if preemption.reached(step): save a checkpoint on every host, stop

Multi-process runs start from explicit flags, or from what JAX detects itself (a Cloud TPU pod
slice's metadata, a SLURM allocation with several tasks); otherwise the run is one process.
"""

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from livo_jax.errors import ConfigError


def _cluster_detected() -> str | None:
  """The environment that makes this a multi-process run, if any (TPU pod, SLURM)."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "SLURM"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return "Cloud TPU pod"
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, detect: bool = False) -> bool:
  """Starts multi-process JAX when asked or detected; returns whether it did.

  Explicit `coordinator_address`, `num_processes` and `process_id`; or `detect`: JAX's own
  cluster detection (Cloud TPU metadata, SLURM, ...), what the TPU-pod launcher asks for; or,
  with neither, a SLURM allocation of several tasks or a TPU pod environment seen here. Must run
  before anything touches a JAX device.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    cluster = "the cluster JAX detects" if detect else _cluster_detected()
    if cluster is None:
      return False
    logging.info("%s: starting multi-process JAX", cluster)
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory` ("" leaves it off): a restart (after a
  preemption, say) loads the compiled step instead of compiling it again."""
  if not directory:
    return
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class PreemptionWatch:
  """Whether to stop at a step boundary because the job is being preempted (SIGTERM).

  Multi-process: JAX's preemption sync point, so that every host stops at the same step
  (JAX's coordination service listens for the SIGTERM itself). One process: a SIGTERM handler
  that sets a flag. The previous handler is restored by `close`.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._signalled = False
    self._previous = None
    # Signal handlers can only be set from the main thread (a run driven from another thread
    # simply has no single-process preemption watch).
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM: saving a checkpoint at the next step boundary, then stopping")
    self._signalled = True

  def reached(self, step: int) -> bool:
    """Call after every step, on every process; True: save and stop now."""
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
