r"""The whole LiVO method on a CPU in minutes, measured with the paper's metrics.

  python scripts/demo.py --workdir=/tmp/livo_demo

Pretrains a tiny shapes-world SD, builds a preference set from its own generations, trains a
value encoder with scripts/train.py --config=configs/demo.py, and evaluates base against LiVO.
Prints the results table and writes DIR/report.md, DIR/report.png and DIR/eval/manifest.jsonl.
A rerun reuses every finished stage (delete a stage's folder to redo it).
"""

from absl import app
from absl import flags

from livo_jax import demo

_WORKDIR = flags.DEFINE_string("workdir", None, "where every stage writes", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  demo.run(_WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
