"""The layers of docs/architecture.md, checked on the source: imports run downward only."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "livo_jax")

# Each part of the package and its layer: a module may import from lower layers, and from its
# own part. `models` imports nothing of the package but itself.
LAYERS = {
    "errors": 0, "models": 0,
    "files": 1, "hf_config": 1, "chat": 1,
    "images": 2, "conditioning": 2, "schedulers": 2,
    "losses": 3,
    "weights": 4, "data": 4,
    "sampling": 5, "retriever": 5,
    "train": 6, "eval": 6, "dataset_builder": 6,
    "demo": 7,
    "cli": 8,
}


def _modules():
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__"), path


def _part(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


def _imports(path: str):
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("livo_jax"):
      if node.module == "livo_jax":
        yield from (f"livo_jax.{alias.name}" for alias in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("livo_jax"))


def test_every_part_has_a_layer():
  parts = {_part(module) for module, _ in _modules()} - {""}
  assert parts == set(LAYERS)


@pytest.mark.parametrize("module,path", sorted(_modules()))
def test_imports_run_downward(module, path):
  part = _part(module)
  if not part:
    return
  for target in _imports(path):
    other = _part(target)
    if other == part:
      continue
    assert part != "models", f"{module} imports {target}: models/ imports only models/"
    assert LAYERS[other] < LAYERS[part], (
        f"{module} (layer {LAYERS[part]}) imports {target} (layer {LAYERS[other]})")


def test_no_string_dispatch_in_the_weights_layer():
  for module, path in _modules():
    if _part(module) == "weights":
      assert "importlib" not in open(path).read(), module


def test_the_math_loads_no_model():
  code = ("import sys, livo_jax.losses, livo_jax.schedulers, livo_jax.conditioning\n"
          "print(sorted(m for m in sys.modules if m.startswith('livo_jax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True).stdout
  loaded = ast.literal_eval(out.strip())
  assert not [m for m in loaded if m.startswith(("livo_jax.models", "livo_jax.weights"))]
