r"""The whole LiVO method on a CPU in minutes, measured with the paper's metrics.

  python scripts/demo.py --workdir=/tmp/livo_demo
  python scripts/demo.py --workdir=/tmp/livo_demo --seeds=3    # mean +- sd over 3 LiVO runs

Pretrains a tiny shapes-world SD, builds a preference set from its own generations, trains a
value encoder with the SD 1.5 trainer (configs/demo.py), and evaluates base against LiVO.
Prints the results table (seen and held-out prompts; with --seeds=N, the preference set and
LiVO are rerun with N seeds on the same base and each metric is mean +- sd and min over them) and
writes DIR/report.md, DIR/results.json, DIR/eval/grid.png, DIR/eval/grid_held_out.png and
DIR/eval/manifest.jsonl. A rerun resumes into its `--workdir`: it reuses every finished stage
(delete a stage's folder to redo it). Errors are one line ("error: ...", exit 1); Ctrl-C stops
with "interrupted" (exit 130) and leaves whole files only.
"""

import logging

from absl import flags

from livo_jax import cli
from livo_jax import demo

_WORKDIR = flags.DEFINE_string("workdir", None, "where every stage writes", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 1, "LiVO runs (preference set and training) on the same "
                              "base, each with its own seed", lower_bound=1)


def main(argv):
  del argv  # cli.run refuses arguments
  logging.getLogger().setLevel(logging.INFO)   # the trainer reports through logging
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax and grain: every save and read
  demo.run(_WORKDIR.value, demo.DemoSettings(seeds=_SEEDS.value))


if __name__ == "__main__":
  cli.run(main)
