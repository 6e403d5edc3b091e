#!/usr/bin/env bash
# Launches uae_jax on a Cloud TPU VM or pod slice: get a READY TPU (reuse, recreate after
# preemption, or queue for one), stop a previous trainer, put fresh code on every worker, install
# a Python >= 3.11 environment with the pinned stack, run the trainer on all workers and show the
# logs of all of them. See launch/README.md. `--dry-run` prints every command instead of running it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE --config FILE[:ARG]
                        --workdir gs://BUCKET/PATH [options] [--config.KEY=VALUE ...]

Required:
  --name NAME               TPU VM / pod slice name (created if it does not exist, else reused)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --accelerator-type TYPE   gcloud names: v4-16, v5litepod-256 (v5e-* is translated), v5p-256,
                            v6e-256, ...
  --config FILE[:ARG]       stage config, e.g. configs/stage3.py
  --workdir gs://...        GCS work directory shared by all workers (checkpoints, metrics)

Capacity:
  --project PROJECT         GCP project (default: gcloud's configured project)
  --version RUNTIME         TPU software version (default from the accelerator type:
                            v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot | --reserved       Spot capacity / a reservation of the project
  --queued                  request the slice as a queued resource (large slices: wait until
                            ACTIVE, recreate the request after SUSPENDED/FAILED)
  --qr-id ID                queued-resource id (default: NAME-qr)
  --max-recreate N          recreations after preemption / SUSPENDED / FAILED (default 3)
  --poll-seconds S          state polling interval (default 60)

Network and identity (passed to create; --internal-ips also makes ssh/scp use --internal-ip):
  --internal-ips  --network NET  --subnetwork SUBNET  --service-account EMAIL  --metadata K=V[,...]

Code and environment:
  --copy                    copy this working tree to every worker (default)
  --repo URL [--ref REF]    clone URL at REF (default main) on every worker instead of copying
  --python PATH             interpreter (>= 3.11) on the workers; default: a system python3.11+
                            with venv, else a uv-managed Python 3.11 (launch/worker_setup.sh)
  --skip-install            do not check / (re)install the Python environment

Running:
  --detach                  run in the background on the workers (survives a closed terminal)
                            and follow the logs of all workers; re-attach with --logs
  --logs                    only follow the logs of all workers of a detached run
  --tail-lines N            lines of each worker's log printed when the run fails (default 50)
  --dry-run                 print every command, run nothing
  --config.KEY=VALUE        passed through to uae_jax.main (any number)
  -h, --help                this message

Example (2 hosts):
  launch/tpu_vm.sh --name uae-v4 --zone us-central2-b --accelerator-type v4-16 \
    --project my-proj --config configs/stage1.py --workdir gs://my-bucket/uae/stage1 \
    --config.init.encoder=gs://my-bucket/weights/dinov2_vitb14_reg
EOF
}

NAME="" ZONE="" ACCEL="" VERSION="" PROJECT="" CONFIG="" WORKDIR="" QR_ID=""
REPO="" REF="main" CAPACITY="" QUEUED=0 DRY_RUN=0 SKIP_INSTALL=0 DETACH=0 LOGS_ONLY=0
INTERNAL=0 NETWORK="" SUBNETWORK="" SERVICE_ACCOUNT="" METADATA="" WORKER_PYTHON=""
MAX_RECREATE=3 POLL=60 TAIL_LINES=50
EXTRA=()
REMOTE_DIR="uae_jax"                 # code, relative to the workers' home; replaced on every launch
REMOTE_VENV="uae_jax_venv"           # kept across launches; rebuilt when its stamp changes
RUN_LOG="uae_jax_run.log"
PID_FILE="uae_jax_run.pid"           # pid of the trainer on each worker, for the next launch
GCSFS_PIN="gcsfs==2026.10.1"         # GCS paths without TensorFlow (etils/epath, Orbax metadata)
JAX_TPU_PIN="jax[tpu]==0.10.2"       # matches requirements.txt; brings the libtpu wheel

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value" >&2; exit 2; }; }
set_capacity() {
  [[ -z "$CAPACITY" || "$CAPACITY" == "$1" ]] || {
    echo "error: --spot and --reserved exclude each other" >&2; exit 2; }
  CAPACITY="$1"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config.*) EXTRA+=("$1"); shift ;;  # before --config=*: an override, not the config file
    --name=*) NAME="${1#*=}"; shift ;;           --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone=*) ZONE="${1#*=}"; shift ;;           --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --accelerator-type=*) ACCEL="${1#*=}"; shift ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;     --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;     --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;       --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;     --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --repo=*) REPO="${1#*=}"; shift ;;           --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --ref=*) REF="${1#*=}"; shift ;;             --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --qr-id=*) QR_ID="${1#*=}"; shift ;;         --qr-id) need_value "$@"; QR_ID="$2"; shift 2 ;;
    --network=*) NETWORK="${1#*=}"; shift ;;     --network) need_value "$@"; NETWORK="$2"; shift 2 ;;
    --subnetwork=*) SUBNETWORK="${1#*=}"; shift ;;
    --subnetwork) need_value "$@"; SUBNETWORK="$2"; shift 2 ;;
    --service-account=*) SERVICE_ACCOUNT="${1#*=}"; shift ;;
    --service-account) need_value "$@"; SERVICE_ACCOUNT="$2"; shift 2 ;;
    --metadata=*) METADATA="${1#*=}"; shift ;;   --metadata) need_value "$@"; METADATA="$2"; shift 2 ;;
    --python=*) WORKER_PYTHON="${1#*=}"; shift ;;
    --python) need_value "$@"; WORKER_PYTHON="$2"; shift 2 ;;
    --max-recreate=*) MAX_RECREATE="${1#*=}"; shift ;;
    --max-recreate) need_value "$@"; MAX_RECREATE="$2"; shift 2 ;;
    --poll-seconds=*) POLL="${1#*=}"; shift ;;
    --poll-seconds) need_value "$@"; POLL="$2"; shift 2 ;;
    --tail-lines=*) TAIL_LINES="${1#*=}"; shift ;;
    --tail-lines) need_value "$@"; TAIL_LINES="$2"; shift 2 ;;
    --copy) REPO=""; shift ;;
    --spot) set_capacity spot; shift ;;
    --reserved) set_capacity reserved; shift ;;
    --queued) QUEUED=1; shift ;;
    --internal-ips) INTERNAL=1; shift ;;
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
for n in "$MAX_RECREATE" "$POLL" "$TAIL_LINES"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "error: expected a number, got $n" >&2; exit 2; }
done

# gcloud and `describe` call v5e slices v5litepod-N; accept the marketing name too.
if [[ "$ACCEL" == v5e-* ]]; then
  echo "note: --accelerator-type $ACCEL is called v5litepod-${ACCEL#v5e-} by gcloud; using that" >&2
  ACCEL="v5litepod-${ACCEL#v5e-}"
fi
if [[ -z "$VERSION" && -n "$ACCEL" ]]; then
  case "$ACCEL" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) echo "error: no default --version for $ACCEL; pass --version" >&2; exit 2 ;;
  esac
fi
QR_ID="${QR_ID:-$NAME-qr}"

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

# Runs a command (echoed to stderr), or only prints it with --dry-run.
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

note() { echo "$*" >&2; }

TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
SSH_NET=()
[[ $INTERNAL -eq 1 ]] && SSH_NET=(--internal-ip)   # ssh/scp spell it singular
# Flags shared by `tpu-vm create` and `queued-resources create`.
NODE_FLAGS=(--accelerator-type="$ACCEL")
[[ -n "$CAPACITY" ]] && NODE_FLAGS+=(--"$CAPACITY")
[[ $INTERNAL -eq 1 ]] && NODE_FLAGS+=(--internal-ips)
[[ -n "$NETWORK" ]] && NODE_FLAGS+=(--network="$NETWORK")
[[ -n "$SUBNETWORK" ]] && NODE_FLAGS+=(--subnetwork="$SUBNETWORK")
[[ -n "$SERVICE_ACCOUNT" ]] && NODE_FLAGS+=(--service-account="$SERVICE_ACCOUNT")
[[ -n "$METADATA" ]] && NODE_FLAGS+=(--metadata="$METADATA")
CREATE_TPU=("${TPU[@]}" create "$NAME" "${LOC[@]}" --version="$VERSION" "${NODE_FLAGS[@]}")
CREATE_QR=("${QR[@]}" create "$QR_ID" --node-id="$NAME" "${LOC[@]}" --runtime-version="$VERSION"
           "${NODE_FLAGS[@]}")
DELETE_TPU=("${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet)
DELETE_QR=("${QR[@]}" delete "$QR_ID" "${LOC[@]}" --force --quiet)
DESCRIBE_TPU=("${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state,acceleratorType)')
DESCRIBE_QR=("${QR[@]}" describe "$QR_ID" "${LOC[@]}" --format='value(state.state)')

ssh_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" ${SSH_NET[@]+"${SSH_NET[@]}"} --worker=all --command="$1"; }

# Every worker's log, each line prefixed with the worker's host name (…-w-<k> on TPU VMs).
PREFIX="sed -u \"s/^/[\$(hostname)] /\""
follow_logs() { ssh_all "tail -n +1 -F ~/$RUN_LOG | $PREFIX"; }
tail_logs() {
  ssh_all "echo \"==== \$(hostname): last $TAIL_LINES lines of ~/$RUN_LOG\"; tail -n $TAIL_LINES ~/$RUN_LOG"
}

if [[ $LOGS_ONLY -eq 1 ]]; then
  follow_logs
  exit 0
fi

# "STATE TYPE" of the TPU node, or "NOT_FOUND".
node_info() {
  local out
  out=$("${DESCRIBE_TPU[@]}" 2>/dev/null) || { echo NOT_FOUND; return; }
  echo "${out//$'\t'/ }"
}

# Stops when an existing node has another accelerator type: reusing it would run the wrong job.
check_type() {
  if [[ "$2" != "$ACCEL" ]]; then
    note "error: TPU $NAME already exists as $2 (state $1), not $ACCEL. Delete it"
    note "  ($(show "${DELETE_TPU[@]}")) or choose another --name."
    exit 2
  fi
}

# Counts one more recreation, refusing past --max-recreate.
count_recreate() {
  RECREATED=$((RECREATED + 1))
  if [[ $RECREATED -gt $MAX_RECREATE ]]; then
    note "error: $1 again after $MAX_RECREATE recreations (--max-recreate); giving up"; exit 1
  fi
}
RECREATED=0

# Direct mode: reuse a READY node of the right type; recreate a preempted one; else create.
acquire_direct() {
  local state type
  while true; do
    read -r state type <<<"$(node_info)"
    [[ "$state" == NOT_FOUND ]] || check_type "$state" "$type"
    case "$state" in
      READY) note "TPU $NAME ($type) is READY"; return ;;
      NOT_FOUND) run "${CREATE_TPU[@]}" ;;
      PREEMPTED|TERMINATED)
        count_recreate "TPU $NAME $state"
        note "TPU $NAME is $state: deleting and recreating it"
        run "${DELETE_TPU[@]}"; run "${CREATE_TPU[@]}" ;;
      STOPPED) run "${TPU[@]}" start "$NAME" "${LOC[@]}" ;;
      CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|STOPPING|DELETING|UNHIDING)
        note "TPU $NAME is $state; waiting ${POLL}s"; sleep "$POLL" ;;
      *) note "error: TPU $NAME is in state '$state'; inspect it with gcloud"; exit 1 ;;
    esac
  done
}

# Queued mode: create the queued resource, wait for ACTIVE, recreate after SUSPENDED / FAILED.
acquire_queued() {
  local state last=""
  while true; do
    state=$("${DESCRIBE_QR[@]}" 2>/dev/null) || state=NOT_FOUND
    [[ "$state" == "$last" ]] || note "queued resource $QR_ID: $state"
    last="$state"
    case "$state" in
      ACTIVE) break ;;
      NOT_FOUND) run "${CREATE_QR[@]}" ;;
      SUSPENDED|FAILED)
        count_recreate "queued resource $QR_ID $state"
        run "${DELETE_QR[@]}"; run "${CREATE_QR[@]}" ;;
      *) sleep "$POLL" ;;  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING...
    esac
  done
  local type
  read -r state type <<<"$(node_info)"
  [[ "$state" == READY ]] || { note "error: queued resource ACTIVE but node $NAME is $state"; exit 1; }
  check_type "$state" "$type"
}

# 1. A READY TPU of the requested type.
if [[ $DRY_RUN -eq 1 && $QUEUED -eq 1 ]]; then
  echo "# poll until ACTIVE; create if missing, delete and recreate after SUSPENDED or FAILED:"
  show "${DESCRIBE_QR[@]}"; show "${CREATE_QR[@]}"; show "${DELETE_QR[@]}"
  echo "# then check the node's type:"; show "${DESCRIBE_TPU[@]}"
elif [[ $DRY_RUN -eq 1 ]]; then
  echo "# reuse if READY with type $ACCEL; delete and recreate if PREEMPTED or TERMINATED;"
  echo "# create if missing; stop if the type differs:"
  show "${DESCRIBE_TPU[@]}"; show "${DELETE_TPU[@]}"; show "${CREATE_TPU[@]}"
elif [[ $QUEUED -eq 1 ]]; then
  acquire_queued
else
  acquire_direct
fi

# 2. A trainer left by an earlier launch holds the TPU ("TPU already in use"): stop it by the pid
#    recorded on each worker (checked to still be uae_jax.main, as pids are reused): SIGTERM, up
#    to 60 s to exit (a zombie has an empty cmdline, so it counts as gone), then SIGKILL.
ssh_all "pid=\$(cat ~/$PID_FILE 2>/dev/null || true); if [ -n \"\$pid\" ] && grep -qa uae_jax.main /proc/\$pid/cmdline 2>/dev/null; then echo \"\$(hostname): stopping previous trainer \$pid\"; kill \$pid; for i in \$(seq 60); do grep -qa uae_jax.main /proc/\$pid/cmdline 2>/dev/null || break; sleep 1; done; kill -9 \$pid 2>/dev/null || true; fi; rm -f ~/$PID_FILE"

# 3. Fresh code on every worker: unpacked / cloned next to the old tree, then swapped in, so no
#    file of an older launch survives.
NEW="~/$REMOTE_DIR.new"
if [[ -n "$REPO" ]]; then
  ssh_all "rm -rf $NEW && git clone --quiet $(q "$REPO") $NEW && git -C $NEW checkout --quiet $(q "$REF") && rm -rf ~/$REMOTE_DIR && mv $NEW ~/$REMOTE_DIR"
else
  SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/${NAME}_uae_jax.tgz"
  run tar -czf "$TARBALL" -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude='*/__pycache__' .
  run "${TPU[@]}" scp "$TARBALL" "$NAME:~/uae_jax.tgz" "${LOC[@]}" ${SSH_NET[@]+"${SSH_NET[@]}"} --worker=all
  ssh_all "rm -rf $NEW && mkdir -p $NEW && tar -xzf ~/uae_jax.tgz -C $NEW && rm -rf ~/$REMOTE_DIR && mv $NEW ~/$REMOTE_DIR && rm -f ~/uae_jax.tgz"
fi

# 4. Python >= 3.11 venv with the pinned stack (launch/worker_setup.sh; reinstalls on a new stamp).
if [[ $SKIP_INSTALL -eq 0 ]]; then
  SETUP_ENV=""
  [[ -n "$WORKER_PYTHON" ]] && SETUP_ENV="UAE_PYTHON=$(q "$WORKER_PYTHON") "
  ssh_all "cd ~/$REMOTE_DIR && ${SETUP_ENV}bash launch/worker_setup.sh ~/$REMOTE_VENV '$JAX_TPU_PIN' '$GCSFS_PIN'"
fi

# 5. Train on every worker; jax.distributed.initialize() finds the pod from the TPU metadata.
#    `exec` keeps the recorded pid that of the trainer itself.
TRAIN="python -m uae_jax.main --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --multihost"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  TRAIN+=" $(q "$a")"
done
START="cd ~/$REMOTE_DIR && echo \$\$ > ~/$PID_FILE && exec ~/$REMOTE_VENV/bin/$TRAIN"
if [[ $DETACH -eq 1 ]]; then
  ssh_all "nohup bash -c $(q "$START") > ~/$RUN_LOG 2>&1 < /dev/null &"
  follow_logs
elif [[ $DRY_RUN -eq 1 ]]; then
  ssh_all "set -o pipefail; bash -c $(q "$START") 2>&1 | tee ~/$RUN_LOG | $PREFIX"
  echo "# if the run fails, the last lines of every worker's log:"
  tail_logs
elif ! ssh_all "set -o pipefail; bash -c $(q "$START") 2>&1 | tee ~/$RUN_LOG | $PREFIX"; then
  note "error: the run failed on at least one worker; last lines of each worker's log:"
  tail_logs || true
  exit 1
fi
