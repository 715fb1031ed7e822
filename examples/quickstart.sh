#!/usr/bin/env bash
# Quickstart: a whole local mesh on the embedded store.
#
#   remora-control (4200)          the control plane, data in a temp dir
#   web    app :19080 + sidecar    outbound 4140, inbound 4143, admin 4191
#   api-v1 app :19081 + sidecar    inbound 4243, admin 4291
#   api-v2 app :19082 + sidecar    inbound 4343, admin 4391
#
# The config is pushed with remoractl; every sidecar receives it over its
# Discovery stream, and the api instances register their own endpoints.
# The control plane is also the mesh's CA: each sidecar gets a workload
# certificate (with a bootstrap token for its identity only, over the
# control plane's TLS), so traffic goes web's sidecar
# -mTLS-> api-vN's sidecar -> api-vN app, and plaintext to an api sidecar
# is refused. Then the api route's weights change (100/0 -> 50/50 -> 0/100)
# and the shift shows.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
CP=127.0.0.1:4200

echo "== building (debug)"
cargo build -q -p remora-proxy -p remora-control -p remora-tests --bins
BIN=target/debug
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for port in 4200 4140 4143 4191 4243 4291 4343 4391 19080 19081 19082; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop what listens there first"; exit 1
  fi
done

export RUST_LOG=${RUST_LOG:-warn}
get() { curl -fsS --max-time 5 "$@"; }
wait_ready() {
  local deadline=$((SECONDS + 20))
  until get "http://$1/ready" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { echo "$2 did not become ready"; exit 1; }
    sleep 0.1
  done
}
ctl() { "$BIN/remoractl" --server "https://$CP" --ca-file "$work/data/ca/root.pem" "$@"; }

echo "== bootstrap tokens: one per identity (the control plane keeps their hashes)"
mkdir -p "$work/secrets" && chmod 700 "$work/secrets"
for sa in web api-v1 api-v2; do
  "$BIN/remoractl" token "default/$sa" --tokens-file "$work/secrets/tokens" \
    > "$work/secrets/$sa.token" 2>/dev/null
done
echo "   $(grep -c sha256 "$work/secrets/tokens") tokens; each gets a certificate for its own identity only"

echo "== control plane (and CA), over TLS"
"$BIN/remora-control" --listen "$CP" --data-dir "$work/data" --tls \
  --bootstrap-tokens "$work/secrets/tokens" & pids+=($!)
deadline=$((SECONDS + 20))
until ctl status >/dev/null 2>&1; do
  (( SECONDS < deadline )) || { echo "control plane did not start"; exit 1; }
  sleep 0.1
done

echo "== config: remoractl apply -f examples/mesh.yaml"
ctl apply -f examples/mesh.yaml --author quickstart

echo "== apps and sidecars"
"$BIN/remora-demo" --addr 127.0.0.1:19080 --name web & pids+=($!)
"$BIN/remora-demo" --addr 127.0.0.1:19081 --name api-v1 & pids+=($!)
"$BIN/remora-demo" --addr 127.0.0.1:19082 --name api-v2 & pids+=($!)
sidecar() { # name service inbound app admin outbound
  "$BIN/remora-proxy" --control-plane "https://$CP" --control-plane-ca "$work/data/ca/root.pem" \
    --node-id "$1" --service "$2" \
    --inbound-addr "$3" --app-addr "$4" --admin-addr "$5" --outbound-addr "$6" \
    --state-dir "$work/state/$1" --bootstrap-token-file "$work/secrets/$2.token" & pids+=($!)
}
sidecar web-1    web    127.0.0.1:4143 127.0.0.1:19080 127.0.0.1:4191 127.0.0.1:4140
sidecar api-v1-1 api-v1 127.0.0.1:4243 127.0.0.1:19081 127.0.0.1:4291 off
sidecar api-v2-1 api-v2 127.0.0.1:4343 127.0.0.1:19082 127.0.0.1:4391 off
wait_ready 127.0.0.1:4191 web-1
wait_ready 127.0.0.1:4291 api-v1-1
wait_ready 127.0.0.1:4391 api-v2-1
# Wait until web's sidecar knows both api instances.
deadline=$((SECONDS + 20))
until [ "$(get http://127.0.0.1:4191/config | grep -c '"address"')" -ge 2 ]; do
  (( SECONDS < deadline )) || { echo "instances did not register"; exit 1; }
  sleep 0.1
done
# And until the sidecars hold certificates: web -> api answers over mTLS.
deadline=$((SECONDS + 20))
until get -H 'Host: api' http://127.0.0.1:4140/ >/dev/null 2>&1; do
  (( SECONDS < deadline )) || { echo "no answer from api through the mesh"; exit 1; }
  sleep 0.1
done
ctl status

count() {
  local v1=0 v2=0 other=0
  for _ in $(seq "$N"); do
    case "$(get -H 'Host: api' http://127.0.0.1:4140/ 2>/dev/null || true)" in
      *api-v1*) v1=$((v1 + 1)) ;;
      *api-v2*) v2=$((v2 + 1)) ;;
      *) other=$((other + 1)) ;;
    esac
  done
  echo "   api-v1: $v1   api-v2: $v2   failed: $other   (of $N, through web's sidecar)"
}
shift_to() { # v1-weight v2-weight
  sed -e "s/name: api-v1, weight: 100/name: api-v1, weight: $1/" \
      -e "s/name: api-v2, weight: 0/name: api-v2, weight: $2/" examples/mesh.yaml > "$work/mesh.yaml"
  local out want
  out=$(ctl apply -f "$work/mesh.yaml" --author quickstart)
  echo "$out"
  want=$(echo "$out" | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -1)
  # Wait until web's sidecar runs that config version ("<version>.<endpoints>").
  local deadline=$((SECONDS + 10))
  until get http://127.0.0.1:4191/config | grep -q "\"version\": \"$want\."; do
    (( SECONDS < deadline )) || break
    sleep 0.1
  done
}

echo "== one request: app -> web's sidecar -> api's sidecar -> api app"
curl -sS -i -H 'Host: api' http://127.0.0.1:4140/ | sed 's/^/   /'
echo "== mTLS: handshakes accepted by api-v1's sidecar, and its identity"
get http://127.0.0.1:4291/metrics | grep -E '^remora_(tls_handshakes_total|identity_cert_expiry_seconds)' | sed 's/^/   /'
echo "== plaintext straight to api-v1's sidecar (Strict mTLS): refused"
if get -H 'Host: api-v1' http://127.0.0.1:4243/ >/dev/null 2>&1; then
  echo "   answered: mTLS is not enforced!"; exit 1
else
  echo "   refused, as it should be"
fi
echo "== weights 100/0"
count
echo "== shift: weights 50/50"
shift_to 50 50
count
echo "== shift: weights 0/100"
shift_to 0 100
count
echo "== history"
ctl history
echo "== done"
