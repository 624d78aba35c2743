#!/usr/bin/env bash
# Measures what Mosquitto's persistence settings cost: N QoS 2 messages from one
# publisher to one subscriber through a broker on 127.0.0.1:21999, without persistence,
# with a snapshot every second (our setting), and with a save after every change.
# Needs mosquitto, mosquitto-clients and bc (apt-get install mosquitto mosquitto-clients bc).
# Usage: N=50000 mosquitto/persistence-bench.sh
set -u
N=${N:-20000}
PORT=${PORT:-21999}

run() {
  local name=$1
  shift
  local dir
  dir=$(mktemp -d)
  {
    echo "listener $PORT 127.0.0.1"
    echo "allow_anonymous true"
    echo "persistence_location $dir/"
    echo "log_dest none"
    echo "max_queued_messages 1000000"
    echo "max_inflight_messages 128"
    echo "set_tcp_nodelay true"
    if [ "$(id -u)" -eq 0 ]; then echo "user root"; fi
    for line in "$@"; do echo "$line"; done
  } > "$dir/mosquitto.conf"
  mosquitto -c "$dir/mosquitto.conf" 2> /dev/null &
  local broker=$!
  sleep 0.5
  mosquitto_sub -p "$PORT" -q 2 -t bench/t -C "$N" > /dev/null &
  local sub=$!
  sleep 0.3
  local start end
  start=$(date +%s.%N)
  seq "$N" | mosquitto_pub -p "$PORT" -q 2 -t bench/t -l
  wait "$sub"
  end=$(date +%s.%N)
  kill "$broker"
  wait "$broker" 2> /dev/null
  printf '%-34s %6d msg/s (%s messages in %.2f s)\n' "$name:" \
    "$(echo "$N / ($end - $start)" | bc)" "$N" "$(echo "$end - $start" | bc)"
  rm -rf "$dir"
}

run "no persistence" "persistence false"
run "autosave_interval 1 (ours)" "persistence true" "autosave_interval 1"
run "save on every change" "persistence true" "autosave_on_changes true" "autosave_interval 1"
