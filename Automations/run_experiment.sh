#!/usr/bin/env bash
# One experiment: upstream's setup_and_run_gs_alarm_system_experiment.sh as a thin wrapper
# over `lps experiment` (start the topology, load, faults, drain, stop, analyze).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: run_experiment.sh [--local|--compose] legacy|ng failover|performance [options] [-- LPS_ARGS...]

Runs one experiment with `lps experiment` into one result folder: summary.json,
summary.csv, report.html, the client ledger, faults.jsonl, run.json and logs/.

Where:
  --local              services as local processes on free ports (default)
  --compose            docker-compose-<topology>.yml of the repository (needs Docker and
                       the compose command; LPS_COMPOSE=docker-compose for Compose v1)
Topology:              legacy (baseline) or ng (MQTT bridges and broker)
Experiment:
  failover             1 closed-loop user (upstream's failover load) for --duration
  performance          steps of 250·k users (upstream's performance load, `--steps`)

Options:
  --faults SCHEDULE    none (default), entry, chain or all (upstream's inject_fault.py)
  --scale X            multiply every fault time by X (default 1: upstream's times)
  --duration S         failover: seconds of load (default 600, long enough for the whole
                       `all` schedule at scale 1); performance: seconds per step and per
                       pause (default 60)
  --clean              compose: `down -v` before `up` (upstream's clean start); local runs
                       always start clean
  --netem              compose: add upstream's network emulation, the override
                       docker-compose-netem.yml (ng) or docker-compose-legacy-netem.yml
                       (legacy)
  --out DIR            result folder (default
                       runs/<UTC time>-<topology>-<experiment>-<faults>[-netem])
  --broker B           local NG broker: auto, embedded, mosquitto or mqtt://HOST:PORT
  --dry-run            print the lps command line instead of running it
  -h, --help           this text
  -- LPS_ARGS...       passed to `lps experiment` as they are, e.g.
                       -- --drain-timeout 600 --background-users 70 --keep-up

Environment:
  LPS_BIN      the lps executable (default target/release/lps, else `cargo run --release`)
  LPS_COMPOSE  the compose command (default "docker compose")

Ctrl-C stops the run and the topology (compose: `down`, unless `-- --keep-up`).

Example:
  Automations/run_experiment.sh --compose ng failover --faults all --clean
  Automations/run_experiment.sh --compose --netem legacy performance
USAGE
}

platform=local
topology=""
experiment=""
faults=none
scale=""
duration=""
clean=false
netem=false
out=""
broker=""
dry_run=false
extra=()
while (($#)); do
  case "$1" in
    --local) platform=local ;;
    --compose) platform=compose ;;
    --faults) need_value "$@"; faults=$2; shift ;;
    --scale) need_number "$@"; scale=$2; shift ;;
    --duration) need_number "$@"; duration=$2; shift ;;
    --clean) clean=true ;;
    --netem) netem=true ;;
    --out) need_value "$@"; out=$2; shift ;;
    --broker) need_value "$@"; broker=$2; shift ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *)
      if [[ -z "$topology" ]]; then
        topology=$1
      elif [[ -z "$experiment" ]]; then
        experiment=$1
      else
        die "unexpected argument $1"
      fi
      ;;
  esac
  shift
done

case "$topology" in
  legacy | ng) ;;
  "") die "which topology? legacy or ng" ;;
  *) die "topology '$topology': expected legacy or ng" ;;
esac
case "$experiment" in
  failover | performance) ;;
  "") die "which experiment? failover or performance" ;;
  *) die "experiment '$experiment': expected failover or performance" ;;
esac
case "$faults" in
  none | entry | chain | all) ;;
  *) die "--faults '$faults': expected none, entry, chain or all" ;;
esac
if [[ "$platform" == compose && -n "$broker" ]]; then
  die "--broker is for local runs; the compose topology brings its own Mosquitto"
fi
if $netem && [[ "$platform" != compose ]]; then
  die "--netem needs --compose: the network emulation is a compose override"
fi

label="$experiment-$([[ "$faults" == none ]] && echo without-faults || echo "with-faults-$faults")"
if $netem; then
  label+=-netem
fi
out=${out:-runs/$(utc_timestamp)-$topology-$label}

args=(experiment "$topology" --faults "$faults" --out "$out")
case "$experiment" in
  failover) args+=(--users 1 --duration "${duration:-600}") ;;
  performance)
    args+=(--steps)
    if [[ -n "$duration" ]]; then
      args+=(--step-secs "$duration" --pause-secs "$duration")
    fi
    ;;
esac
if [[ -n "$scale" ]]; then
  args+=(--scale "$scale")
fi
if [[ "$platform" == compose ]]; then
  args+=(--compose "$LPS_REPO_ROOT/docker-compose-$topology.yml")
  if $netem; then
    case "$topology" in
      ng) args+=(--compose "$LPS_REPO_ROOT/docker-compose-netem.yml") ;;
      legacy) args+=(--compose "$LPS_REPO_ROOT/docker-compose-legacy-netem.yml") ;;
    esac
  fi
  if $clean; then
    args+=(--clean)
  fi
elif [[ -n "$broker" ]]; then
  args+=(--broker "$broker")
fi
args+=("${extra[@]}")

if $dry_run; then
  print_command lps "${args[@]}"
  exit 0
fi
if $netem; then
  refuse_netem_if_unavailable
fi
echo "== $topology $label ($platform) into $out" >&2
echo "lps: $(lps_which)" >&2
lps "${args[@]}"
