r"""Trains a LiVO value encoder against a frozen Stable Diffusion.

  python scripts/train.py --config=configs/sd15.py --workdir=/tmp/livo \
      --config.model.pretrained=/path/to/sd15 --config.data.train_dir=/path/to/livo_data
  python scripts/train.py --config=configs/sd15.py --workdir=/tmp/livo \
      --config.model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --config.data.train_dir=/path/to/livo_data       # a Hub id (docs/weights.md)

Any config key can be overridden with `--config.KEY=VALUE`; an unknown key is an error. A rerun
with the same workdir resumes from its latest checkpoint; SIGTERM (a preemption) or Ctrl-C saves
one at the next step and exits cleanly. Errors are one line and exit 1 (docs/reliability.md). Multi-process runs add `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` to each process's command, or take them from the Cloud TPU or
SLURM environment (docs/multihost.md).
"""

import logging
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from livo_jax import cli
from livo_jax import train
from livo_jax.train import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and exports go",
                               required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process runs: HOST:PORT of process 0 (TPU pods and SLURM "
    "allocations are detected without it)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process runs: how many")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process runs: this one's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process runs: let JAX detect the cluster (Cloud TPU, SLURM)")


def parse_flags(argv):
  """absl's parser, with a one-line error for an unknown `--config.KEY` or a bad value."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: the key does not exist
    text = str(e).replace("\\", "")
    key = re.search(r"'(\w+)", text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if key and key.group(1) in o.split(".")]
    hint = re.search(r'Did you mean "(\w+)"', text)
    sys.exit(f"error: unknown config key {named[0] if named else text!r}"
             + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
             + "; the config file lists the keys")
  except flags.Error as e:
    sys.exit(f"error: {cli.one_line(e)} (see --helpfull for the flags)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_libraries()   # JAX's missing-backend notes, transformers' advice; not --verbosity
  logging.getLogger().setLevel(logging.INFO)
  # orbax and grain log every save and read through absl's logger; ours is the root logger.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   detect=_DISTRIBUTED.value)
    train.train(_CONFIG.value, _WORKDIR.value)
  except cli.USER_ERRORS as e:   # Config/Data/WeightsError, Hub and file errors, RunError
    sys.exit(f"error: {cli.one_line(e)}")
  except KeyboardInterrupt:   # a second Ctrl-C, or one before the first step
    print("interrupted", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
