# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/compose-test.sh: `as_root` (sudo unless root) and
# `apt_install PACKAGE…` (`apt-get update` once, before the first install).

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root apt-get install -y -qq "$@" >/dev/null
}
