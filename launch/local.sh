#!/usr/bin/env bash
# Runs an ldm_jax experiment chain on this machine, as one process or as N local "hosts".
#
# With --processes N > 1 it starts N processes of one JAX cluster on loopback: each gets
# LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID, which
# ldm_jax.parallel.initialize_distributed turns into jax.distributed.initialize (gloo collectives
# between CPU processes). This is how a multi-host run is rehearsed without a cluster. Process 0's
# output is shown and all of it goes to W/logs/launch/process_I.log; Ctrl-C or SIGTERM is passed
# to every process, which save a checkpoint and stop, and a re-run resumes.
set -euo pipefail

usage() {
  cat <<EOF
Usage: launch/local.sh [options] [-- LDM-JAX-RUN-ARGS...]

Run \`ldm-jax run EXPERIMENT --workdir W\` here, in one process or in N processes as N hosts.

Options (defaults in brackets):
  --experiment NAME      experiment file or embedded name [tiny]
  --workdir W            experiment directory [runs/EXPERIMENT]
  --processes N          processes, each one JAX host [1]
  --port P               coordinator port on 127.0.0.1 with N > 1 [12355]
  --cpu-devices D        run on CPU with D simulated devices per process [off: JAX's default]
  --gpus-per-process K   give process I the GPUs I*K .. I*K+K-1 (CUDA_VISIBLE_DEVICES) [off]
  --dry-run              print the commands instead of running them
  -h, --help             this help
Arguments after -- go to \`ldm-jax run\` (e.g. -- --stages data,codec).
EOF
}

die() {
  echo "local.sh: error: $*" >&2
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

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

EXPERIMENT=tiny
WORKDIR=""
PROCESSES=1
PORT=12355
CPU_DEVICES=""
GPUS_PER_PROCESS=""
DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --experiment) need_value "$@"; EXPERIMENT=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --processes) need_value "$@"; PROCESSES=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --cpu-devices) need_value "$@"; CPU_DEVICES=$2; shift 2 ;;
    --gpus-per-process) need_value "$@"; GPUS_PER_PROCESS=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

for pair in "processes:$PROCESSES" "port:$PORT" "cpu-devices:${CPU_DEVICES:-1}" \
  "gpus-per-process:${GPUS_PER_PROCESS:-1}"; do
  [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} takes a positive number, got '${pair#*:}'"
done
WORKDIR=${WORKDIR:-runs/$(basename "${EXPERIMENT%.py}")}
COMMAND=(ldm-jax run "$EXPERIMENT" --workdir "$WORKDIR" "${EXTRA[@]}")

# Sets ARGV to the command line of process $1: `env VAR=... ldm-jax run ...`.
process_argv() {
  local index=$1 env=()
  if [[ -n $CPU_DEVICES ]]; then
    env+=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES")
  fi
  if [[ -n $GPUS_PER_PROCESS ]]; then
    local first=$((index * GPUS_PER_PROCESS)) ids=() k
    for ((k = first; k < first + GPUS_PER_PROCESS; k++)); do ids+=("$k"); done
    env+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${ids[*]}")")
  fi
  if ((PROCESSES > 1)); then
    env+=("LDM_JAX_COORDINATOR=127.0.0.1:$PORT" "LDM_JAX_NUM_PROCESSES=$PROCESSES"
      "LDM_JAX_PROCESS_ID=$index")
  fi
  ARGV=()
  [[ ${#env[@]} -eq 0 ]] || ARGV=(env "${env[@]}")
  ARGV+=("${COMMAND[@]}")
}

if ((PROCESSES == 1)); then
  process_argv 0
  if ((DRY_RUN)); then
    quote "${ARGV[@]}"
    exit 0
  fi
  exec "${ARGV[@]}"
fi

LOGS="$WORKDIR/logs/launch"
if ((DRY_RUN)); then
  echo "mkdir -p $(quote "$LOGS")"
  for ((i = PROCESSES - 1; i >= 1; i--)); do
    process_argv "$i"
    echo "$(quote "${ARGV[@]}") > $(quote "$LOGS/process_$i.log") 2>&1 &"
  done
  process_argv 0
  echo "$(quote "${ARGV[@]}") 2>&1 | tee $(quote "$LOGS/process_0.log")"
  echo "wait"
  exit 0
fi

mkdir -p "$LOGS"
PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
# A signal here goes to every process, so all of them stop at the same step and save.
trap 'stop_all' INT TERM
for ((i = PROCESSES - 1; i >= 0; i--)); do
  process_argv "$i"
  if ((i == 0)); then
    "${ARGV[@]}" > >(tee "$LOGS/process_0.log") 2>&1 &
  else
    "${ARGV[@]}" > "$LOGS/process_$i.log" 2>&1 &
  fi
  PIDS+=("$!")
done
status=0
alive=("${PIDS[@]}")
while ((${#alive[@]} > 0)); do
  still=()
  for pid in "${alive[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      # The others would wait for the failed process until JAX's timeouts; stop them now.
      echo "local.sh: a process exited with $code; stopping the others (logs: $LOGS)" >&2
      stop_all
    fi
  done
  alive=("${still[@]}")
  ((${#alive[@]} == 0)) || sleep 0.5
done
exit "$status"
