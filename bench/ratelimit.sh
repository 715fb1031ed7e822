#!/usr/bin/env bash
# Rate-limit overhead: remora-proxy with a RateLimitPolicy configured but
# not limiting (a per-source-address limit far above the load, response
# headers on) against the same proxy with no policy. Alternating rounds in
# one run; prints the medians and their ratio. Then the limiter's decision
# cost with criterion (1,000,000 keys live).
#
#   bash bench/ratelimit.sh            # ROUNDS=5 DURATION=5 by default
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
BASE=${PORT_BASE:-18180}
UP=$BASE; PLAIN=$((BASE + 1)); LIMITED=$((BASE + 2))
td=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p remora-proxy
BIN=$td/release/remora-proxy
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
for port in $UP $PLAIN $LIMITED $((PLAIN + 10)) $((LIMITED + 10)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "port $port is in use"; exit 1; fi
done
cat > "$work/nginx.conf" <<NGX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$UP; keepalive_requests 1000000; location / { return 200 "ok\n"; } } }
NGX
taskset -c 0 nginx -c "$work/nginx.conf" -p "$work"
cat > "$work/mesh.yaml" <<YAML
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
  endpoints: [{address: 127.0.0.1, port: $UP}]
---
kind: RateLimitPolicy
metadata: {name: api}
spec:
  targetRef: {name: api}
  limits:
  - {name: per-client, requests: 100000000, key: [{type: SourceAddress}]}
YAML
start() { # port admin-port [extra args]
  local port=$1 admin=$2; shift 2
  RUST_LOG=warn taskset -c 1 "$BIN" --inbound-addr "127.0.0.1:$port" --app-addr "127.0.0.1:$UP" \
    --outbound-addr off --admin-addr "127.0.0.1:$admin" "$@" & pids+=($!)
  local deadline=$((SECONDS + 10))
  until curl -fs "http://127.0.0.1:$admin/ready" >/dev/null; do (( SECONDS < deadline )) || exit 1; sleep 0.05; done
}
start "$PLAIN" $((PLAIN + 10))
start "$LIMITED" $((LIMITED + 10)) --config "$work/mesh.yaml" --service api
run() { taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
plain=(); limited=()
for i in $(seq "$ROUNDS"); do
  plain+=("$(run "$PLAIN")"); limited+=("$(run "$LIMITED")")
  echo "round $i: no policy ${plain[-1]} req/s, policy ${limited[-1]} req/s"
done
# The limited proxy really checked every request:
allowed=$(curl -fs "http://127.0.0.1:$((LIMITED + 10))/metrics" | awk '/^remora_ratelimit_decisions_total.*result="allowed"/ {print $2}')
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mp=$(median "${plain[@]}"); ml=$(median "${limited[@]}")
echo "median: no policy $mp req/s, policy configured (not limiting) $ml req/s, ratio $(awk "BEGIN {printf \"%.3f\", $ml/$mp}") ($allowed decisions counted)"
echo "== decision cost (criterion)"
cargo bench -q -p remora-proxy --bench ratelimit 2>&1 | grep -E "live keys|time:|^keyed"
