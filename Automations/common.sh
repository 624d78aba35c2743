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
