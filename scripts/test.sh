#!/usr/bin/env bash
# Runs the test suite (README.adoc's test command): installs what the tests need and a
# machine with only the Rust toolchain lacks (see below), then `cargo test --workspace`.
# Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# What the tests need beyond the Rust toolchain:
# - Mosquitto, for the bridge tests. Debian bookworm ships 2.0.11, which ignores a client
#   Receive Maximum above 1; its backports suite has 2.0.21, so prefer that;
# - docker-compose, to validate the compose files (`docker-compose config`, no engine);
# - shellcheck, for Automations/ and scripts/;
# - python3 with venv, for the Locust test (scripts/locust-env.sh makes the venv);
# - kubectl, for the Kubernetes wiring test (`kubectl kustomize` renders deploy/k8s/; no
#   cluster). Debian's kubernetes-client (1.20, kustomize v2.0.3) is enough: the overlays
#   are written for it.
# shellcheck source=scripts/apt.sh
. scripts/apt.sh
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  step "installing mosquitto"
  # shellcheck source=/dev/null
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  if [ "$codename" = bookworm ]; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
      uri=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    if [ -n "$uri" ]; then
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
        | as_root tee /etc/apt/sources.list.d/lps-backports.sources >/dev/null
    fi
  fi
  apt_install -t "${codename}-backports" mosquitto 2>/dev/null || apt_install mosquitto
fi
echo "mosquitto: $( (mosquitto -h 2>/dev/null || /usr/sbin/mosquitto -h 2>/dev/null) | head -n 1)"
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
echo "docker-compose: $(docker-compose version --short 2>/dev/null)"
echo "shellcheck: $(shellcheck --version | awk '/^version:/ {print $2}')"
echo "python3: $(python3 --version 2>&1)"
echo "kubectl: $(kubectl version --client 2>/dev/null | head -n 1)"

step "cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
# One closing line for the whole workspace (cargo ends with the last crate's doc tests).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
