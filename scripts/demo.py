r"""The whole LiVO method on a CPU in minutes, measured with the paper's metrics.

  python scripts/demo.py --workdir=/tmp/livo_demo

Pretrains a tiny shapes-world SD, builds a preference set from its own generations, trains a
value encoder with the SD 1.5 trainer (configs/demo.py), and evaluates base against LiVO.
Prints the results table and writes DIR/report.md, DIR/results.json, DIR/eval/grid.png and
DIR/eval/manifest.jsonl. A rerun resumes into its `--workdir`: it reuses every finished stage
(delete a stage's folder to redo it). Errors are one line ("error: ...", exit 1); Ctrl-C stops
with "interrupted" (exit 130) and leaves whole files only.
"""

import logging

from absl import flags

from livo_jax import cli
from livo_jax import demo

_WORKDIR = flags.DEFINE_string("workdir", None, "where every stage writes", required=True)


def main(argv):
  del argv  # cli.run refuses arguments
  logging.getLogger().setLevel(logging.INFO)   # the trainer reports through logging
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax and grain: every save and read
  demo.run(_WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
