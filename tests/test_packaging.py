"""The package's metadata, the requirements files, and what a command prints on its way out."""

import os
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

import tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A runtime install has no torch; transformers says so at import unless told not to.
_WITHOUT_TORCH = "import runpy, sys; sys.modules['torch'] = None; "


def _project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _lines(name: str) -> list[str]:
  """A requirements file's entries, without comments and blank lines."""
  with open(os.path.join(ROOT, name)) as f:
    entries = (line.split("#", 1)[0].strip() for line in f)
    return [entry for entry in entries if entry]


def test_every_dependency_has_a_lower_and_an_upper_bound():
  project = _project()
  lines = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
  for requirement in map(Requirement, lines):
    specifiers = sorted((s.operator, Version(s.version)) for s in requirement.specifier)
    if requirement.name == "torch":   # the CPU build the parity tests are written against
      assert [op for op, _ in specifiers] == ["=="], requirement
    else:
      assert [op for op, _ in specifiers] == ["<", ">="], requirement
      assert specifiers[1][1] < specifiers[0][1], requirement


def test_extras_add_to_the_runtime():
  project = _project()
  runtime = {r.name: r for r in map(Requirement, project["dependencies"])}
  extras = {name: list(map(Requirement, lines))
            for name, lines in project["optional-dependencies"].items()}
  assert "torch" not in runtime   # only the tests need it
  assert not {r.name for r in extras["dev"]} & runtime.keys()
  for extra in ("tpu", "cuda12"):
    (jax,) = extras[extra]
    assert (jax.name, jax.extras, jax.specifier) == ("jax", {extra}, runtime["jax"].specifier)


def test_requirements_files_defer_to_pyproject():
  assert _lines("requirements.txt") == ["-e ."]
  assert _lines("requirements-dev.txt") == ["-e .[dev]"]
  # The one package that pip must install without its declared dependencies (see the file).
  nodeps = _lines("requirements-dev-nodeps.txt")
  assert [Requirement(line).name for line in nodeps] == ["torch-fidelity"]
  assert _lines(".ci/run")[-1] == "python -m pytest -q"   # the README's test command


def test_an_install_holds_every_module():
  """Setuptools finds packages by their `__init__.py` and ships only .py files by default."""
  for folder, dirs, files in os.walk(os.path.join(ROOT, "livo_jax")):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    assert "__init__.py" in files, folder
    data = [f for f in files if not f.endswith(".py")]
    assert not data, f"{folder}: {data} need [tool.setuptools.package-data] in pyproject.toml"


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY",
                      "JAX_LOGGING_LEVEL")}
  env["PYTHONPATH"] = ROOT
  return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH + code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_a_failing_script_prints_one_line(tmp_path):
  """generate.py gets as far as the tokenizer (transformers is imported), then lacks the rest."""
  tiny_sd.write_tokenizer(str(tmp_path / "sd" / "tokenizer"))
  result = _run("sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                "scripts/generate.py", f"--model={tmp_path / 'sd'}", "--prompt=a circle",
                f"--out={tmp_path / 'out'}")
  assert result.returncode == 1
  assert result.stderr.startswith("error: ") and "text_encoder" in result.stderr
  assert result.stderr.count("\n") == 1, result.stderr


_LOUD_COMMAND = textwrap.dedent("""
    import logging
    import jax
    from livo_jax import cli

    def main(argv):
      logging.getLogger().setLevel(logging.INFO)   # as the trainer's commands report
      jax.devices()
      import transformers
      raise ValueError("stop")

    sys.argv[0] = "command"
    cli.run(main)
""")


def test_start_up_notes_only_with_verbosity():
  """JAX's note on each missing platform and transformers' on the missing torch."""
  quiet = _run(_LOUD_COMMAND)
  assert quiet.stderr == "error: stop\n"
  loud = _run(_LOUD_COMMAND, "--verbosity=0")
  assert loud.stderr.endswith("error: stop\n")
  assert "PyTorch was not found" in loud.stderr
