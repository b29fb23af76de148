"""Converts Stable Diffusion weights between PyTorch folders and Flax checkpoints.

  python tools/convert_weights.py import SRC DST   # torch folder -> Flax checkpoint (orbax)
  python tools/convert_weights.py export SRC DST   # Flax checkpoint -> torch folder
  python tools/convert_weights.py inspect PATH     # keys, shapes, dtypes, parameter counts

SRC may be one component folder (`unet/`, `vae/`, `text_encoder/`) or a whole diffusers SD folder
(with `model_index.json`); other entries of an SD folder (tokenizer, scheduler, ...) are copied
along. `import` then `export` reproduces every tensor bit for bit.
"""

import argparse
import signal
import sys

from livo_jax import convert
from livo_jax.errors import ConfigError, WeightsError


def inspect(path: str) -> None:
  total = 0
  for component, info in convert.describe_folder(path).items():
    tensors = info["tensors"]
    count = sum(_size(shape) for shape, _ in tensors.values())
    total += count
    print(f"== {component}: {info['kind']} ({info['format']}), {len(tensors)} tensors, "
          f"{count:,} parameters")
    width = max(map(len, tensors), default=0)
    for key, (shape, dtype) in tensors.items():
      print(f"  {key:<{width}}  {dtype:<9} {shape}")
  print(f"total: {total:,} parameters")


def _size(shape) -> int:
  size = 1
  for dim in shape:
    size *= dim
  return size


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (("import", "torch folder -> Flax checkpoint"),
                          ("export", "Flax checkpoint -> torch folder")):
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("src")
    sub.add_argument("dst")
  commands.add_parser("inspect", help="print keys, shapes, dtypes, counts").add_argument("path")
  args = parser.parse_args(argv)
  signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `inspect ... | head` ends quietly
  try:
    if args.command == "inspect":
      inspect(args.path)
    else:
      convert_folder = convert.import_folder if args.command == "import" else convert.export_folder
      for line in convert_folder(args.src, args.dst):
        print(f"wrote {line}")
  except (ConfigError, WeightsError, FileNotFoundError, FileExistsError) as e:
    message = " ".join(str(e).split())  # one line, however long the key lists
    print(f"convert_weights {args.command}: error: {message}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
