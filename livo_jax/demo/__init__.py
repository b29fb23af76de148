"""The CPU demo: the whole method in minutes on a procedural world of coloured shapes.

Modules: `shapes` (the world: images, captions, a one-token-per-word tokenizer, colour and shape
judges), `pretrain` (the base model, a tiny SD), `config` (the LiVO stage's trainer config),
`judges` (the judges in the evaluation's roles) and `stages` (the four stages, `run`). Run it with
`python scripts/demo.py --workdir=DIR`.
"""

from livo_jax.demo.stages import DemoSettings, run

__all__ = ["DemoSettings", "run"]
