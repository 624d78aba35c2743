#!/usr/bin/env bash
# Upstream's start_experiment.sh: the baseline and NG, failover and/or performance, with and
# without faults, each run into its own folder, then one comparison report per pair.
# A thin loop over run_experiment.sh and `lps analyze`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
Usage: start_experiment.sh [--local|--compose] [options] [-- LPS_ARGS...]

For each experiment (failover, performance) and fault mode (without, with faults) runs
legacy and ng with run_experiment.sh, then `lps analyze` over the pair:

  <out>/<experiment>-without-faults/{legacy,ng}/    one result folder per run
  <out>/<experiment>-without-faults/report.html     legacy and ng side by side
  <out>/<experiment>-with-faults-<schedule>/...

A failed run does not stop the others; the exit status says whether all succeeded.

Options:
  --local | --compose     where the topologies run (default --local; see run_experiment.sh)
  --experiments LIST      comma-separated: failover,performance (default both)
  --fault-modes LIST      comma-separated: without,with (default both)
  --faults SCHEDULE       schedule of the with-faults runs: entry, chain or all (default all)
  --scale X               fault time scale (default 1: upstream's times)
  --duration S            as run_experiment.sh --duration
  --clean                 compose: clean start (`down -v`) before every run
  --netem                 compose: with upstream's network emulation (see run_experiment.sh)
  --out DIR               root of the results (default runs/<UTC time>)
  --broker B              local NG broker (auto, embedded, mosquitto, mqtt://HOST:PORT)
  --dry-run               print the commands instead of running them
  -h, --help              this text
  -- LPS_ARGS...          passed to every `lps experiment`

Environment: LPS_BIN, LPS_COMPOSE (see run_experiment.sh --help).

Example:
  Automations/start_experiment.sh --compose --clean --experiments failover
USAGE
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
platform=--local
experiments=failover,performance
modes=without,with
faults=all
out=""
dry_run=false
pass=()
extra=()
while (($#)); do
  case "$1" in
    --local | --compose) platform=$1 ;;
    --experiments) need_value "$@"; experiments=$2; shift ;;
    --fault-modes) need_value "$@"; modes=$2; shift ;;
    --faults) need_value "$@"; faults=$2; shift ;;
    --scale | --duration) need_number "$@"; pass+=("$1" "$2"); shift ;;
    --broker) need_value "$@"; pass+=("$1" "$2"); shift ;;
    --clean | --netem) pass+=("$1") ;;
    --out) need_value "$@"; out=$2; shift ;;
    --dry-run) dry_run=true; pass+=(--dry-run) ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

IFS=, read -r -a experiment_list <<<"$experiments"
IFS=, read -r -a mode_list <<<"$modes"
for experiment in "${experiment_list[@]}"; do
  case "$experiment" in
    failover | performance) ;;
    *) die "--experiments: '$experiment' is not failover or performance" ;;
  esac
done
for mode in "${mode_list[@]}"; do
  case "$mode" in
    without | with) ;;
    *) die "--fault-modes: '$mode' is not without or with" ;;
  esac
done
case "$faults" in
  entry | chain | all) ;;
  *) die "--faults '$faults': expected entry, chain or all" ;;
esac
out=${out:-runs/$(utc_timestamp)}
if ! $dry_run && [[ " ${pass[*]} " == *" --netem "* ]]; then
  refuse_netem_if_unavailable
fi

failed=()
reports=()
for experiment in "${experiment_list[@]}"; do
  for mode in "${mode_list[@]}"; do
    if [[ "$mode" == without ]]; then
      schedule=none
      label=$experiment-without-faults
    else
      schedule=$faults
      label=$experiment-with-faults-$faults
    fi
    pair=()
    for topology in legacy ng; do
      dir=$out/$label/$topology
      if "$here/run_experiment.sh" "$platform" "$topology" "$experiment" --faults "$schedule" \
        --out "$dir" "${pass[@]}" -- "${extra[@]}"; then
        pair+=("$dir")
      else
        echo "warning: $label/$topology failed" >&2
        failed+=("$label/$topology")
      fi
    done
    if ((${#pair[@]} == 0)); then
      continue
    fi
    if $dry_run; then
      print_command lps analyze "${pair[@]}" --out "$out/$label"
    elif lps analyze "${pair[@]}" --out "$out/$label"; then
      reports+=("$out/$label/report.html")
    else
      failed+=("$label (analyze)")
    fi
  done
done

if ! $dry_run; then
  echo
  echo "results in $out"
  for report in "${reports[@]}"; do
    echo "  $report"
  done
fi
if ((${#failed[@]} > 0)); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
