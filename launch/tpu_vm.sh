#!/usr/bin/env bash
# Runs an ldm_jax experiment chain on a Cloud TPU VM slice, from creation to deletion.
#
# Creates the slice (`gcloud compute tpus tpu-vm create`), installs JAX for TPU and this checkout
# (uploaded from here, or cloned with --repo) on every worker, runs `ldm-jax run EXPERIMENT
# --workdir W` on all workers at once (`--worker=all`: one JAX process per host, started with
# jax.distributed.initialize through LDM_JAX_DISTRIBUTED=auto), streams their output, and deletes
# the slice when the script exits for any reason. W must be reachable from every worker and
# outlive the slice (a gs:// bucket path): checkpoints there let a re-run, or a retry after a
# spot preemption (--retries), resume where the last one stopped.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh --workdir gs://BUCKET/PATH [options] [-- LDM-JAX-RUN-ARGS...]

Run \`ldm-jax run EXPERIMENT --workdir W\` on every worker of a new Cloud TPU VM slice.

Options (defaults in brackets):
  --workdir W            experiment directory every worker can reach, e.g. gs://bucket/runs/x
  --experiment NAME      experiment file or embedded name [tiny]
  --name NAME            TPU VM name [ldm-jax-\$USER]
  --zone ZONE            [us-central2-b]
  --accelerator-type T   slice type, e.g. v4-32, v5litepod-16, v5p-32, v6e-16 [v4-32]
  --version V            TPU software version [from the type: tpu-ubuntu2204-base for v2-v4,
                         v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                         v2-alpha-tpuv6e for v6e]
  --project P            Google Cloud project [gcloud's default]
  --spot                 create a spot (preemptible) slice
  --retries N            after a preemption, recreate the slice and resume up to N times [0]
  --repo URL             git clone URL instead of uploading this checkout
  --ref REF              branch or tag to clone with --repo [the default branch]
  --keep                 do not delete the slice at the end
  --dry-run              print the commands instead of running them
  -h, --help             this help
Arguments after -- go to \`ldm-jax run\` (e.g. -- --stages codec --config.codec.train.steps=1000).
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

# Shell-quotes each argument only where needed, so printed commands can be pasted back.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

EXPERIMENT=tiny
WORKDIR=""
NAME="ldm-jax-${USER:-user}"
ZONE=us-central2-b
TYPE=v4-32
VERSION=""
PROJECT=""
SPOT=0
RETRIES=0
REPO_URL=""
REF=""
KEEP=0
DRY_RUN=0
EXTRA=()

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --experiment) need_value "$@"; EXPERIMENT=$2; shift 2 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --retries) need_value "$@"; RETRIES=$2; shift 2 ;;
    --repo) need_value "$@"; REPO_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $WORKDIR ]] || die "say where the experiment lives: --workdir gs://BUCKET/PATH"
[[ $RETRIES =~ ^[0-9]+$ ]] || die "--retries takes a number, got '$RETRIES'"
if [[ $WORKDIR != gs://* ]]; then
  echo "tpu_vm.sh: warning: $WORKDIR is not a gs:// path; it must be shared by all workers" \
    "and outlive the slice" >&2
fi
if [[ -z $VERSION ]]; then
  case $TYPE in
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -n $PROJECT ]] && WHERE+=("--project=$PROJECT")

run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}

# --- what runs on every worker ------------------------------------------------------------
ARCHIVE=""
if [[ -n $REPO_URL ]]; then
  clone=(git clone --depth 1)
  [[ -n $REF ]] && clone+=(--branch "$REF")
  FETCH="rm -rf ~/ldm_jax && $(quote "${clone[@]}" "$REPO_URL") ~/ldm_jax"
else
  ARCHIVE="${TMPDIR:-/tmp}/ldm_jax-$NAME.tar.gz"
  FETCH="rm -rf ~/ldm_jax && mkdir -p ~/ldm_jax && tar -xzf ~/ldm_jax.tar.gz -C ~/ldm_jax"
fi
# gcsfs lets orbax and TFDS (through etils.epath) read and write gs:// paths.
INSTALL="set -e; $FETCH; python3 -m pip install -q -U pip;"
INSTALL+=" python3 -m pip install -U 'jax[tpu]'; python3 -m pip install -e ~/ldm_jax gcsfs"
RUN_ARGS=$(quote ldm-jax run "$EXPERIMENT" --workdir "$WORKDIR" "${EXTRA[@]}")
REMOTE="set -o pipefail; export PATH=\"\$HOME/.local/bin:\$PATH\" LDM_JAX_DISTRIBUTED=auto;"
REMOTE+=" cd ~/ldm_jax && $RUN_ARGS 2>&1 | tee -a ~/ldm-jax.log"

create_and_install() {
  local create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE"
    "--version=$VERSION")
  ((SPOT)) && create+=(--spot)
  run "${create[@]}"
  if [[ -n $ARCHIVE ]]; then
    run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:ldm_jax.tar.gz" "${WHERE[@]}" --worker=all
  fi
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$INSTALL"
}

delete_slice() {
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

cleanup() {
  local status=$?
  [[ -n $ARCHIVE && $DRY_RUN -eq 0 ]] && rm -f "$ARCHIVE"
  if ((KEEP)); then
    echo "tpu_vm.sh: slice $NAME kept; delete it with:" >&2
    echo "  $(quote "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet)" >&2
  else
    delete_slice || echo "tpu_vm.sh: could not delete $NAME (if it exists, delete it by hand)" >&2
  fi
  exit "$status"
}

if [[ -n $ARCHIVE ]]; then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  run tar -czf "$ARCHIVE" -C "$here" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache .
fi
trap cleanup EXIT
trap 'exit 130' INT TERM

attempt=0
while :; do
  create_and_install
  # One process per worker; keepalives so a quiet compile does not drop the connection.
  if run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
    --ssh-flag=-oServerAliveInterval=60 "--command=$REMOTE"; then
    break
  fi
  state=$("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' || echo GONE)
  if ((attempt >= RETRIES)) || [[ $state != PREEMPTED && $state != TERMINATED && $state != GONE ]]
  then
    echo "tpu_vm.sh: the run failed (slice state: $state); logs: ~/ldm-jax.log on each worker" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  echo "tpu_vm.sh: slice $NAME was $state; recreating it and resuming (retry $attempt)" >&2
  delete_slice || true
done
if ((DRY_RUN && RETRIES)); then
  echo "# after a preemption: delete, then create, install and run again (at most $RETRIES times)"
fi
