#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one run, on SD 1.5's architecture (random
# weights): a training step at 512 px, batch 8, against the original algorithm in torch (fp16
# autocast, gradient checkpointing); 25-step DPM-Solver++ sampling against diffusers (fp16); the
# data pipeline's headroom over the measured step.
#
#   bash bench/gpu.sh OUT_DIR [train|sample|data ...]     # default: all three parts
#   bash bench/gpu.sh --dry-run OUT_DIR [PART ...]        # the same on the CPU, tiny: 6-8 min
#
# Each step writes its stdout and its stderr (a .log beside it) into OUT_DIR: wheels.txt (the
# wheels in .whl/ installed first on the path: bench/gpu_wheels.txt, flax, optax,
# orbax-checkpoint at our versions and what a stock JAX + torch CUDA image lacks;
# docs/performance.md has the download command), gpu.csv (nvidia-smi), versions.json, then
# train_step.json, sampling.json, data_pipeline.json. versions.json: `outside_tested` (each
# dependency of pyproject.toml outside its bounds there, or missing), Python, JAX, the CUDA and
# cuDNN versions JAX finds, the jax*, nvidia-* and torch packages, and per dependency its
# version, the folder it is imported from and the versions it shadows. JAX is the machine's own,
# never replaced. A step that fails (a variant out of memory, a part that crashes) does not stop
# the others: OUT_DIR/summary.json, rewritten as each step starts and ends, has per step its
# status (running, ok, failed), exit status, seconds and the first line of each error (per
# variant and side for train), and `failed`: the steps not ok. Exits with 1 if anything failed,
# 2 for an unknown part.
#
# Needs a CUDA GPU with jax[cuda], torch (CUDA) and transformers installed (Python 3.12: the
# wheels' version). --dry-run runs every part on the CPU (JAX_PLATFORMS=cpu, no GPU for torch)
# with tests/tiny_sd.py's SD at 64 px, batch 2, one timed call per side, 2 sampler steps and
# 16 JPEGs, without nvidia-smi or the wheels: a broken script fails here, not on the device.
# Time on an H100 (budget): train ~7 min (random SD 1.5 folder ~1 min, torch ~1 min, each
# variant ~1.5 min: loading and XLA compilation), sample ~2 min, data ~1 min. Where one command
# may run 10 minutes at most, run it as two, into a folder that outlives both, e.g.
#   bash bench/gpu.sh /tmp/gpu train; cp /tmp/gpu/* "$OUT"
#   bash bench/gpu.sh /tmp/gpu sample data; cp /tmp/gpu/* "$OUT"
set -uo pipefail   # no -e: a part that fails is recorded, and the next one runs
usage="usage: bash bench/gpu.sh [--dry-run] OUT_DIR [train|sample|data ...]"
dry_run=false
if [[ ${1:-} == --dry-run ]]; then dry_run=true; shift; fi
out=${1:?$usage}
shift
parts=${*:-train sample data}
for part in $parts; do
  case $part in
    train|sample|data) ;;
    *) echo "unknown part $part (train, sample, data)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
failed=0

summary() {  # PART FILE running | PART FILE EXIT SECONDS: PART's entry in OUT_DIR/summary.json
  python3 - "$out" "$@" <<'EOF'
import json, os, re, sys

out, part, output, *status = sys.argv[1:]
path = os.path.join(out, "summary.json")
summary = {"parts": {}}
if os.path.exists(path):    # a run into the same folder before this one: its parts stay
  with open(path) as f:
    summary = json.load(f)
entry = dict(status="running", output=output, log=os.path.splitext(output)[0] + ".log")
if status != ["running"]:
  code, seconds = map(int, status)
  entry.update(status="failed" if code else "ok", exit=code, seconds=seconds)
  try:
    with open(os.path.join(out, output)) as f:
      result = json.load(f) if output.endswith(".json") else {}
  except ValueError:        # no JSON: the part died before it printed one
    result = {}
  errors = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
  if errors:                # train's variants and sides
    entry["errors"] = errors
  elif code:                # the exception's line in the log, else its last line
    with open(os.path.join(out, entry["log"]), errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
    raised = [l for l in lines if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b", l)]
    entry["error"] = (raised or lines or [""])[-1]
summary["parts"][part] = entry
summary["failed"] = [p for p, e in summary["parts"].items() if e["status"] != "ok"]
with open(path, "w") as f:
  json.dump(summary, f, indent=2)
EOF
}

run_part() {  # PART FILE COMMAND...: COMMAND's stdout into OUT_DIR/FILE, its stderr beside it
  local part=$1 output=$2 start=$SECONDS code seconds
  shift 2
  summary "$part" "$output" running
  "$@" > "$out/$output" 2> "$out/${output%.*}.log"
  code=$? seconds=$((SECONDS - start))
  ((code == 0)) || failed=1
  summary "$part" "$output" "$code" "$seconds"
  echo "== $part: exit $code, $seconds s"
  head -c 4000 "$out/$output"
  echo
}

if $dry_run; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
  shape=(--preset=tiny --resolution=64 --batch=2)
  train=(--warmup=1 --repeats=1)
  sample=(--steps=2 --repeats=1)
  data=(--images=16 --image_size=64 --resolution=64 --batch=2 --warmup=1 --batches=2
        --pixel_batches=2)
else
  shape=(--preset=sd15 --resolution=512 --batch=8)
  train=()
  sample=()
  data=(--batch=8)
  if compgen -G "$here/.whl/*.whl" > /dev/null; then
    run_part wheels wheels.txt python3 -m pip install --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/livo_site "$here"/.whl/*.whl
    export PYTHONPATH=/tmp/livo_site
  fi
  run_part gpu gpu.csv nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

run_part versions versions.json python3 - "$here/pyproject.toml" <<'EOF'
import importlib.metadata, json, platform, sys, tomllib

import jax
import jax.extend
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

installed = {}  # name -> [(version, folder)] in sys.path order: the first one is imported
for dist in importlib.metadata.distributions():
  if dist.name:
    installed.setdefault(canonicalize_name(dist.name), []).append(
        (dist.version, str(dist.locate_file(""))))
with open(sys.argv[1], "rb") as f:
  requirements = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
dependencies, outside = {}, []
for req in requirements:
  (version, folder), *shadowed = installed.get(canonicalize_name(req.name), [(None, None)])
  dependencies[req.name] = dict(version=version, tested=str(req.specifier), folder=folder,
                                shadowed=[v for v, _ in shadowed])
  if version is None or not req.specifier.contains(version, prereleases=True):
    outside.append(f"{req.name} {version or 'missing'} (tested: {req.specifier})")
try:  # what JAX's own cuDNN check reads (private: may move in a later JAX)
  from jax._src.lib import cuda_versions
  cuda = cuda_versions and dict(runtime=cuda_versions.cuda_runtime_get_version(),
                                driver=cuda_versions.cuda_driver_get_version(),
                                cudnn=cuda_versions.cudnn_get_version())
except (ImportError, AttributeError, RuntimeError) as e:
  cuda = f"unknown: {e}"
print(json.dumps(dict(
    outside_tested=outside, python=platform.python_version(), jax=jax.__version__,
    backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
    platform_version=jax.extend.backend.get_backend().platform_version, cuda=cuda,
    packages={n: v[0][0] for n, v in sorted(installed.items())
              if n.startswith(("jax", "nvidia-")) or n == "torch"},
    dependencies=dependencies), indent=2))
EOF

for part in $parts; do
  case $part in
    train)
      # All optimisations on, then one switched off per variant (merging, the latent and text
      # caches, flash attention, remat) where its cost on this chip is what we want to know.
      run_part train train_step.json python3 "$here/bench/train_step.py" "${shape[@]}" \
        "${train[@]}" \
        --variants=latents+text,pixels,latents+text+attention=xla,latents+text+remat=blocks ;;
    sample)
      run_part sample sampling.json python3 "$here/bench/sampling.py" "${shape[@]}" \
        "${sample[@]}" ;;
    data)
      # The trainer's consumption: the fastest measured step of the train part (if it ran).
      step=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(min(v['step_seconds'] for v in r.values() if isinstance(v, dict) and 'compile_seconds' in v \
and 'step_seconds' in v))" "$out/train_step.json" 2>/dev/null || echo "")
      run_part data data_pipeline.json python3 "$here/bench/data_pipeline.py" "${data[@]}" \
        ${step:+--step_seconds=$step} ;;
  esac
done
exit $failed
