"""What the command lines of scripts/ share: checks at the door, one-line errors, Ctrl-C.

  _SD = cli.ModelFlags("model", "SD", required=True)   # --model, --model_revision, ...
  _SPEC = flags.DEFINE_string("spec", None, "JSON Lines spec", required=True)
  _GUIDANCE = flags.DEFINE_float("guidance", 7.5, "guidance scale", lower_bound=0)
  cli.must_exist(_SPEC, "file")
  cli.must_be_finite(_GUIDANCE)
  ...
  cli.run(main)                     # instead of app.run(main)

A user should see what to fix, not a traceback. So a bad flag (absl's checks and the
validators registered here run before `main`, so before any model loads), a positional
argument, a user error raised inside `main` (`USER_ERRORS`: a bad setting, file, folder or
dataset, an output that is there already, an endpoint that does not answer) each end the command
with one line on stderr, "error: <message>", and exit status 1. Ctrl-C ends it with
"interrupted" and status 130 (the shell's 128 + SIGINT); the package writes every file
atomically, so what is on disk then is whole. Any other exception is a bug and keeps its
traceback. Logging shows warnings and errors only, and none of the libraries' start-up notes,
unless --verbosity says otherwise.
"""

import logging as py_logging
import math
import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from livo_jax import chat
from livo_jax.errors import RunError
from livo_jax.weights import hub

# ConfigError, DataError and WeightsError are ValueErrors; FileNotFoundError, FileExistsError
# and PermissionError are OSErrors; RunError: a training run that stopped on purpose (the demo
# trains in-process).
USER_ERRORS = (ValueError, OSError, chat.ChatError, RunError)
EXIT_INTERRUPTED = 130


def must_exist(flag: flags.FlagHolder, kind: str = "folder") -> None:
  """Refuses a path flag whose folder (or file) is not there; an unset or empty flag passes."""
  exists = os.path.isdir if kind == "folder" else os.path.isfile
  flags.register_validator(flag.name, lambda path: not path or exists(path),
                           message=f"no such {kind}")


class ModelFlags:
  """`--NAME`, a model folder or Hub repo id, with `--NAME_subfolder`, `--NAME_revision` and
  `--NAME_variant` (as `from_pretrained` takes them); `ref()` is the `weights.ModelRef`.

  A name that is neither a folder here nor reads as a repo id is refused at the door.
  """

  def __init__(self, name: str, what: str, *, required: bool = False):
    self.name = name
    self.model = flags.DEFINE_string(name, None, f"{what}: a folder, or a Hugging Face Hub "
                                     "repo id (ORG/NAME)", required=required)
    self.subfolder = flags.DEFINE_string(f"{name}_subfolder", "",
                                         f"the model's folder inside --{name}")
    self.revision = flags.DEFINE_string(f"{name}_revision", None,
                                        f"branch, tag or commit of --{name}'s Hub repo")
    self.variant = flags.DEFINE_string(f"{name}_variant", None,
                                       f"weights variant of --{name}, e.g. fp16")
    flags.register_validator(name, lambda model: not model or hub.is_folder_or_repo_id(model),
                             message="no such folder (nor a Hub repo id: ORG/NAME)")
    extras = [f"{name}_subfolder", f"{name}_revision", f"{name}_variant"]
    flags.register_multi_flags_validator(
        [name, *extras], lambda f: f[name] or not any(f[k] for k in extras),
        f"--{name}_subfolder, --{name}_revision and --{name}_variant need --{name}")

  def ref(self):
    """The `weights.ModelRef` the flags name, or None without `--NAME`."""
    if not self.model.value:
      return None
    return hub.ModelRef(self.model.value, subfolder=self.subfolder.value,
                        revision=self.revision.value or None,
                        variant=self.variant.value or None)


def must_be_finite(flag: flags.FlagHolder) -> None:
  """Refuses nan and inf, which absl's bounds let through."""
  flags.register_validator(flag.name, lambda x: x is None or math.isfinite(x),
                           message="must be a finite number")


def run(main: Callable[[list[str]], None], *, user_errors: tuple[type, ...] = ()) -> None:
  """`app.run(main)` with one-line errors and Ctrl-C handling (module docstring).

  Args:
    main: the command, called with argv (the program name only: arguments are refused).
    user_errors: exception types of the command's own to report in one line as well.
  """
  errors = USER_ERRORS + tuple(user_errors)

  def guarded(argv):
    quiet_libraries()
    try:
      if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
      main(argv)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except errors as e:
      sys.exit(f"error: {one_line(e)}")

  app.run(guarded, flags_parser=_parse_flags)


def quiet_libraries() -> None:
  """Keeps logging to warnings and errors, and the libraries' start-up notes off stderr.

  The notes: JAX's INFO line for each platform it finds missing ("Unable to initialize backend
  'tpu'"), which a command that logs at INFO (training) would show, and transformers' advice
  that PyTorch is not installed (we use its tokenizer only). Call it once the flags are parsed
  and before JAX starts or transformers is imported; `run` does. --verbosity keeps everything,
  and so does JAX_LOGGING_LEVEL for JAX.
  """
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)   # JAX's INFO lines would bury the error line
  if not os.environ.get("JAX_LOGGING_LEVEL"):
    py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def one_line(error: BaseException) -> str:
  """An exception's message on one line (its type when it has none)."""
  return " ".join(str(error).splitlines()) or type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a flag error as one line instead of absl's two."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {one_line(e)}")
