# shellcheck shell=bash
# Sourced by the Automations scripts: where the repository is, and how to run lps.

# The repository root (this file's folder is Automations/).
LPS_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LPS_REPO_ROOT

# Runs lps: $LPS_BIN, else target/release/lps, else a release build through cargo.
lps() {
  if [[ -n "${LPS_BIN:-}" ]]; then
    "$LPS_BIN" "$@"
  elif [[ -x "$LPS_REPO_ROOT/target/release/lps" ]]; then
    "$LPS_REPO_ROOT/target/release/lps" "$@"
  else
    cargo run --release -q --manifest-path "$LPS_REPO_ROOT/Cargo.toml" -p lps -- "$@"
  fi
}

# Which lps `lps` runs, for the log.
lps_which() {
  if [[ -n "${LPS_BIN:-}" ]]; then
    echo "$LPS_BIN (LPS_BIN)"
  elif [[ -x "$LPS_REPO_ROOT/target/release/lps" ]]; then
    echo "$LPS_REPO_ROOT/target/release/lps"
  else
    echo "cargo run --release -p lps (no target/release/lps; set LPS_BIN to choose)"
  fi
}

# Prints a command line, quoted so that it can be pasted into a shell.
print_command() {
  local word line=""
  for word in "$@"; do
    line+="$(printf '%q' "$word") "
  done
  echo "${line% }"
}

die() {
  echo "error: $*" >&2
  echo "try: $(basename "$0") --help" >&2
  exit 64
}

# Fails unless $2 (the value of option $1) is there.
need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

# Fails unless $2 (the value of option $1) is a non-negative number.
need_number() {
  need_value "$@"
  [[ "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1: '$2' is not a number"
}

utc_timestamp() {
  date -u +%Y%m%dT%H%M%SZ
}

# Prints why network emulation (the netem overrides) cannot work on this machine and
# returns 0; returns 1 when it can, or when that cannot be told. The probe adds a netem
# qdisc to the loopback device of a throwaway network namespace (`unshare --net`, with
# `--user --map-root-user` when not root), never to the machine's own interfaces.
# `lps experiment` makes the same check.
netem_unavailable() {
  local userns=() err
  [[ $(id -u) -eq 0 ]] || userns=(--user --map-root-user)
  if err=$(timeout 10 unshare "${userns[@]}" --net tc qdisc add dev lo root netem delay 1ms 2>&1); then
    return 1
  fi
  case "$err" in
    *"qdisc kind is unknown"* | *"Unknown qdisc"*)
      echo "this kernel has no sch_netem (\`tc qdisc add dev lo root netem delay 1ms\` in a throwaway network namespace answered \"$err\")"
      return 0
      ;;
  esac
  return 1
}

# Exits 69 (unavailable) when --netem was asked for and this machine cannot emulate.
refuse_netem_if_unavailable() {
  local why
  if why=$(netem_unavailable); then
    echo "error: --netem: network emulation is not available here: $why." >&2
    echo "The netem sidecars would leave every service unshaped, so the runs would not measure what they are labelled with. Run without --netem, or on a host whose kernel has sch_netem." >&2
    exit 69
  fi
}
