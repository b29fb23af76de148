"""Converts Stable Diffusion weights between PyTorch folders and Flax checkpoints.

  python tools/convert_weights.py import SRC DST   # torch folder -> Flax checkpoint (orbax)
  python tools/convert_weights.py export SRC DST   # Flax checkpoint -> torch folder
  python tools/convert_weights.py inspect PATH     # keys, shapes, dtypes, parameter counts
  python tools/convert_weights.py import stable-diffusion-v1-5/stable-diffusion-v1-5 sd15-flax \
      --variant=fp16                               # SRC (or PATH) may be a Hub repo id

SRC may be one component folder (`unet/`, `vae/`, `text_encoder/`) or a whole diffusers SD folder
(with `model_index.json`); other entries of an SD folder (tokenizer, scheduler, ...) are copied
along. `import` then `export` reproduces every tensor bit for bit. The Flax folder `import` writes
is read by this project only (`livo_jax.weights`); `export` makes it a PyTorch folder again,
which diffusers, transformers and every other tool read. Both stream the tensors and never hold
the model: SD 1.5's folder converts in a peak of 1.5 GB (docs/weights.md).

`import` and `inspect` take a Hugging Face Hub repo id too (`--subfolder`, `--revision`,
`--variant` as `from_pretrained` takes them): only what a load reads is fetched, from the cache
when HF_HUB_OFFLINE=1 (docs/weights.md).

An error is one line on stderr and exit status 1; `inspect` exits 1 too, after its listing, when
a tensor is missing, unexpected, mis-shaped or not finite (what would stop a load). Ctrl-C or
SIGTERM removes the partial destination, prints "interrupted" and exits 130 or 143; the next
`import` or `export` into the same folder removes what a `kill -9` left there, and says so.
"""

import os
import signal
import sys
import threading

from absl import app
from absl import flags
from absl import logging

from livo_jax.weights import conversion
from livo_jax.weights import hub

_SUBFOLDER = flags.DEFINE_string("subfolder", "", "the model's folder inside SRC")
_REVISION = flags.DEFINE_string("revision", None, "branch, tag or commit of a Hub SRC")
_VARIANT = flags.DEFINE_string("variant", None, "weights variant of SRC to read, e.g. fp16")


def inspect(model: hub.ModelRef) -> list[str]:
  """Prints the listing; returns the one-line problems that loading the weights would raise."""
  total, problems = 0, []
  for component, info in conversion.describe_folder(model).items():
    tensors = info["tensors"]
    count = sum(_size(shape) for shape, _ in tensors.values())
    total += count
    print(f"== {component}: {info['kind']} ({info['format']}), {len(tensors)} tensors, "
          f"{count:,} parameters")
    width = max(map(len, tensors), default=0)
    for key, (shape, dtype) in tensors.items():
      print(f"  {key:<{width}}  {dtype:<9} {shape}")
    if info["problem"]:
      problems.append(info["problem"])
  print(f"total: {total:,} parameters")
  return problems


def _size(shape) -> int:
  size = 1
  for dim in shape:
    size *= dim
  return size


_USAGE = "usage: convert_weights.py {import SRC DST | export SRC DST | inspect PATH}"
_ARITY = {"import": 2, "export": 2, "inspect": 1}   # the positionals after the command


def _usage_error(message: str) -> None:
  """One line on stderr, exit status 2 (as argparse's usage errors)."""
  print(f"convert_weights: error: {message} ({_USAGE})", file=sys.stderr)
  sys.exit(2)


def main(argv):
  args = argv[1:]
  if not args or args[0] not in _ARITY:
    _usage_error(f"unknown command {args[0]!r}" if args else "no command")
  command, paths = args[0], args[1:]
  if len(paths) != _ARITY[command]:
    _usage_error(f"{command} takes {_ARITY[command]} path(s), got {len(paths)}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax's INFO lines would bury the error line
  signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `inspect ... | head` ends quietly
  signal.signal(signal.SIGTERM, _interrupt)
  sys.unraisablehook = _deliver_dropped_interrupts
  try:
    source = hub.ModelRef(paths[0], subfolder=_SUBFOLDER.value, revision=_REVISION.value,
                          variant=_VARIANT.value)
    if command == "inspect":
      problems = inspect(source)
      if problems:
        sys.stdout.flush()   # the listing first, then why it would not load
        sys.exit("\n".join(f"convert_weights inspect: error: {p}" for p in problems))
    else:
      written = (conversion.import_folder(source, paths[1]) if command == "import"
                 else conversion.export_folder(_local(source), paths[1]))
      for line in written:
        print(f"wrote {line}")
  except (ValueError, FileNotFoundError, FileExistsError) as e:   # ours: Config/WeightsError
    message = " ".join(str(e).split())  # one line, however long the key lists
    sys.exit(f"convert_weights {command}: error: {message}")
  except KeyboardInterrupt as e:   # the partial destination is gone by now (atomic_folder)
    print(f"convert_weights {command}: interrupted", file=sys.stderr)
    sys.exit(128 + _signal_of(e))   # the shell's status for a process the signal ended


def _local(source: hub.ModelRef) -> str:
  """`export` reads our Flax folder, which lives on disk only."""
  if source.revision or source.variant:
    raise ValueError("export reads a local Flax folder: --revision and --variant do not apply")
  return os.path.join(source.name, source.subfolder)


def _interrupt(signum, frame) -> None:
  """SIGTERM unwinds like Ctrl-C, so that the partial destination is removed on the way out."""
  del frame
  raise KeyboardInterrupt(signum)


def _signal_of(interrupt: KeyboardInterrupt) -> int:
  return signal.SIGTERM if interrupt.args == (signal.SIGTERM,) else signal.SIGINT


def _deliver_dropped_interrupts(unraisable) -> None:
  """Signals again an interrupt that Python dropped, having raised it in a gc callback.

  (JAX's runs at every collection, so that is where a signal often lands.) A moment later, the
  signal finds the main thread back in ordinary code.
  """
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    threading.Timer(0.1, os.kill, (os.getpid(), _signal_of(unraisable.exc_value))).start()
  else:
    sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
  app.run(main)
