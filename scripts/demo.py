r"""The whole LiVO method on a CPU in minutes, measured with the paper's metrics.

  python scripts/demo.py --workdir=/tmp/livo_demo

Pretrains a tiny shapes-world SD, builds a preference set from its own generations, trains a
value encoder with the SD 1.5 trainer (configs/demo.py), and evaluates base against LiVO.
Prints the results table and writes DIR/report.md, DIR/results.json, DIR/eval/grid.png and
DIR/eval/manifest.jsonl. A rerun reuses every finished stage (delete a stage's folder to redo
it).
"""

import logging

from absl import app
from absl import flags

from livo_jax import demo

_WORKDIR = flags.DEFINE_string("workdir", None, "where every stage writes", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.getLogger().setLevel(logging.INFO)   # the trainer reports through logging
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax and grain: every save and read
  demo.run(_WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
