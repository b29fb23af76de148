"""Process-level setup of a training run: multi-process JAX, preemption and Ctrl-C, the
compilation cache, the workdir lock.

One `scripts/train.py` command runs unchanged on one CPU, one GPU, a TPU slice or a GPU cluster:

  initialize_distributed(coordinator_address, num_processes, process_id)   # before any JAX use
  enable_compilation_cache("~/.cache/livo_jax/compilation")
  with WorkdirLock(workdir):                                             # one run per workdir
    preemption = PreemptionWatch()
    for step in ...:
      ...
      if preemption.reached(step): save a checkpoint on every host, stop

Multi-process runs start from explicit flags, or from what JAX detects itself (a Cloud TPU pod
slice's metadata, a SLURM allocation with several tasks); otherwise the run is one process.
"""

import fcntl
import logging
import os
import signal
import socket
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from livo_jax.errors import ConfigError, RunError


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
  """Whether to stop at a step boundary: the job is being preempted (SIGTERM) or the user
  pressed Ctrl-C (SIGINT).

  Multi-process: JAX's preemption sync point, so that every host stops at the same step
  (JAX's coordination service listens for the SIGTERM itself; Ctrl-C keeps its default there).
  One process: handlers that set a flag; a second Ctrl-C interrupts at once. The previous
  handlers are restored by `close`.
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.signal_name = None
    self._previous = {}
    # Signal handlers can only be set from the main thread (a run driven from another thread
    # simply has no single-process preemption watch).
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s: saving a checkpoint at the next step boundary, then stopping%s",
                    self.signal_name, " (Ctrl-C again: stop now, without it)"
                    if signum == signal.SIGINT else "")

  def reached(self, step: int) -> bool:
    """Call after every step, on every process; True: save and stop now."""
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


class WorkdirLock:
  """`workdir/.lock`: one run per workdir, held for the run's lifetime.

  An advisory `flock` on the file, which the kernel drops when its process dies however it
  dies, so a lock is never stale; the file names the holder (host, pid, start time) for the
  message a second run prints, and is removed on release. (A run that locked a file its holder
  removed meanwhile sees that the path no longer leads to it, and locks the new one.) Process 0
  holds it for a multi-process run.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    refusal = self._acquire() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:
      refused = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
      refusal = refusal or (f"{self.path}: process 0 could not lock the workdir"
                            if int(refused) else "")
    if refusal:
      raise RunError(refusal)
    return self

  def _acquire(self) -> str:
    """Takes the lock; returns "" or why it cannot."""
    while True:
      self._file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
      try:
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._file.seek(0)
        holder = self._file.read().strip() or "another process"
        self._close()
        return (f"{self.path}: the workdir is in use by {holder}; wait for that run, or give "
                "another --workdir")
      except OSError as e:   # a file system without locks: run, but say so
        logging.warning("%s: cannot lock (%s); make sure no other run uses this workdir",
                        self.path, e.strerror)
        break
      if _same_file(self._file, self.path):
        break
      self._close()
    self._file.seek(0)
    previous = self._file.read().strip()
    if previous:
      logging.warning("%s: the previous run (%s) ended without releasing the workdir",
                      self.path, previous)
    self._file.truncate(0)
    self._file.write(f"{socket.gethostname()} pid {os.getpid()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self._file.flush()
    return ""

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      if _same_file(self._file, self.path):
        os.remove(self.path)   # while still locked: a waiting run then locks a new file
      self._close()

  def _close(self) -> None:
    self._file.close()   # closing drops the flock
    self._file = None


def _same_file(file, path: str) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
  except FileNotFoundError:
    return False
