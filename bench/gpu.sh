#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one run, on SD 1.5's architecture (random
# weights): a training step at 512 px, batch 8, against the original algorithm in torch (fp16
# autocast, gradient checkpointing); 25-step DPM-Solver++ sampling against diffusers (fp16); the
# data pipeline's headroom over the measured step. Each part writes its JSON to OUT_DIR.
#
#   bash bench/gpu.sh OUT_DIR [train|sample|data ...]     # default: all three parts
#
# Needs a CUDA GPU with jax[cuda], torch (CUDA) and transformers installed. Packages the machine
# lacks can be installed from wheels in .whl/ (bench/gpu_wheels.txt lists those a stock
# JAX + torch CUDA image misses; docs/performance.md has the download command).
# Time on an H100 (budget): train ~7 min (random SD 1.5 folder ~1 min, torch ~1 min, each
# variant ~1.5 min: loading and XLA compilation), sample ~2 min, data ~1 min. Where one command
# may run 10 minutes at most, run it as two, into a folder that outlives both, e.g.
#   bash bench/gpu.sh /tmp/gpu train; cp /tmp/gpu/* "$OUT"
#   bash bench/gpu.sh /tmp/gpu sample data; cp /tmp/gpu/* "$OUT"
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [train|sample|data ...]}
shift
parts=${*:-train sample data}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

if compgen -G "$here/.whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/livo_site "$here"/.whl/*.whl
  export PYTHONPATH=/tmp/livo_site
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"

for part in $parts; do
  case $part in
    train)
      # All optimisations on, then one switched off per variant (merging, the latent and text
      # caches, flash attention, remat) where its cost on this chip is what we want to know.
      python3 "$here/bench/train_step.py" --preset=sd15 --resolution=512 --batch=8 \
        --variants=latents+text,pixels,latents+text+attention=xla,latents+text+remat=blocks \
        > "$out/train_step.json" 2> "$out/train_step.log" ;;
    sample)
      python3 "$here/bench/sampling.py" --preset=sd15 --resolution=512 --batch=8 \
        > "$out/sampling.json" 2> "$out/sampling.log" ;;
    data)
      # The trainer's consumption: the fastest measured step of the train part (if it ran).
      step=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(min(v['step_seconds'] for v in r.values() if isinstance(v, dict) and 'compile_seconds' in v \
and 'step_seconds' in v))" "$out/train_step.json" 2>/dev/null || echo "")
      python3 "$here/bench/data_pipeline.py" --batch=8 ${step:+--step_seconds=$step} \
        > "$out/data_pipeline.json" 2> "$out/data_pipeline.log" ;;
    *) echo "unknown part $part (train, sample, data)" >&2; exit 2 ;;
  esac
  echo "== $part"; cat "$out/${part/sample/sampling}"*.json 2>/dev/null | head -c 4000; echo
done
