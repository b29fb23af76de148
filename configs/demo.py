"""LiVO on the CPU demo's shapes-world model: the SD 1.5 recipe sized for a CPU.

  python scripts/train.py --config=configs/demo.py --workdir=/tmp/livo_demo/livo \
      --config.model.pretrained=/tmp/livo_demo/base_model \
      --config.data.train_dir=/tmp/livo_demo/preference_data

`scripts/demo.py` runs this config as its third stage. The settings, what differs from the
recipe, and why are in `livo_jax/demo/config.py`; expected on a 2-core CPU: under a minute.
"""

from livo_jax.demo import config


def get_config(arg=None):
  return config.get_config(arg)
