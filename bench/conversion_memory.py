"""Peak memory of `tools/convert_weights.py import` and `export` on SD 1.5's folder.

  python bench/conversion_memory.py                   # SD 1.5's architecture, random: ~4 min
  python bench/conversion_memory.py --preset=medium   # a medium SD: ~1 min
  python bench/conversion_memory.py --folder=PATH     # a diffusers SD folder you have

Builds a random diffusers SD folder (--preset, bench/presets.py, as the tests build theirs, in a
process of its own), then runs the tool's `import` (torch folder -> Flax checkpoint) and its
`export` (back to a torch folder), each in a fresh process, and reads each process's own peak
resident memory (`ru_maxrss` from `os.wait4`) and wall seconds. A conversion streams
(docs/weights.md): it holds a tensor (into orbax, a group of 256 MB of them) and the libraries,
not the model, so the bound it is held to is the largest weights file plus a margin (SD 1.5:
the fp32 UNet's 3.4 GB, and 5 GB in all).

Prints one JSON object: per command the peak RSS in MB and the wall seconds, the weights' total
and largest file in bytes, and whether each peak is under the largest file + --margin_mb.
Expected on a 2-core CPU (2026-12-02, SD 1.5's architecture: 4,265 MB of fp32 weights, the
UNet's file 3,438 MB): import peaks at 1,549 MB in 60 s, export at 668 MB in 48 s. Before the
conversion streamed it built the model: import 9,601 MB in 85 s, export 8,015 MB in 79 s.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_weights.py")

_PRESET = flags.DEFINE_enum("preset", "sd15", sorted(PRESETS), "random SD shape (presets.py)")
_FOLDER = flags.DEFINE_string("folder", None, "an SD folder to convert instead of a random one")
_MARGIN = flags.DEFINE_integer("margin_mb", 1600, "allowed above the largest weights file")
_KEEP = flags.DEFINE_bool("keep", False, "keep the folders written (printed as `workdir`)")

_WEIGHTS_SUFFIXES = (".safetensors", ".bin")


def weights_files(folder: str) -> list[str]:
  return [os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names
          if name.endswith(_WEIGHTS_SUFFIXES)]


def build_folder(root: str, preset: str) -> None:
  """The random SD folder, built in a process of its own.

  A child's `ru_maxrss` starts at its parent's peak (Linux keeps the high-water mark across
  fork and exec), so torch's memory here would count in each conversion's peak.
  """
  code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, "
          f"{os.path.join(ROOT, 'bench')!r}]; import tiny_sd; from presets import PRESETS; "
          f"tiny_sd.make_sd_folder({root!r}, std=0.05, **PRESETS[{preset!r}])")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_tool(*args: str) -> dict:
  """One `convert_weights.py` process: its peak RSS (its own, not its parent's) and seconds."""
  with tempfile.TemporaryFile("w+") as stderr:
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, TOOL, *args], stdout=subprocess.DEVNULL,
                               stderr=stderr, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
      stderr.seek(0)
      sys.exit(f"convert_weights.py {' '.join(args)} failed ({process.returncode}): "
               + stderr.read())
  return {"peak_rss_mb": round(usage.ru_maxrss / 1024), "seconds": round(seconds, 1)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = tempfile.mkdtemp(prefix="conversion_memory-")
  try:
    source = _FOLDER.value
    if source is None:
      source = os.path.join(workdir, f"{_PRESET.value}-sd")
      start = time.perf_counter()
      build_folder(source, _PRESET.value)
      build_seconds = round(time.perf_counter() - start, 1)
    sizes = [os.path.getsize(path) for path in weights_files(source)]
    flax_dir, torch_dir = os.path.join(workdir, "flax"), os.path.join(workdir, "torch")
    runs = {"import": run_tool("import", source, flax_dir),
            "export": run_tool("export", flax_dir, torch_dir)}
    bound_mb = max(sizes) / 2**20 + _MARGIN.value
    print(json.dumps({
        "benchmark": "conversion_memory", "preset": None if _FOLDER.value else _PRESET.value,
        "folder": _FOLDER.value, "weights_files": len(sizes), "weights_bytes": sum(sizes),
        "largest_file_bytes": max(sizes),
        "flax_checkpoint_bytes": sum(os.path.getsize(os.path.join(parent, name))
                                     for parent, _, names in os.walk(flax_dir)
                                     for name in names),
        **{command: {**run, "under_largest_file_plus_margin": run["peak_rss_mb"] <= bound_mb}
           for command, run in runs.items()},
        "margin_mb": _MARGIN.value,
        "build_seconds": None if _FOLDER.value else build_seconds,
        "workdir": workdir if _KEEP.value else None,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(),
    }, indent=2))
  finally:
    if not _KEEP.value:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
