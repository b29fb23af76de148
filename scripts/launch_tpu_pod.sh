#!/usr/bin/env bash
# Runs the LiVO trainer on every worker of a Cloud TPU VM slice (v5e-8, v5p-128, ...).
#
#   scripts/launch_tpu_pod.sh --name=livo-pod --zone=us-east5-a --accelerator=v5litepod-8 \
#       --create --workdir=/mnt/shared/runs/livo -- \
#       --config.model.pretrained=/mnt/sd15 --config.data.train_dir=/mnt/livo_data
#
# Steps: (--create) make the TPU VM slice; copy the repository's tracked files to every worker;
# install requirements.txt with jax[tpu]; run `scripts/train.py --distributed` on all workers at
# once (JAX finds the pod's coordinator itself), streaming their logs here. Ctrl-C sends SIGTERM
# to the trainers, which save a checkpoint at the next step and exit; rerunning without
# --create (and with --skip_setup) resumes from it. --dry-run prints every command instead.
# Everything after `--` goes to scripts/train.py. docs/multihost.md has more examples.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Flags:
  --name=NAME            TPU VM name (required)
  --zone=ZONE            zone (required)
  --project=PROJECT      GCP project (default: gcloud's)
  --accelerator=TYPE     accelerator type for --create (default v5litepod-8)
  --version=RUNTIME      TPU software version for --create (default v2-alpha-tpuv5-lite)
  --create               create the slice first
  --config=FILE          trainer config (default configs/sd15.py)
  --workdir=DIR          trainer workdir on a filesystem every worker mounts (Filestore/NFS,
                         gcsfuse) (required)
  --skip_setup           do not copy the code or install (already done)
  --dry-run              print the commands, run nothing
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR="v5litepod-8" VERSION="v2-alpha-tpuv5-lite"
CREATE=0 CONFIG="configs/sd15.py" WORKDIR="" SKIP_SETUP=0 DRY_RUN=0
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --create) CREATE=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --skip_setup) SKIP_SETUP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for required in NAME ZONE WORKDIR; do
  if [[ -z "${!required}" ]]; then
    flag=$(tr '[:upper:]' '[:lower:]' <<<"$required")
    echo "error: --$flag is required (see --help)" >&2
    exit 2
  fi
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
REMOTE_DIR="livo-jax"
JAX_SPEC=$(grep -m1 -oE '"jax>=[^"]+"' "$REPO/pyproject.toml" | tr -d '"' | sed 's/^jax/jax[tpu]/')
LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

run() {  # print with a "+ " prefix; run unless --dry-run
  echo "+ $*"
  if ((!DRY_RUN)); then "$@"; fi
}

on_all_workers() {
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

if ((CREATE)); then
  run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION"
fi

if ((!SKIP_SETUP)); then
  # The tracked files only (no .git, no local runs), as one archive.
  archive="${TMPDIR:-/tmp}/livo-jax-$$.tar.gz"
  echo "# packing the repository's tracked files into $archive"
  if ((!DRY_RUN)); then
    (cd "$REPO" && git ls-files -z | tar --null -czf "$archive" -T -)
  fi
  run "${TPU[@]}" scp "$archive" "$NAME:~/livo-jax.tar.gz" "${WHERE[@]}" --worker=all
  ((DRY_RUN)) || rm -f "$archive"
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/livo-jax.tar.gz -C ~/$REMOTE_DIR \
&& cd ~/$REMOTE_DIR && pip install -r requirements.txt '$JAX_SPEC' -f $LIBTPU_INDEX"
fi

TRAIN="python scripts/train.py --config=$CONFIG --workdir=$WORKDIR --distributed"
((${#TRAIN_ARGS[@]})) && TRAIN+=" ${TRAIN_ARGS[*]}"

stop_trainers() {
  echo "# Ctrl-C: asking the trainers to checkpoint and stop (SIGTERM)" >&2
  on_all_workers "pkill -TERM -f scripts/train.py || true"
  wait || true
  exit 130
}
trap stop_trainers INT

# All workers start the same command; their output streams here, prefixed by gcloud.
if ((DRY_RUN)); then
  on_all_workers "cd ~/$REMOTE_DIR && $TRAIN"
  echo "# on Ctrl-C:"
  on_all_workers "pkill -TERM -f scripts/train.py || true"
else
  on_all_workers "cd ~/$REMOTE_DIR && $TRAIN" &
  wait $!
fi
