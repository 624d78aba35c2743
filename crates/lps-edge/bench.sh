#!/usr/bin/env bash
# The edge's benchmark, on this machine, loopback only:
#
#   1. seed 002's forward-proxy matrix: wrk, 100 connections, small (612 B), 1 KB, 16 KB,
#      128 KB, 1 MB, against nginx directly and through the edge (absolute-form requests);
#   2. CONNECT to TLS: a fresh CONNECT + full TLS handshake + GET per request, against
#      nginx's TLS port directly and through the edge;
#   3. MQTT over WebSocket: N clients at 100 msg/s each through the edge into Mosquitto,
#      against the same clients over TCP straight to Mosquitto.
#
#   apt-get install nginx-light wrk mosquitto openssl
#   crates/lps-edge/bench.sh                       # DURATION=5 CONC=100 WS_CLIENTS="10 100"
#
# nginx gets one worker, the edge the default Tokio runtime (one thread per core); wrk
# runs two threads. Everything shares the machine's cores, so compare the two columns
# of one run, not runs on different machines.
set -euo pipefail

DURATION=${DURATION:-5}
CONC=${CONC:-100}
WS_CLIENTS=${WS_CLIENTS:-"10 100"}
WS_RATE=${WS_RATE:-100}
BASE=${BASE_PORT:-18000}
NGINX_PORT=$((BASE + 80))
NGINX_TLS=$((BASE + 443))
EDGE_WS=$((BASE + 1))
EDGE_PROXY=$((BASE + 128))
BROKER=$((BASE + 883))

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cd "$root"
cargo build --release -q -p lps-edge --bin lps-edge --example edge_bench
edge=$root/target/release/lps-edge
bench=$root/target/release/examples/edge_bench

# Payloads: nginx's default page size for "small", then the seed's binaries.
mkdir -p "$work/www"
head -c 612 /dev/zero | tr '\0' 'x' > "$work/www/index.html"
for size in 1 16 128 1024; do
    head -c $((size * 1024)) /dev/urandom > "$work/www/payload_${size}k.bin"
done
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat > "$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path $work;
    proxy_temp_path $work;
    fastcgi_temp_path $work;
    uwsgi_temp_path $work;
    scgi_temp_path $work;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        listen 127.0.0.1:$NGINX_TLS ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        root $work/www;
    }
}
EOF
nginx -c "$work/nginx.conf" -e "$work/error.log" &
pids+=($!)
mosquitto -p "$BROKER" >/dev/null 2>&1 &
pids+=($!)
HTTP_HOST=127.0.0.1 HTTP_PORT=$EDGE_WS PROXY_PORT=$EDGE_PROXY MQTT_HOST=127.0.0.1 \
    MQTT_PORT=$BROKER PROXY_ALLOWED_PORTS=$NGINX_PORT,$NGINX_TLS LOG=warn LOG_DIR=$work \
    "$edge" >/dev/null &
pids+=($!)
for port in $NGINX_PORT $BROKER $EDGE_PROXY; do
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
done

echo "== forward proxy: wrk -t2 -c$CONC -d${DURATION}s"
printf '%-22s %14s %14s\n' payload "nginx direct" "through edge"
for file in index.html payload_1k.bin payload_16k.bin payload_128k.bin payload_1024k.bin; do
    url="http://127.0.0.1:$NGINX_PORT/$file"
    direct=$(wrk -t2 -c"$CONC" -d"${DURATION}s" --latency "$url" | awk '/Requests\/sec/ {print $2}')
    cat > "$work/proxy.lua" <<EOF
request = function() return wrk.format("GET", "$url") end
EOF
    proxied=$(wrk -t2 -c"$CONC" -d"${DURATION}s" --latency -s "$work/proxy.lua" \
        "http://127.0.0.1:$EDGE_PROXY" | awk '/Requests\/sec/ {print $2}')
    printf '%-22s %14s %14s\n' "$file" "$direct" "$proxied"
done

echo "== CONNECT to TLS: a fresh tunnel and full handshake per request, $CONC connections"
for file in index.html payload_1k.bin payload_1024k.bin; do
    "$bench" connect-tls - "127.0.0.1:$NGINX_TLS" "/$file" "$DURATION" "$CONC"
    "$bench" connect-tls "127.0.0.1:$EDGE_PROXY" "127.0.0.1:$NGINX_TLS" "/$file" "$DURATION" "$CONC"
done

echo "== MQTT: clients at $WS_RATE msg/s each, QoS 0"
for clients in $WS_CLIENTS; do
    "$bench" ws "mqtt://127.0.0.1:$BROKER" "$BROKER" "$clients" "$WS_RATE" "$DURATION"
    "$bench" ws "ws://127.0.0.1:$EDGE_WS/mqtt" "$BROKER" "$clients" "$WS_RATE" "$DURATION"
done
