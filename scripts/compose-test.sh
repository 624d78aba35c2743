#!/usr/bin/env bash
# Runs both compose topologies on a real Docker engine and checks what a user relies on
# (README.adoc, "Docker Compose"; issue 12):
#
#   - every container of docker-compose-legacy.yml and docker-compose-ng.yml turns healthy;
#   - the sysctls of the compose files are applied inside the containers;
#   - one request through each entry (7081-7083) arrives at the simulator (its ledger);
#   - the logs and the simulator's ledger are in the bind-mounted logs folder;
#   - `docker kill` of a service: health leaves "healthy" and comes back through
#     `restart: unless-stopped`;
#   - the netem override: shaped when the kernel has sch_netem, else every sidecar exits
#     once with a clear message (no restart loop);
#   - `lps experiment TOPOLOGY --compose FILE --faults chain` (short) loses nothing;
#   - `down -v` leaves no container, network or volume behind.
#
# It prints one table row per check and the time it took.
#
# Setup, done here when missing (so that a machine with only the Rust toolchain works):
#   - packages: docker.io, docker-compose, debootstrap (only to make base images), curl, jq;
#   - a Docker engine: when none answers, a dockerd of its own (overlay2, no iptables rules,
#     no masquerading: containers reach nothing outside the machine), stopped at the end;
#   - base images: RUNTIME_IMAGE (debian:bookworm-slim), MOSQUITTO_IMAGE
#     (eclipse-mosquitto:2.0.21) and, with --full-build, RUST_IMAGE (rust:1.95-bookworm)
#     are used when present or pullable; otherwise images of our own are made from a
#     debootstrap of Debian bookworm and tagged lps-offline/... (never the real names).
#     They stay in the engine: the next run on the same machine reuses them.
#
# The LPS image: by default the Dockerfile's `prebuilt` target, which packages binaries
# built here, stripped of debug info: `--profile release` (default; `cargo build --release
# --locked`) or `--profile debug` (the binaries `cargo test` built already; .ci/run uses
# these, right after scripts/test.sh, to spend no second compile). With --full-build, the
# default target instead, which compiles inside the image (about 10 minutes on 2 cores).
# The runtime layout (user, folders, settings) is the same stage in all three.
#
# Usage: scripts/compose-test.sh [--profile release|debug] [--full-build] [--only legacy|ng]
#        [--keep-up]
# --only runs one topology; --keep-up leaves the containers (of a failed check) and the
# engine running for a look: `docker ps -a --filter label=com.docker.compose.project=lps-compose-test`.
# Environment: LPS_COMPOSE (compose command; default: `docker compose` if it works, else
# docker-compose), RUNTIME_IMAGE, MOSQUITTO_IMAGE, RUST_IMAGE (use these images as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

full_build=false
profile=release
only=
keep_up=false
while [ $# -gt 0 ]; do
  case "$1" in
    --full-build) full_build=true ;;
    --profile) profile=${2:?--profile needs release or debug}; shift ;;
    --only) only=${2:?--only needs legacy or ng}; shift ;;
    --keep-up) keep_up=true ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "compose-test: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
case "$only" in "" | legacy | ng) ;; *) echo "compose-test: --only legacy|ng" >&2; exit 64 ;; esac
case "$profile" in
  release) cargo_profile=(--release) ;;
  debug) cargo_profile=() ;;
  *) echo "compose-test: --profile release|debug" >&2; exit 64 ;;
esac

started_at=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - started_at))" "$*"; }
die() { echo "compose-test: error: $*" >&2; exit 1; }
# shellcheck source=scripts/apt.sh
. scripts/apt.sh

# The compose project: its own name, so that nothing of a user's `docker compose up` in this
# folder is touched, and every container, network and volume carries this label.
project=lps-compose-test
export COMPOSE_PROJECT_NAME=$project
project_label=com.docker.compose.project=$project
# Our own image tags (the base images keep their names or get lps-offline/... ones).
export LPS_IMAGE=lps-compose-test:latest
export LPS_NETEM_IMAGE=lps-compose-test-netem:latest
work=$(mktemp -d /tmp/lps-compose-test.XXXXXX)
chmod 755 "$work"

# Results: one row per check.
rows=()
row() { rows+=("$(printf '%-7s %-48s %-5s %s' "$1" "$2" "$3" "$4")"); }
check_started=0
begin() { check_started=$(date +%s); }
took() { echo "$(($(date +%s) - check_started)) s"; }

# ---------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------
step "packages"
missing=()
command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# The compose command: LPS_COMPOSE, else the plugin, else v1 (installed when neither works),
# the same fallback `lps` makes.
if [ -z "${LPS_COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then
    LPS_COMPOSE="docker compose"
  else
    LPS_COMPOSE=docker-compose
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
export LPS_COMPOSE
read -r -a compose_cmd <<<"$LPS_COMPOSE"
echo "docker: $(docker --version)"
echo "compose: $LPS_COMPOSE ($("${compose_cmd[@]}" version 2>/dev/null | head -n 1))"

# ---------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------
own_dockerd_pid=
bridge_nf_restore=
cleanup() {
  local status=$?
  set +e
  if ! $keep_up && [ -n "${engine_ok:-}" ]; then
    for file in docker-compose-legacy.yml docker-compose-ng.yml; do
      timeout 120 "${compose_cmd[@]}" -f "$file" down -v --remove-orphans >/dev/null 2>&1
    done
    docker image prune -f --filter label=org.opencontainers.image.title=lps >/dev/null 2>&1
    docker image prune -f --filter label=org.opencontainers.image.title=lps-netem >/dev/null 2>&1
    # The staged binaries are a copy (the images keep them): not left in target/.
    rm -rf "$repo/target/lps-image"
  fi
  if [ -n "$own_dockerd_pid" ] && ! $keep_up; then
    echo "stopping the dockerd this script started (pid $own_dockerd_pid)"
    as_root kill -TERM "$own_dockerd_pid" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$own_dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$own_dockerd_pid" 2>/dev/null && as_root kill -KILL "$own_dockerd_pid"
  fi
  if [ -n "$bridge_nf_restore" ]; then
    echo "$bridge_nf_restore" | as_root tee /proc/sys/net/bridge/bridge-nf-call-iptables >/dev/null
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "engine"
engine_answers() { timeout 15 docker info >/dev/null 2>&1; }
if engine_answers; then
  echo "using the running engine: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
else
  echo "no engine answers; starting dockerd (overlay2, --iptables=false --ip-masq=false)"
  dockerd_args=(--storage-driver=overlay2 --iptables=false --ip-masq=false)
  # Started directly (not through a function), so that $! is dockerd (or sudo) itself.
  if [ "$(id -u)" -eq 0 ]; then
    dockerd "${dockerd_args[@]}" >"$work/dockerd.log" 2>&1 &
  else
    # shellcheck disable=SC2024 # the log is ours, written by this shell
    sudo dockerd "${dockerd_args[@]}" >"$work/dockerd.log" 2>&1 &
  fi
  own_dockerd_pid=$!
  for _ in $(seq 1 60); do
    engine_answers && break
    kill -0 "$own_dockerd_pid" 2>/dev/null || { cat "$work/dockerd.log" >&2; die "dockerd exited"; }
    sleep 1
  done
  engine_answers || { tail -n 20 "$work/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }
  echo "dockerd $(docker info --format '{{.ServerVersion}} ({{.Driver}})') up, pid $own_dockerd_pid"
fi
engine_ok=1
# With bridge-nf-call-iptables on, bridged traffic between containers goes through the
# FORWARD chain, whose policy may be DROP (left by a dockerd that managed iptables): the
# containers could not reach each other. Off for this run, restored afterwards.
if [ -w /proc/sys/net/bridge/bridge-nf-call-iptables ] || [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)" = 1 ]; then
    echo 0 | as_root tee /proc/sys/net/bridge/bridge-nf-call-iptables >/dev/null
    bridge_nf_restore=1
  fi
fi

# ---------------------------------------------------------------------------------------
# Base images
# ---------------------------------------------------------------------------------------
rootfs=
rootfs_dir() {
  # A Debian bookworm minbase (with iproute2, so that the netem stage needs no package
  # index), made once per run and shared by the images made from it.
  if [ -n "$rootfs" ]; then return; fi
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  local mirror
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  rootfs=$work/rootfs
  echo "debootstrap --variant=minbase bookworm from $mirror (about 2 minutes)"
  as_root timeout 900 debootstrap --variant=minbase --include=iproute2,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  as_root chroot "$rootfs" apt-get clean
  as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
}
import_rootfs() { # TAG CHANGE...
  local tag=$1
  shift
  local changes=()
  for change in "$@"; do changes+=(--change "$change"); done
  as_root tar -C "$rootfs" --numeric-owner -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  echo "made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1/1e6}'))"
}
in_rootfs() { as_root chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive "$@"; }
rootfs_apt() { # LOG APT-GET-INSTALL-ARGS...
  local log=$1 ok=true
  shift
  as_root mount -t proc proc "$rootfs/proc"
  if ! in_rootfs apt-get update -qq >"$log" 2>&1 \
    || ! in_rootfs apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1; then
    ok=false
  fi
  as_root umount "$rootfs/proc"
  $ok || { tail -n 20 "$log" >&2; die "apt-get install $* in the rootfs failed"; }
}
make_runtime() { # TAG
  rootfs_dir
  import_rootfs "$1" 'CMD ["bash"]'
}
make_mosquitto() { # TAG
  rootfs_dir
  local mirror
  mirror=$(grep -m1 -o 'http[^ ]*' "$rootfs/etc/apt/sources.list")
  echo "deb $mirror bookworm-backports main" | as_root tee "$rootfs/etc/apt/sources.list.d/backports.list" >/dev/null
  rootfs_apt "$work/mosquitto-apt.log" -t bookworm-backports mosquitto mosquitto-clients
  # Laid out like eclipse-mosquitto: /mosquitto/{config,data,log}, an entrypoint that
  # hands /mosquitto to the mosquitto user when started as root.
  as_root mkdir -p "$rootfs"/mosquitto/config "$rootfs"/mosquitto/data "$rootfs"/mosquitto/log
  printf 'listener 1883\nallow_anonymous true\npersistence true\npersistence_location /mosquitto/data/\n' \
    | as_root tee "$rootfs/mosquitto/config/mosquitto.conf" >/dev/null
  as_root tee "$rootfs/docker-entrypoint.sh" >/dev/null <<'ENTRYPOINT'
#!/bin/sh
set -e
if [ "$(id -u)" = 0 ]; then chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true; fi
exec "$@"
ENTRYPOINT
  as_root chmod 0755 "$rootfs/docker-entrypoint.sh"
  in_rootfs apt-get clean
  as_root rm -rf "$rootfs"/var/lib/apt/lists/*
  import_rootfs "$1" 'ENTRYPOINT ["/docker-entrypoint.sh"]' \
    'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]' \
    'EXPOSE 1883' 'VOLUME ["/mosquitto/data", "/mosquitto/log"]'
  # The runtime image must not get Mosquitto: make it first (see resolve order below).
}
make_rust() { # TAG
  rootfs_dir
  # gcc and the libc headers for linking, plus the host's toolchain and its registry
  # cache: the build runs offline (CARGO_NET_OFFLINE) against the crates the host has.
  rootfs_apt "$work/rust-apt.log" gcc libc6-dev pkg-config
  local toolchain
  toolchain=$(dirname "$(dirname "$(rustup which rustc)")")
  as_root mkdir -p "$rootfs/usr/local/rust" "$rootfs/usr/local/cargo/registry"
  as_root cp -a "$toolchain/." "$rootfs/usr/local/rust/"
  as_root cp -a "${CARGO_HOME:-$HOME/.cargo}/registry/cache" "${CARGO_HOME:-$HOME/.cargo}/registry/index" \
    "$rootfs/usr/local/cargo/registry/"
  in_rootfs apt-get clean
  as_root rm -rf "$rootfs"/var/lib/apt/lists/*
  import_rootfs "$1" 'ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV CARGO_HOME=/usr/local/cargo' 'ENV CARGO_NET_OFFLINE=true' 'CMD ["bash"]'
}
# VAR DEFAULT OFFLINE_TAG MAKER: the variable's image if set; else DEFAULT when present or
# pullable; else OFFLINE_TAG, made when missing.
resolve_image() {
  local var=$1 default=$2 offline=$3 maker=$4 chosen=
  if [ -n "${!var:-}" ]; then
    chosen=${!var}
    docker image inspect "$chosen" >/dev/null 2>&1 || timeout 300 docker pull -q "$chosen" >/dev/null \
      || die "$var=$chosen is neither present nor pullable"
  elif docker image inspect "$default" >/dev/null 2>&1; then
    chosen=$default
  elif docker image inspect "$offline" >/dev/null 2>&1; then
    chosen=$offline
    echo "$var: $offline (made by an earlier run)"
  elif timeout 60 docker pull -q "$default" >/dev/null 2>&1; then
    chosen=$default
  else
    echo "$var: $default cannot be pulled; making $offline"
    "$maker" "$offline"
    chosen=$offline
  fi
  printf -v "$var" '%s' "$chosen"
  export "${var?}"
  echo "$var=$chosen"
}
step "base images"
begin
resolve_image RUNTIME_IMAGE debian:bookworm-slim lps-offline/debian:bookworm-slim make_runtime
resolve_image MOSQUITTO_IMAGE eclipse-mosquitto:2.0.21 lps-offline/eclipse-mosquitto:2.0.21 make_mosquitto
if $full_build; then
  resolve_image RUST_IMAGE rust:1.95-bookworm lps-offline/rust:1.95-bookworm make_rust
fi
[ -z "$rootfs" ] || as_root rm -rf "$rootfs"
row setup "base images" ok "$RUNTIME_IMAGE, $MOSQUITTO_IMAGE${RUST_IMAGE:+, $RUST_IMAGE}, $(took)"

# ---------------------------------------------------------------------------------------
# The LPS image
# ---------------------------------------------------------------------------------------
# The binaries the image has: the Dockerfile's list.
mapfile -t binaries < <(sed -n 's/.*for bin in \([^;]*\);.*/\1/p' Dockerfile | tr ' ' '\n' | sed '/^$/d')
[ "${#binaries[@]}" -gt 0 ] || die "no 'for bin in ...;' list in the Dockerfile"
step "image ${LPS_IMAGE}"
begin
if $full_build; then
  export LPS_TARGET=runtime
  docker build --target runtime --build-arg RUST_IMAGE --build-arg RUNTIME_IMAGE -t "$LPS_IMAGE" . \
    || die "docker build failed"
  how="docker build (compiled in the image)"
else
  export LPS_TARGET=prebuilt
  echo "cargo build ${cargo_profile[*]} --locked --workspace --bins"
  cargo build "${cargo_profile[@]}" --locked --workspace --bins
  rm -rf target/lps-image
  mkdir -p target/lps-image
  for bin in "${binaries[@]}"; do
    # Without debug info: the build context is sent once per service by Compose v1.
    objcopy --strip-debug "target/$profile/$bin" "target/lps-image/$bin"
  done
  echo "staged ${binaries[*]} in target/lps-image ($(du -sh target/lps-image | cut -f1))"
  docker build -q --target prebuilt --build-arg RUNTIME_IMAGE -t "$LPS_IMAGE" . >/dev/null \
    || die "docker build --target prebuilt failed"
  how="target prebuilt ($profile binaries)"
fi
# The binaries must load in the image (a host newer than the runtime's glibc would not):
# ldd names every library or symbol version it cannot find.
# shellcheck disable=SC2016 # expanded by the container's shell
unloadable=$(timeout 60 docker run --rm --entrypoint sh "$LPS_IMAGE" -c \
  'for bin in "$@"; do ldd "/usr/local/bin/$bin" 2>&1 | sed -n "s|^|$bin: |; /not found/p"; command -v "$bin" >/dev/null || echo "$bin: not installed"; done' \
  sh "${binaries[@]}") || die "cannot run a shell in $LPS_IMAGE"
[ -z "$unloadable" ] || die "the binaries do not load in $LPS_IMAGE:
$unloadable"
row setup "LPS image" ok "$how, $(took)"
lps_bin=$repo/target/$profile/lps
if $full_build; then cargo build "${cargo_profile[@]}" --locked -p lps; fi

# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------
compose() { timeout 600 "${compose_cmd[@]}" "$@"; }
containers() { docker ps -aq --filter "label=$project_label"; }
# name state health restarts image, one line per container of the project.
container_states() {
  local ids
  ids=$(containers)
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086
  docker inspect -f '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.RestartCount}} {{.Config.Image}}' $ids | sort
}
container_of() { docker ps -aq --filter "label=$project_label" --filter "label=com.docker.compose.service=$1" | head -n 1; }
health_of() { docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}' "$1"; }
fail() {
  row "$topology" "$1" FAIL "$2"
  echo "FAILED: $1: $2" >&2
  container_states >&2 || true
  print_table
  exit 1
}
print_table() {
  printf '\n%-7s %-48s %-5s %s\n' topology check ok "seen"
  printf '%s\n' "${rows[@]}"
  printf 'total: %s s\n' "$(($(date +%s) - started_at))"
}

# Every container healthy within a deadline; prints how long it took.
wait_healthy() { # FILES-ARGS... (as for compose)
  local deadline=$(($(date +%s) + 180)) states bad
  while :; do
    states=$(container_states)
    bad=$(awk '$3 != "healthy"' <<<"$states")
    if [ -n "$states" ] && [ -z "$bad" ]; then return 0; fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$states" >&2; return 1; }
    sleep 1
  done
}

sysctls_applied() {
  local name id keys wants gots paths i count=0
  while read -r name _; do
    id=$(container_of "$name")
    mapfile -t keys < <(docker inspect -f '{{range $k, $v := .HostConfig.Sysctls}}{{$k}}{{println}}{{end}}' "$id" | sed '/^$/d')
    mapfile -t wants < <(docker inspect -f '{{range $k, $v := .HostConfig.Sysctls}}{{$v}}{{println}}{{end}}' "$id" | sed '/^$/d')
    [ "${#keys[@]}" -gt 0 ] || { echo "$name: no sysctls set" >&2; return 1; }
    # One exec per container: the values inside, in the same order.
    paths=()
    for i in "${!keys[@]}"; do paths+=("/proc/sys/${keys[$i]//.//}"); done
    mapfile -t gots < <(docker exec "$id" cat "${paths[@]}" | tr -s ' \t' ' ')
    for i in "${!keys[@]}"; do
      [ "${gots[$i]:-}" = "$(tr -s ' \t' ' ' <<<"${wants[$i]}")" ] \
        || { echo "$name: ${keys[$i]} is '${gots[$i]:-}' inside, compose sets '${wants[$i]}'" >&2; return 1; }
      count=$((count + 1))
    done
  done < <(container_states | awk -v img="$LPS_IMAGE" '$5 == img')
  [ "$count" -gt 0 ] || { echo "no LPS container has sysctls" >&2; return 1; }
  echo "$count"
}

# POST one alarm through each entry, then find each id in the simulator's ledger.
requests_arrive() { # LOGS
  local logs=$1 port id ids=() deadline status
  for port in 7081 7082 7083; do
    id=$(date +%s%N)$port
    status=$(curl -s -o "$work/answer" -w '%{http_code}' --max-time 20 -X POST \
      -H 'Content-Type: application/json' -H "Request-Id: $id" \
      -d '{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}' \
      "http://127.0.0.1:$port/api/v1/simple") || true
    [ "$status" = 200 ] || { echo "127.0.0.1:$port answered $status: $(cat "$work/answer" 2>/dev/null)" >&2; return 1; }
    ids+=("$id")
  done
  deadline=$(($(date +%s) + 30))
  for id in "${ids[@]}"; do
    until grep -q "\"uid\":\"$id\"" "$logs/ars_simulation.ledger.jsonl" 2>/dev/null; do
      [ "$(date +%s)" -lt "$deadline" ] || { echo "request $id not in $logs/ars_simulation.ledger.jsonl within 30 s" >&2; return 1; }
      sleep 0.5
    done
  done
}

logs_in_bind_mount() { # LOGS
  local logs=$1 name missing=() count=0
  while read -r name _; do
    if [ -s "$logs/$name.log" ]; then count=$((count + 1)); else missing+=("$name.log"); fi
  done < <(container_states | awk -v img="$LPS_IMAGE" '$5 == img')
  [ -s "$logs/ars_simulation.ledger.jsonl" ] || missing+=(ars_simulation.ledger.jsonl)
  [ -s "$logs/ars_simulation.log" ] || missing+=(ars_simulation.log)
  [ "${#missing[@]}" -eq 0 ] || { echo "missing or empty in $logs: ${missing[*]}" >&2; return 1; }
  echo "$count"
}

# Records the health states of container ID until it is running/healthy again (after at
# least one other state), within 90 s; prints them.
health_until_healthy() { # ID SERVICE
  local id=$1 service=$2 seen=() state last="" deadline
  deadline=$(($(date +%s) + 90))
  while :; do
    state=$(health_of "$id")
    if [ "$state" != "$last" ]; then seen+=("$state"); last=$state; fi
    if [ "${#seen[@]}" -gt 1 ] && [ "$state" = running/healthy ]; then break; fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$service: ${seen[*]} (not healthy again within 90 s)" >&2; return 1; }
    sleep 0.1
  done
  echo "${seen[*]}"
}

# A crash: SIGKILL to the service's process from outside Docker (as the kernel's OOM
# killer or a fatal signal would). `restart: unless-stopped` must bring it back, healthy.
crash_and_recover() { # SERVICE
  local service=$1 id before pid seen restarts
  id=$(container_of "$service")
  before=$(docker inspect -f '{{.RestartCount}}' "$id")
  pid=$(docker inspect -f '{{.State.Pid}}' "$id")
  [ "$pid" -gt 0 ] || { echo "$service: no process" >&2; return 1; }
  as_root kill -KILL "$pid"
  seen=$(health_until_healthy "$id" "$service") || return 1
  restarts=$(docker inspect -f '{{.RestartCount}}' "$id")
  [ "$restarts" -gt "$before" ] || { echo "$service: restart count $before -> $restarts" >&2; return 1; }
  echo "running/healthy -> ${seen// / -> }, restarts $before -> $restarts"
}

# `docker kill SERVICE`: Docker marks it exited and unhealthy, and, as for `docker stop`,
# does not restart it (unless-stopped honours a user's kill); `compose start` brings it
# back healthy.
docker_kill_and_start() { # FILE SERVICE
  local file=$1 service=$2 id state seen
  id=$(container_of "$service")
  docker kill "$id" >/dev/null
  state=$(health_of "$id")
  [ "$state" = exited/unhealthy ] || { echo "$service after docker kill: $state, want exited/unhealthy" >&2; return 1; }
  sleep 3 # Docker restarts a crashed container after 100 ms; a killed one must stay down
  state=$(health_of "$id")
  [ "$state" = exited/unhealthy ] || { echo "$service 3 s after docker kill: $state (restarted?)" >&2; return 1; }
  compose -f "$file" start "$service" >/dev/null 2>&1 || { echo "compose start $service failed" >&2; return 1; }
  seen=$(health_until_healthy "$id" "$service") || return 1
  echo "exited/unhealthy (stays 3 s) -> compose start -> ${seen// / -> }"
}

# The netem override: shaped (kernel with sch_netem) or every sidecar exited once, exit 0,
# with the message (kernel without it), and still so a while later (no restart loop).
netem_checked() { # BASE OVERRIDE
  local base=$1 override=$2 probe sidecars name id deadline said status code restarts
  # The probe: a throwaway container with a network namespace of its own (no network).
  if probe=$(docker run --rm --network none --cap-add NET_ADMIN --entrypoint tc \
    "$LPS_NETEM_IMAGE" qdisc add dev lo root netem delay 1ms 2>&1); then
    probe=available
  fi
  compose -f "$base" -f "$override" up -d --no-build >"$work/netem-up.log" 2>&1 \
    || { cat "$work/netem-up.log" >&2; return 1; }
  sidecars=$(container_states | awk '$1 ~ /^netem-/ {print $1}')
  [ -n "$sidecars" ] || { echo "no netem sidecar started" >&2; return 1; }
  deadline=$(($(date +%s) + 60))
  if [ "$probe" = available ]; then
    for name in $sidecars; do
      id=$(container_of "$name")
      until [[ "$(docker exec "$id" tc qdisc show dev eth0 2>/dev/null)" == *netem* ]]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "$name: no netem qdisc within 60 s" >&2; return 1; }
        sleep 1
      done
    done
    echo "shaped: $(wc -w <<<"$sidecars") sidecars"
  else
    for name in $sidecars; do
      id=$(container_of "$name")
      until [ "$(docker inspect -f '{{.State.Status}}' "$id")" = exited ]; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "$name: still $(docker inspect -f '{{.State.Status}}' "$id") after 60 s" >&2; return 1; }
        sleep 1
      done
    done
    sleep 5 # a restart loop would show by now (Docker restarts after 100 ms, then doubling)
    for name in $sidecars; do
      id=$(container_of "$name")
      read -r status code restarts < <(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$id")
      [ "$status $code $restarts" = "exited 0 0" ] \
        || { echo "$name: $status, exit $code, $restarts restarts (want exited 0 0)" >&2; return 1; }
      said=$(docker logs "$id" 2>&1)
      [[ "$said" == *"NETWORK EMULATION UNAVAILABLE"* ]] \
        || { echo "$name: no clear message in its log: $said" >&2; return 1; }
    done
    echo "no sch_netem ($probe): $(wc -w <<<"$sidecars") sidecars exited once, said why"
  fi
  # shellcheck disable=SC2086 # one word per sidecar
  compose -f "$base" -f "$override" rm -sf $sidecars >/dev/null 2>&1 || true
}

experiment_clean() { # TOPOLOGY FILE
  local topology=$1 file=$2 out summary
  out=$work/experiment-$topology
  timeout 900 "$lps_bin" experiment "$topology" --compose "$file" --clean \
    --faults chain --scale 0.2 --duration 45 --drain-timeout 60 --out "$out" \
    >"$work/experiment-$topology.log" 2>&1 \
    || { tail -n 30 "$work/experiment-$topology.log" >&2; return 1; }
  summary=$(jq -c --arg t "$topology" '.[$t] | {sent, acknowledged, delivered, lost, drain_s,
    stopped: [.faults[] | select(.action | ascii_downcase == "stop") | .service]}' "$out/summary.json")
  jq -e '.lost == 0 and .acknowledged > 0 and .delivered == .acknowledged and (.stopped | length) > 0' \
    <<<"$summary" >/dev/null || { echo "$summary" >&2; return 1; }
  jq -r '"\(.sent) sent, \(.acknowledged) acked, \(.lost) lost; stopped and started \(.stopped | join(" "));
    drained in \(.drain_s * 100 | round / 100) s"' <<<"$summary" | tr -s ' \n' ' ' | sed 's/ $//'
}

leaves_nothing() { # FILE
  local left
  compose -f "$1" down -v --remove-orphans >/dev/null 2>&1 || return 1
  left="$(containers)$(docker network ls -q --filter "label=$project_label")$(docker volume ls -q --filter "label=$project_label")"
  left+=$(docker volume ls -q | grep "^${project}_" || true)
  left+=$(docker network ls --format '{{.Name}}' | grep "^${project}_" || true)
  [ -z "$left" ] || { echo "left behind: $left" >&2; return 1; }
}

# The host ports FILE publishes must be free (this machine may run other things, e.g. an
# `lps up`): waits up to 60 s for them, then names what holds them.
ports_free() { # FILE
  local ports port busy deadline
  command -v ss >/dev/null 2>&1 || return 0
  ports=$(compose -f "$1" config | sed -n 's/^ *\(- \)\{0,1\}published: *"\{0,1\}\([0-9]*\)"\{0,1\}$/\2/p' | sort -un)
  [ -n "$ports" ] || { echo "no published ports found in $1" >&2; return 1; }
  deadline=$(($(date +%s) + 60))
  while :; do
    busy=()
    for port in $ports; do
      [ -z "$(ss -Htln "sport = :$port")" ] || busy+=("$port")
    done
    [ "${#busy[@]}" -gt 0 ] || return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "host ports of $1 in use for 60 s: ${busy[*]}:" >&2
      for port in "${busy[@]}"; do ss -Htlnp "sport = :$port" >&2; done
      return 1
    fi
    sleep 2
  done
}

run_topology() { # TOPOLOGY FILE NETEM-OVERRIDE KILL-SERVICE
  topology=$1
  local file=$2 netem=$3 victim=$4 logs=$work/logs-$1 out
  step "$topology: $file"
  mkdir -p "$logs"
  # The image's user (1000) writes the logs: the default LPS_UID/LPS_GID.
  chown 1000:1000 "$logs"
  export LPS_LOGS=$logs
  unset LPS_UID LPS_GID

  begin
  compose -f "$file" down -v --remove-orphans >/dev/null 2>&1 || true
  ports_free "$file" || fail "host ports free" "see above"
  compose -f "$file" up -d >"$work/up-$topology.log" 2>&1 \
    || { cat "$work/up-$topology.log" >&2; fail "up -d" "failed (output above)"; }
  wait_healthy || fail "every container healthy" "not within 180 s"
  row "$topology" "every container healthy" ok "$(container_states | wc -l) containers in $(took)"

  begin
  out=$(sysctls_applied) || fail "sysctls applied inside the containers" "see above"
  row "$topology" "sysctls applied inside the containers" ok "$out values, $(took)"

  begin
  requests_arrive "$logs" || fail "a request per entry arrives at the simulator" "see above"
  row "$topology" "a request per entry arrives at the simulator" ok "3 of 3 in the ledger, $(took)"

  begin
  out=$(logs_in_bind_mount "$logs") || fail "logs and ledger in the bind mount" "see above"
  row "$topology" "logs and ledger in the bind mount" ok "$out service logs + ledger, $(took)"

  begin
  out=$(crash_and_recover "$victim") || fail "crash of $victim: restarted, healthy" "see above"
  row "$topology" "SIGKILL $victim: unless-stopped restarts it" ok "$out, $(took)"

  begin
  out=$(docker_kill_and_start "$file" "$victim") || fail "docker kill $victim" "see above"
  row "$topology" "docker kill $victim: unhealthy, then healthy" ok "$out, $(took)"

  begin
  out=$(netem_checked "$file" "$netem") || fail "netem override" "see above"
  row "$topology" "netem override" ok "$out, $(took)"

  begin
  leaves_nothing "$file" || fail "down -v leaves nothing" "see above"
  row "$topology" "down -v leaves nothing" ok "$(took)"

  begin
  ports_free "$file" || fail "host ports free" "see above"
  out=$(experiment_clean "$topology" "$file") || fail "lps experiment --faults chain: 0 lost" "see above"
  row "$topology" "lps experiment --compose --faults chain" ok "$out, $(took)"

  begin
  leaves_nothing "$file" || fail "down -v after the experiment" "see above"
  row "$topology" "down -v after the experiment: nothing left" ok "$(took)"
}

# The netem sidecar image (only built when an override is used).
step "netem sidecar image"
begin
compose -f docker-compose-legacy.yml -f docker-compose-legacy-netem.yml build netem-ars-comp-1-1 \
  >"$work/netem-build.log" 2>&1 || { cat "$work/netem-build.log" >&2; die "building the netem image failed"; }
row setup "netem sidecar image" ok "$(took)"

topology=setup
if [ -z "$only" ] || [ "$only" = legacy ]; then
  run_topology legacy docker-compose-legacy.yml docker-compose-legacy-netem.yml ars-comp-2-1
fi
if [ -z "$only" ] || [ "$only" = ng ]; then
  run_topology ng docker-compose-ng.yml docker-compose-netem.yml proxy2-1
fi

print_table
