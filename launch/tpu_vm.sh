#!/usr/bin/env bash
# Launches uae_jax on a Cloud TPU VM or pod slice: create (or reuse) the TPU, put the code on
# every worker, install the pinned stack, run the trainer on all workers, stream the logs.
# See launch/README.md. `--dry-run` prints every command instead of running it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE[:ARG]
                        --workdir gs://BUCKET/PATH [options] [--config.KEY=VALUE ...]

Required:
  --name NAME               TPU VM / pod slice name (created if it does not exist, else reused)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator-type TYPE   v4-16, v5litepod-256, v5p-256, v6e-256, ...
  --config FILE[:ARG]       stage config, e.g. configs/stage3.py
  --workdir gs://...        GCS work directory shared by all workers (checkpoints, metrics)

Options:
  --project PROJECT         GCP project (default: gcloud's configured project)
  --version RUNTIME         TPU software version (default from the accelerator type:
                            v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --copy                    copy this working tree to every worker (default)
  --repo URL                clone URL on every worker instead of copying
  --ref REF                 branch / tag / commit to check out with --repo (default: main)
  --spot                    create the TPU as a Spot VM
  --skip-install            do not (re)install the Python environment
  --detach                  run in the background on the workers (survives a closed terminal)
                            and follow worker 0's log; re-attach with --logs
  --logs                    only follow worker 0's log of a detached run
  --dry-run                 print every command, run nothing
  --config.KEY=VALUE        passed through to uae_jax.main (any number)
  -h, --help                this message

Example (2 hosts):
  launch/tpu_vm.sh --name uae-v4 --zone us-central2-b --accelerator-type v4-16 \
    --project my-proj --config configs/stage1.py --workdir gs://my-bucket/uae/stage1 \
    --config.init.dinov2=gs://my-bucket/weights/dinov2_vitb14_reg
EOF
}

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CONFIG="" WORKDIR=""
REPO="" REF="main" SPOT=0 DRY_RUN=0 SKIP_INSTALL=0 DETACH=0 LOGS_ONLY=0
EXTRA=()
REMOTE_DIR="uae_jax"                 # relative to the workers' home directory
RUN_LOG="uae_jax_run.log"
GCSFS_PIN="gcsfs==2026.10.1"         # GCS paths without TensorFlow (etils/epath, Orbax metadata)
JAX_TPU_PIN="jax[tpu]==0.10.2"       # matches requirements.txt; brings the libtpu wheel

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config.*) EXTRA+=("$1"); shift ;;  # before --config=*: an override, not the config file
    --name=*) NAME="${1#*=}"; shift ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type=*) ACCEL="${1#*=}"; shift ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --repo=*) REPO="${1#*=}"; shift ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --ref=*) REF="${1#*=}"; shift ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --copy) REPO=""; shift ;;
    --spot) SPOT=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --logs) LOGS_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

missing=()
[[ -n "$NAME" ]] || missing+=(--name)
[[ -n "$ZONE" ]] || missing+=(--zone)
if [[ $LOGS_ONLY -eq 0 ]]; then
  [[ -n "$ACCEL" ]] || missing+=(--accelerator-type)
  [[ -n "$CONFIG" ]] || missing+=(--config)
  [[ -n "$WORKDIR" ]] || missing+=(--workdir)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: missing ${missing[*]}" >&2; usage >&2; exit 2
fi
if [[ $LOGS_ONLY -eq 0 && "$WORKDIR" != gs://* ]]; then
  # Every worker must see the same checkpoints: a local path would give each host its own.
  echo "error: --workdir must be a gs:// path shared by all workers, got $WORKDIR" >&2; exit 2
fi

if [[ -z "$VERSION" && -n "$ACCEL" ]]; then
  case "$ACCEL" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) echo "error: no default --version for $ACCEL; pass --version" >&2; exit 2 ;;
  esac
fi

# One shell word: the argument itself when it is safe, else single-quoted.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints a command in copy-pasteable form.
show() {
  local out="" a
  for a in "$@"; do
    out+="$(q "$a") "
  done
  echo "${out% }"
}

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

follow_logs() {
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -n +1 -F ~/$RUN_LOG"
}

if [[ $LOGS_ONLY -eq 1 ]]; then
  follow_logs
  exit 0
fi

# 1. Create the TPU unless it exists (describe succeeds), else reuse it.
CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
[[ $SPOT -eq 1 ]] && CREATE+=(--spot)
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# reuse the TPU if this succeeds, else create it:"
  show "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}"
  show "${CREATE[@]}"
elif "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  echo "reusing TPU $NAME in $ZONE" >&2
else
  run "${CREATE[@]}"
fi

# 2. Code on every worker.
if [[ -n "$REPO" ]]; then
  q_repo=$(q "$REPO"); q_ref=$(q "$REF")
  ssh_all "if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch --quiet origin; else git clone --quiet $q_repo ~/$REMOTE_DIR; fi && git -C ~/$REMOTE_DIR checkout --quiet $q_ref && (git -C ~/$REMOTE_DIR pull --quiet --ff-only origin $q_ref 2>/dev/null || true)"
else
  SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/${NAME}_uae_jax.tgz"
  run tar -czf "$TARBALL" -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude='*/__pycache__' .
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/uae_jax.tgz" "${LOC[@]}" --worker=all
  ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/uae_jax.tgz -C ~/$REMOTE_DIR"
fi

# 3. Python environment, Makefile-style: a venv plus a stamp newer than requirements.txt.
if [[ $SKIP_INSTALL -eq 0 ]]; then
  ssh_all "cd ~/$REMOTE_DIR && (test -x .venv/bin/python || python3 -m venv .venv) && if [ ! -f .venv/.tpu-installed ] || [ requirements.txt -nt .venv/.tpu-installed ]; then .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -r requirements.txt '$JAX_TPU_PIN' '$GCSFS_PIN' && touch .venv/.tpu-installed; fi"
fi

# 4. Train on every worker; jax.distributed.initialize() finds the pod from the TPU metadata.
TRAIN="python -m uae_jax.main --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --multihost"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  TRAIN+=" $(q "$a")"
done
if [[ $DETACH -eq 1 ]]; then
  ssh_all "cd ~/$REMOTE_DIR && nohup .venv/bin/$TRAIN > ~/$RUN_LOG 2>&1 < /dev/null &"
  follow_logs
else
  ssh_all "cd ~/$REMOTE_DIR && set -o pipefail && .venv/bin/$TRAIN 2>&1 | tee ~/$RUN_LOG"
fi
