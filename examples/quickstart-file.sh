#!/usr/bin/env bash
# Quickstart: two demo upstreams (web-v1, web-v2) behind remora-proxy on
# examples/mesh-file.yaml. Sends traffic through the proxy, shows the 80/20 split,
# shifts all traffic to v2 by editing the config (hot swap, no restart), and
# prints a few metrics. Ports: 4140 outbound, 4191 admin, 19081/19082 demo.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${REMORA_OUTBOUND:-127.0.0.1:4140}
ADMIN=${REMORA_ADMIN:-127.0.0.1:4191}
N=${N:-200}

echo "== building (debug)"
cargo build -q -p remora-proxy -p remora-tests --bins
BIN=target/debug
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for addr in "$OUT" "$ADMIN" 127.0.0.1:19081 127.0.0.1:19082; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null; then
    echo "port ${addr##*:} is already in use; stop what listens there (or set REMORA_OUTBOUND/REMORA_ADMIN)"; exit 1
  fi
done
cp examples/mesh-file.yaml "$work/mesh.yaml"
"$BIN/remora-demo" --addr 127.0.0.1:19081 --name web-v1 & pids+=($!)
"$BIN/remora-demo" --addr 127.0.0.1:19082 --name web-v2 & pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$BIN/remora-proxy" --config "$work/mesh.yaml" \
  --outbound-addr "$OUT" --inbound-addr off --admin-addr "$ADMIN" \
  --config-poll-interval 100ms & pids+=($!)

get() { curl -fsS --max-time 5 "$@"; }
deadline=$((SECONDS + 20))
until get "http://$ADMIN/ready" >/dev/null 2>&1; do
  (( SECONDS < deadline )) || { echo "proxy did not become ready"; exit 1; }
  sleep 0.1
done
echo "== proxy ready, config version $(get "http://$ADMIN/config" | sed -n 's/.*"version": "\(.*\)".*/\1/p')"

count() {
  local v1=0 v2=0 other=0
  for _ in $(seq "$N"); do
    case "$(get -H 'Host: web' "http://$OUT/")" in
      *web-v1*) v1=$((v1 + 1)) ;;
      *web-v2*) v2=$((v2 + 1)) ;;
      *) other=$((other + 1)) ;;
    esac
  done
  echo "   web-v1: $v1   web-v2: $v2   failed: $other   (of $N)"
}

echo "== one request through the proxy (Host: web):"
curl -sS -i -H 'Host: web' "http://$OUT/" | sed 's/^/   /'
echo "== $N requests, route 'split' weights 80/20:"
count
echo "== header match: x-canary: true goes to v2:"
echo "   $(get -H 'Host: web' -H 'x-canary: true' "http://$OUT/")"

echo "== shifting traffic: weights 0/100 (editing the config file; the proxy hot-swaps it)"
old=$(get "http://$ADMIN/config" | sed -n 's/.*"version": "\(.*\)".*/\1/p')
sed -e 's/weight: 80}/weight: 0}/' -e 's/weight: 20}/weight: 100}/' examples/mesh-file.yaml > "$work/mesh.yaml.tmp"
mv "$work/mesh.yaml.tmp" "$work/mesh.yaml"
deadline=$((SECONDS + 10))
until [ "$(get "http://$ADMIN/config" | sed -n 's/.*"version": "\(.*\)".*/\1/p')" != "$old" ]; do
  (( SECONDS < deadline )) || { echo "config was not applied"; exit 1; }
  sleep 0.1
done
count

echo "== metrics (http://$ADMIN/metrics):"
get "http://$ADMIN/metrics" | grep -E '^remora_(requests_total|config_reloads_total)' | grep -v ' 0$' | sed 's/^/   /'
echo "== done"
