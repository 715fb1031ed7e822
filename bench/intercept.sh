#!/usr/bin/env bash
# Two pods, mTLS between their sidecars: what transparent interception costs
# over the explicit outbound listener, for HTTP and for opaque TCP. See
# BENCHMARKS.md, "Transparent interception (two pods, mTLS)".
#
#   sudo bash bench/intercept.sh                   # builds into ../target-bench, ~8 min
#   BIN_DIR=/path/to/release REPEAT=5 bash bench/intercept.sh
#
# Needs root (network namespaces, iptables in them, setpriv), ip, iptables,
# setpriv, curl, taskset, chrt, python3, and oha (bash bench/install.sh, or
# cargo install oha --locked).
#
# The topology is tests/tests/intercept.rs's, in shell (tests/src/netns.rs):
#
#   root namespace: remora-control on 10.204.K.1 (the mesh's CA)
#     rmrb<K> 10.204.K.1/24 ──veth── bridge namespace (br0) ─┬─ pod A 10.204.K.10: client, web sidecar
#                                                             └─ pod B 10.204.K.11: apps, api sidecar
#
# Pod B runs remora-testapp `http` on :8080 and `tcp-echo` on :9000 and
# :9001. The Service api has the virtual IP 10.96.0.20 (no interface has
# it) and the ports 80 (-> 8080, undeclared: protocol detected), 9000
# (declared `protocol: tcp`) and 9001 (undeclared). Each sidecar runs as uid
# 2102 on 4143 (inbound), 127.0.0.1:4140 (outbound) and 4191 (admin), with a
# certificate from remora-control (a bootstrap token per identity, made with
# `remoractl token`), and registers <pod IP>:4143. The control-plane channel
# is plaintext (--insecure-dev-plaintext on both sides: a local benchmark;
# it carries config and certificates, not the measured traffic). The same two
# sidecars (and the same mTLS connection between them) serve the whole run;
# only the pods' iptables rules change between variants (`remora-proxy init`
# in both pods for the intercepted ones, `init --uninstall` otherwise).
#
# Variants, each a fixed-rate load from pod A, in one run:
#
#   http-direct       oha -> B:8080, no proxy (the baseline for "added")
#   http-explicit     oha -> 127.0.0.1:4140 with Host: api -> web sidecar -mTLS->
#                     api sidecar -> app; no iptables rules
#   http-intercepted  oha -> 10.96.0.20:80 (Host: 10.96.0.20), redirected to the
#                     web sidecar, which finds api's port 80 by the original
#                     destination and detects HTTP/1; then as explicit
#   tcp-direct        remora-tcp-load -> B:9000, no proxy
#   tcp-intercepted   remora-tcp-load -> 10.96.0.20:9000 (declared tcp): opaque
#                     bytes over mTLS with the transport header
#   tcp-detect        remora-tcp-load -> 10.96.0.20:9001 (undeclared): as
#                     tcp-intercepted, after detection reads the first bytes
#
# There is no explicit variant for TCP: the outbound listener, addressed
# directly, speaks only HTTP (opaque TCP reaches the mesh only by
# interception).
#
# Then a concurrent A/B phase (AB_REPEAT rounds, 0 to skip), because on a
# shared machine the cost per request moves with whatever else runs on the
# sidecars' core by more than the difference being measured: a second pair of
# pods, C (web2's sidecar) -> D (api2's sidecar and app; Service api2,
# virtual IP 10.96.0.21), runs at the same time as A -> B. In each round one
# pair is intercepted (oha to its virtual IP) and the other explicit (oha to
# its 127.0.0.1:4140 with Host: api / api2), both at RATE for DURATION s,
# simultaneously, so both see the same interference; the roles swap every
# round, so a difference between the pairs themselves cancels out. Reported:
# per round and as medians, intercepted / explicit CPU per request and the
# p50 / p99 differences.
#
# Load: RATE req/s for DURATION s after WARMUP s, over RATE_CONNS kept-alive
# connections, latency from each request's scheduled send time (coordinated
# omission corrected): oha --latency-correction for HTTP (a separate warm-up
# run first), tests/src/bin/remora-tcp-load.rs for TCP (SIZE-byte request,
# the same bytes echoed back; connections opened before the warm-up).
# Reported per variant: p50/p90/p99/p99.9; "added" = variant - direct of the
# same protocol in the same repeat; CPU microseconds per request of both
# sidecars together (utime + stime from /proc/<pid>/stat over the measured
# phase, divided by the successful requests); and the ratios intercepted /
# explicit (HTTP) and detect / intercepted (TCP), per repeat, then medians.
# The script checks each variant took the path it claims, from the sidecars'
# metrics (connections accepted, protocol detections, opaque bytes).
#
# Environment (all optional):
#   REPEAT=5           repeats of the sweep; the variant order rotates each repeat
#   AB_REPEAT=6        rounds of the concurrent A/B phase (0: none)
#   VARIANTS="http-direct http-explicit http-intercepted tcp-direct tcp-intercepted tcp-detect"
#   RATE=1000          requests/s
#   RATE_CONNS=16      client connections (oha -c, remora-tcp-load --conns)
#   DURATION=10        seconds measured per variant
#   WARMUP=2           seconds of the same load before, not measured
#   SIZE=64            bytes per TCP request (and echo)
#   WORKERS=1          --workers of each sidecar
#   CONTROL_PORT=18450 remora-control's port (on the bridge address)
#   LOADGEN_CPU=0      core for the load generator, the apps and remora-control
#   PROXY_CPU=1        core for both sidecars
#   NICE=-20, SCHED=fifo   as bench/mtls.sh: during the runs the sidecars, the
#                      apps and the load generator run SCHED_FIFO 1
#   CARGO_TARGET_DIR   where release binaries are built (default <repo>/../target-bench)
#   BIN_DIR=path       use remora-control, remoractl, remora-proxy, remora-testapp
#                      and remora-tcp-load already built there (no cargo build)
#   OHA_BIN            oha's path
#   OUT_DIR=path       results (default bench/out/intercept-<timestamp>): meta.txt,
#                      raw/r<N>-<variant>.{oha.json,tcp.json,proc.json}, logs/,
#                      results.txt, results.json
#   READY_TIMEOUT=30   seconds to wait for a process or the mesh to answer
#   PERF_STAT=1        also count the sweep's sidecars' task-clock and context
#                      switches with `perf stat -p` (software events) over the
#                      measured oha run (HTTP) or the whole remora-tcp-load run,
#                      warm-up included (TCP); shown per request in the report.
#                      On this VM task-clock reads ~15 % below the scheduler's
#                      runtime (/proc), so compare perf figures only with each
#                      other. Attaching perf adds some cost of its own. Needs
#                      perf (linux-perf).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

REPEAT=${REPEAT:-5}
AB_REPEAT=${AB_REPEAT:-6}
VARIANTS=${VARIANTS:-"http-direct http-explicit http-intercepted tcp-direct tcp-intercepted tcp-detect"}
RATE=${RATE:-1000}
RATE_CONNS=${RATE_CONNS:-16}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SIZE=${SIZE:-64}
WORKERS=${WORKERS:-1}
CONTROL_PORT=${CONTROL_PORT:-18450}
LOADGEN_CPU=${LOADGEN_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
READY_TIMEOUT=${READY_TIMEOUT:-30}
NICE=${NICE:--20}
SCHED=${SCHED:-fifo}
PERF_STAT=${PERF_STAT:-0}

API_VIP=10.96.0.20
WEB_VIP=10.96.0.10
API2_VIP=10.96.0.21
WEB2_VIP=10.96.0.11
PROXY_UID=2102
INBOUND_PORT=4143
OUTBOUND_PORT=4140
ADMIN_PORT=4191

log() { printf '[intercept-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "needs root: it makes network namespaces, installs iptables rules in them and runs the sidecars as uid $PROXY_UID (sudo bash bench/intercept.sh)"
for v in REPEAT AB_REPEAT RATE RATE_CONNS DURATION WARMUP SIZE WORKERS CONTROL_PORT LOADGEN_CPU PROXY_CPU READY_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be an integer (got '$NICE')"
((REPEAT >= 1 && DURATION >= 1 && RATE >= 1 && RATE_CONNS >= 1 && WORKERS >= 1 && SIZE >= 8)) ||
    die "REPEAT, DURATION, RATE, RATE_CONNS and WORKERS must be >= 1, SIZE >= 8"
for v in $VARIANTS; do
    case $v in http-direct | http-explicit | http-intercepted | tcp-direct | tcp-intercepted | tcp-detect) ;;
    *) die "unknown variant '$v' (http-direct http-explicit http-intercepted tcp-direct tcp-intercepted tcp-detect)" ;;
    esac
done
PRIO=()
if ((NICE != 0)); then PRIO=(nice -n "$NICE"); fi
RATE_PRIO=("${PRIO[@]}")
case $SCHED in
fifo) RATE_PRIO=(chrt -f 1) ;;
other) ;;
*) die "SCHED must be 'fifo' or 'other' (got '$SCHED')" ;;
esac
NCPU=$(nproc)
((LOADGEN_CPU < NCPU && PROXY_CPU < NCPU)) || die "LOADGEN_CPU and PROXY_CPU must be below $NCPU"
((LOADGEN_CPU != PROXY_CPU)) || log "WARNING: LOADGEN_CPU == PROXY_CPU; sidecars and load generator share a core"
for tool in ip iptables iptables-restore setpriv ss curl taskset chrt python3 awk getconf; do
    command -v "$tool" >/dev/null || die "$tool is required"
done
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
find_tool OHA_BIN oha "$HOME/.cargo/bin/oha"
CLK_TCK=$(getconf CLK_TCK)
if [[ $PERF_STAT == 1 ]]; then command -v perf >/dev/null || die "PERF_STAT=1 needs perf (apt-get install linux-perf)"; fi
[[ -z $(ss -Htln "sport = :$CONTROL_PORT") ]] || die "port $CONTROL_PORT is in use (CONTROL_PORT=...)"

# ------------------------------------------------------------ cleanup
# Processes are stopped by pid, newest first (sidecars before the control
# plane they stream from), then the namespaces and the root veth go.

PIDS=()
LAST_PID=
NAMESPACES=()
HOST_IF=
TMP=$(mktemp -d "${TMPDIR:-/tmp}/remora-intercept-bench.XXXXXX")
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
        log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null || echo '?')) still running 5 s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    [[ -z $HOST_IF ]] || ip link del "$HOST_IF" 2>/dev/null || true
    for ((i = ${#NAMESPACES[@]} - 1; i >= 0; i--)); do ip netns del "${NAMESPACES[i]}" 2>/dev/null || true; done
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------ build

if [[ -n ${BIN_DIR:-} ]]; then
    BIN=$BIN_DIR
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd "$REPO/.." && pwd)/target-bench}
    log "building release binaries into $CARGO_TARGET_DIR"
    (cd "$REPO" && cargo build --release --quiet -p remora-proxy -p remora-control -p remora-tests \
        --bin remora-proxy --bin remora-control --bin remoractl --bin remora-testapp --bin remora-tcp-load)
    BIN=$CARGO_TARGET_DIR/release
fi
for b in remora-control remoractl remora-proxy remora-testapp remora-tcp-load; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found"
done
setpriv --reuid=$PROXY_UID --regid=$PROXY_UID --clear-groups "$BIN/remora-proxy" --version >/dev/null 2>&1 ||
    die "uid $PROXY_UID cannot run $BIN/remora-proxy (a directory on its path is not world-executable?)"

OUT_DIR=${OUT_DIR:-$REPO/bench/out/intercept-$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT_DIR/raw" "$OUT_DIR/logs"
{
    echo "date: $(date -Is)"
    echo "git (the working tree; with BIN_DIR the binaries may differ): $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (dirty tree)')"
    echo "host: $(uname -srm); $NCPU cores; $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "bin: $BIN"
    echo "remora-proxy: $("$BIN/remora-proxy" --version 2>/dev/null || echo ?)"
    echo "oha: $OHA_BIN $("$OHA_BIN" --version 2>/dev/null)"
    echo "iptables: $(iptables --version)"
    echo "variants: $VARIANTS REPEAT=$REPEAT AB_REPEAT=$AB_REPEAT RATE=$RATE RATE_CONNS=$RATE_CONNS DURATION=$DURATION WARMUP=$WARMUP SIZE=$SIZE WORKERS=$WORKERS"
    echo "cores: sidecars $PROXY_CPU; load generator, apps, remora-control $LOADGEN_CPU; nice $NICE; sched $SCHED"
    echo "clk_tck: $CLK_TCK"
    [[ $PERF_STAT != 1 ]] || echo "perf: $(perf --version)"
} >"$OUT_DIR/meta.txt"
log "results go to $OUT_DIR"

# ------------------------------------------------------------ helpers

# Starts a process in the background (every wrapper execs, so $! is the
# process itself), logs to $OUT_DIR/logs/$1.log, pid in LAST_PID.
spawn() {
    local name=$1
    shift
    env -u REMORA_CONFIG -u REMORA_CONTROL_PLANE -u REMORA_NODE_ID -u REMORA_SERVICE \
        -u REMORA_BOOTSTRAP_TOKEN_FILE -u REMORA_ACCESS_LOG -u POD_IP NO_COLOR=1 "$@" \
        >>"$OUT_DIR/logs/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

alive() { kill -0 "$1" 2>/dev/null; }

until_ok() { # until_ok what pid command...: retries the command until it succeeds
    local what=$1 pid=$2 end=$((SECONDS + READY_TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        [[ -z $pid ]] || alive "$pid" || die "$what: the process exited (see $OUT_DIR/logs)"
        ((SECONDS < end)) || die "$what: not within ${READY_TIMEOUT}s (tried: $*)"
        sleep 0.05
    done
}

cpu_ticks() { # utime + stime (clock ticks) of one pid, all its threads
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

core_busy() { # busy jiffies of core $1 (everything but idle and iowait)
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

metric() { # metric admin-addr name label...: sum of the matching samples
    local addr=$1 name=$2
    shift 2
    curl -s --max-time 2 "http://$addr/metrics" | awk -v name="$name" -v labels="$*" '
        BEGIN { n = split(labels, want, " ") }
        $1 == name || index($1, name "{") == 1 {
            for (i = 1; i <= n; i++) if (index($1, want[i]) == 0) next
            s += $NF
        }
        END { printf "%d\n", s }'
}

set_fifo() { # set_fifo on|off pid...: SCHED_FIFO 1 / back to SCHED_OTHER, all threads
    local mode=$1 p
    shift
    [[ $SCHED == fifo ]] || return 0
    for p in "$@"; do
        if [[ $mode == on ]]; then chrt -a -f -p 1 "$p" >/dev/null; else chrt -a -o -p 0 "$p" >/dev/null; fi
    done
}

in_pod() { # in_pod ns command...: run in the pod's network namespace
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# ------------------------------------------------------------ the network
# As tests/src/netns.rs: a bridge in its own namespace, a veth from the root
# namespace into it (its name claims the /24), a veth per pod.

NS_BR=rmrb-$$-br
NS_A=rmrb-$$-a
NS_B=rmrb-$$-b
NS_C=rmrb-$$-c
NS_D=rmrb-$$-d
SUBNET=
ip netns add "$NS_BR"
NAMESPACES+=("$NS_BR")
ip -n "$NS_BR" link set lo up
ip -n "$NS_BR" link add br0 type bridge
ip -n "$NS_BR" link set br0 up
for k in $(seq 0 255); do
    if ip link add "rmrb$k" type veth peer name host netns "$NS_BR" 2>/dev/null; then
        HOST_IF=rmrb$k
        SUBNET=10.204.$k
        break
    fi
done
[[ -n $SUBNET ]] || die "no free subnet in 10.204.0.0/16 (interfaces rmrb0..rmrb255 all exist)"
HOST_IP=$SUBNET.1
A_IP=$SUBNET.10
B_IP=$SUBNET.11
C_IP=$SUBNET.12
D_IP=$SUBNET.13
ip addr add "$HOST_IP/24" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NS_BR" link set host master br0 up
POD_LIST=("$NS_A:$A_IP" "$NS_B:$B_IP")
((AB_REPEAT == 0)) || POD_LIST+=("$NS_C:$C_IP" "$NS_D:$D_IP")
i=0
for pod in "${POD_LIST[@]}"; do
    ns=${pod%%:*} addr=${pod#*:}
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
    ip -n "$NS_BR" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$NS_BR" link set "p$i" master br0 up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$HOST_IP"
    i=$((i + 1))
done
log "pods: A $A_IP ($NS_A), B $B_IP ($NS_B)$( ((AB_REPEAT == 0)) || echo ", C $C_IP, D $D_IP"); remora-control on $HOST_IP:$CONTROL_PORT ($HOST_IF)"

# ------------------------------------------------------------ apps in pods B (and D)

spawn app-http "${PRIO[@]}" taskset -c "$LOADGEN_CPU" ip netns exec "$NS_B" \
    "$BIN/remora-testapp" http --name api --listen 0.0.0.0:8080
APP_HTTP_PID=$LAST_PID
spawn app-tcp "${PRIO[@]}" taskset -c "$LOADGEN_CPU" ip netns exec "$NS_B" \
    "$BIN/remora-testapp" tcp-echo --listen 0.0.0.0:9000 --listen 0.0.0.0:9001
APP_TCP_PID=$LAST_PID
until_ok "app http on $B_IP:8080" "$APP_HTTP_PID" curl -sf --max-time 1 "http://$B_IP:8080/"
until_ok "app tcp-echo on $B_IP:9000" "$APP_TCP_PID" \
    grep -c "listening on 0.0.0.0:9001" "$OUT_DIR/logs/app-tcp.log"
APPS=("$APP_HTTP_PID" "$APP_TCP_PID")
if ((AB_REPEAT > 0)); then
    spawn app2-http "${PRIO[@]}" taskset -c "$LOADGEN_CPU" ip netns exec "$NS_D" \
        "$BIN/remora-testapp" http --name api2 --listen 0.0.0.0:8080
    APPS+=("$LAST_PID")
    until_ok "app http on $D_IP:8080" "$LAST_PID" curl -sf --max-time 1 "http://$D_IP:8080/"
fi

# ------------------------------------------------------------ the mesh

# One bootstrap token per identity; the control plane keeps their hashes.
# The sidecars (uid 2102) read their token and write their state dirs.
chmod 711 "$TMP"
IDENTITIES=(api web)
((AB_REPEAT == 0)) || IDENTITIES+=(api2 web2)
for sa in "${IDENTITIES[@]}"; do
    "$BIN/remoractl" token "default/$sa" --tokens-file "$TMP/tokens" >"$TMP/$sa.token" 2>>"$OUT_DIR/logs/control.log" ||
        die "remoractl token default/$sa failed (see $OUT_DIR/logs/control.log)"
    chown "$PROXY_UID:$PROXY_UID" "$TMP/$sa.token"
    chmod 600 "$TMP/$sa.token"
done

spawn control env RUST_LOG=info "${PRIO[@]}" taskset -c "$LOADGEN_CPU" "$BIN/remora-control" \
    --listen "$HOST_IP:$CONTROL_PORT" --data-dir "$TMP/data" --registration-grace 30s \
    --bootstrap-tokens "$TMP/tokens" --trust-domain mesh.bench --cert-lifetime 1h --insecure-dev-plaintext
CONTROL_PID=$LAST_PID
CTL=("$BIN/remoractl" --server "http://$HOST_IP:$CONTROL_PORT")
until_ok "remora-control" "$CONTROL_PID" "${CTL[@]}" status
cat >"$TMP/mesh.yaml" <<EOF
kind: Service
metadata: {name: api}
spec:
  addresses: [$API_VIP]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: echo, port: 9000, protocol: tcp}
  - {name: echo-detect, port: 9001}
---
kind: Service
metadata: {name: web}
spec:
  addresses: [$WEB_VIP]
  ports: [{port: 80, targetPort: 8080}]
  calls: [api]
EOF
if ((AB_REPEAT > 0)); then
    cat >>"$TMP/mesh.yaml" <<EOF
---
kind: Service
metadata: {name: api2}
spec:
  addresses: [$API2_VIP]
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
kind: Service
metadata: {name: web2}
spec:
  addresses: [$WEB2_VIP]
  ports: [{port: 80, targetPort: 8080}]
  calls: [api2]
EOF
fi
cp "$TMP/mesh.yaml" "$OUT_DIR/mesh.yaml"
"${CTL[@]}" apply -f "$TMP/mesh.yaml" --author intercept-bench >>"$OUT_DIR/logs/control.log" 2>&1 ||
    die "remoractl apply failed (see $OUT_DIR/logs/control.log)"

sidecar() { # sidecar ns service pod-ip: a remora-proxy in the pod as uid 2102
    local ns=$1 svc=$2 ip=$3
    mkdir -p "$TMP/state-$svc"
    chown "$PROXY_UID:$PROXY_UID" "$TMP/state-$svc"
    spawn "sidecar-$svc" env RUST_LOG=warn "${PRIO[@]}" taskset -c "$PROXY_CPU" ip netns exec "$ns" \
        setpriv --reuid=$PROXY_UID --regid=$PROXY_UID --clear-groups "$BIN/remora-proxy" \
        --inbound-addr "0.0.0.0:$INBOUND_PORT" --outbound-addr "127.0.0.1:$OUTBOUND_PORT" \
        --admin-addr "0.0.0.0:$ADMIN_PORT" --workers "$WORKERS" \
        --control-plane "http://$HOST_IP:$CONTROL_PORT" --node-id "$svc-1" --service "$svc" \
        --state-dir "$TMP/state-$svc" --control-plane-max-backoff 300ms --insecure-dev-plaintext \
        --bootstrap-token-file "$TMP/$svc.token" --advertise-addr "$ip:$INBOUND_PORT"
}
sidecar_ready() { # sidecar_ready pid admin-addr
    until_ok "sidecar $2 /ready" "$1" curl -sf --max-time 1 "http://$2/ready"
    [[ $(cat "/proc/$1/comm") == remora-proxy ]] || die "pid $1 is $(cat "/proc/$1/comm"), not remora-proxy"
    [[ $(awk '/^Uid:/ { print $2 }' "/proc/$1/status") == "$PROXY_UID" ]] || die "pid $1 does not run as uid $PROXY_UID"
}
sidecar "$NS_B" api "$B_IP"
API_PID=$LAST_PID
sidecar "$NS_A" web "$A_IP"
WEB_PID=$LAST_PID
WEB_ADMIN=$A_IP:$ADMIN_PORT
API_ADMIN=$B_IP:$ADMIN_PORT
sidecar_ready "$API_PID" "$API_ADMIN"
sidecar_ready "$WEB_PID" "$WEB_ADMIN"
SIDECARS=("$WEB_PID" "$API_PID")
# Until api's instance is registered and web has it: a 200 through both hops.
until_ok "the explicit path web -> api -> app" "$WEB_PID" \
    in_pod "$NS_A" curl -sf --max-time 2 -H 'Host: api' "http://127.0.0.1:$OUTBOUND_PORT/"
if ((AB_REPEAT > 0)); then
    sidecar "$NS_D" api2 "$D_IP"
    API2_PID=$LAST_PID
    sidecar "$NS_C" web2 "$C_IP"
    WEB2_PID=$LAST_PID
    sidecar_ready "$API2_PID" "$D_IP:$ADMIN_PORT"
    sidecar_ready "$WEB2_PID" "$C_IP:$ADMIN_PORT"
    SIDECARS+=("$WEB2_PID" "$API2_PID")
    until_ok "the explicit path web2 -> api2 -> app" "$WEB2_PID" \
        in_pod "$NS_C" curl -sf --max-time 2 -H 'Host: api2' "http://127.0.0.1:$OUTBOUND_PORT/"
fi

# ------------------------------------------------------------ interception on/off

declare -A RULES=()
rules() { # rules on|off client-ns server-ns server-ip vip: remora-proxy init (--uninstall) in a pair of pods
    local want=$1 client=$2 server=$3 ip=$4 vip=$5 ns extra=() changed=0
    [[ $want == on ]] || extra=(--uninstall)
    for ns in "$client" "$server"; do
        [[ ${RULES[$ns]:-off} != "$want" ]] || continue
        in_pod "$ns" "$BIN/remora-proxy" init "${extra[@]}" >>"$OUT_DIR/logs/init.log" 2>&1 ||
            die "remora-proxy init ${extra[*]} in $ns failed (see $OUT_DIR/logs/init.log)"
        RULES[$ns]=$want
        changed=1
    done
    ((changed)) || return 0
    if [[ $want == on ]]; then
        until_ok "HTTP to $vip from $client" "" in_pod "$client" curl -sf --max-time 2 "http://$vip/"
    else
        until_ok "HTTP to $ip:8080 directly from $client" "" in_pod "$client" curl -sf --max-time 2 "http://$ip:8080/"
    fi
}
intercept() { rules "$1" "$NS_A" "$NS_B" "$B_IP" "$API_VIP"; }

echo_check() { # echo_check addr: one TCP exchange through the path
    local got
    got=$(in_pod "$NS_A" "$BIN/remora-testapp" connect "$1" --send "check-$1" --timeout-ms 5000 2>&1) || true
    [[ $got == "check-$1" ]] || die "TCP echo through $1 answered '$got'"
}

# ------------------------------------------------------------ one variant

oha_bg() { # oha_bg ns seconds out.json [oha args...] url: started, pid in LAST_PID
    local ns=$1 secs=$2 out=$3
    shift 3
    in_pod "$ns" "${RATE_PRIO[@]}" taskset -c "$LOADGEN_CPU" "$OHA_BIN" --no-tui --output-format json \
        --latency-correction -q "$RATE" -z "${secs}s" -c "$RATE_CONNS" -w --http-version 1.1 \
        --worker-threads 1 "$@" >"$out" 2>"$out.stderr" </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}
oha_wait() { # oha_wait pid out.json
    local rc=0
    wait "$1" || rc=$?
    ((rc == 0)) || die "oha failed (rc $rc, see $2.stderr)"
}

oha() { # oha seconds out.json [oha args...] url (in pod A)
    local secs=$1 out=$2 pid rc=0
    shift 2
    in_pod "$NS_A" "${RATE_PRIO[@]}" taskset -c "$LOADGEN_CPU" "$OHA_BIN" --no-tui --output-format json \
        --latency-correction -q "$RATE" -z "${secs}s" -c "$RATE_CONNS" -w --http-version 1.1 \
        --worker-threads 1 "$@" >"$out" 2>"$out.stderr" </dev/null &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    unset 'PIDS[${#PIDS[@]}-1]'
    ((rc == 0)) || die "oha failed (rc $rc, see $out.stderr)"
}

PERF_PID=
perf_start() { # perf_start out: perf stat of both sidecars until perf_stop
    [[ $PERF_STAT == 1 ]] || return 0
    perf stat -e task-clock,context-switches -x, -p "$WEB_PID,$API_PID" -o "$1" &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.2 # attached before the load starts
}
perf_stop() {
    [[ -n $PERF_PID ]] || return 0
    kill -INT "$PERF_PID"
    wait "$PERF_PID" || true
    unset 'PIDS[${#PIDS[@]}-1]'
    PERF_PID=
}

tcp_load() { # tcp_load addr out.json
    local pid rc=0
    in_pod "$NS_A" "${RATE_PRIO[@]}" taskset -c "$LOADGEN_CPU" "$BIN/remora-tcp-load" "$1" \
        --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --conns "$RATE_CONNS" --size "$SIZE" \
        --cpu-pid "$WEB_PID" --cpu-pid "$API_PID" >"$2" 2>"$2.stderr" </dev/null &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    unset 'PIDS[${#PIDS[@]}-1]'
    ((rc == 0)) || die "remora-tcp-load failed (rc $rc, see $2.stderr)"
}

# The sidecars' counters that tell which path a run took.
COUNTERS=(
    "web_out_conns $WEB_ADMIN remora_connections_total listener=\"outbound\""
    "api_in_conns $API_ADMIN remora_connections_total listener=\"inbound\""
    "web_detect_http1 $WEB_ADMIN remora_protocol_detections_total listener=\"outbound\" result=\"http1\""
    "web_detect_opaque $WEB_ADMIN remora_protocol_detections_total listener=\"outbound\" result=\"opaque\""
    "web_detect_declared $WEB_ADMIN remora_protocol_detections_total listener=\"outbound\" result=\"declared\""
    "web_tcp_bytes_9000 $WEB_ADMIN remora_tcp_bytes_total target=\"default/api:9000\" flow=\"client_to_server\""
    "web_tcp_bytes_9001 $WEB_ADMIN remora_tcp_bytes_total target=\"default/api:9001\" flow=\"client_to_server\""
    "web_tls_out_ok $WEB_ADMIN remora_tls_handshakes_total direction=\"outbound\" result=\"ok\""
    "api_tls_in_ok $API_ADMIN remora_tls_handshakes_total direction=\"inbound\" result=\"ok\""
)
declare -A C0 C1
read_counters() { # read_counters ARRAY
    local -n into=$1
    local line name addr m rest
    for line in "${COUNTERS[@]}"; do
        read -r name addr m rest <<<"$line"
        # shellcheck disable=SC2034,SC2086 # into: a nameref; rest: one label per word
        into["$name"]=$(metric "$addr" "$m" $rest)
    done
}

run_variant() { # run_variant rep variant
    local rep=$1 v=$2 pfx=$OUT_DIR/raw/r$1-$2 url=() addr="" t0w t0a t1w t1a b0 b1
    case $v in
    http-direct) intercept off; url=("http://$B_IP:8080/") ;;
    http-explicit) intercept off; url=(--host api "http://127.0.0.1:$OUTBOUND_PORT/") ;;
    http-intercepted) intercept on; url=("http://$API_VIP/") ;;
    tcp-direct) intercept off; addr=$B_IP:9000 ;;
    tcp-intercepted) intercept on; addr=$API_VIP:9000 ;;
    tcp-detect) intercept on; addr=$API_VIP:9001 ;;
    esac
    [[ -z $addr ]] || echo_check "$addr"
    read_counters C0
    set_fifo on "${SIDECARS[@]}" "${APPS[@]}"
    if [[ $v == http-* ]]; then
        if ((WARMUP > 0)); then
            log "r$rep $v: warm-up ${WARMUP}s"
            oha "$WARMUP" "$TMP/warmup.json" "${url[@]}"
        fi
        log "r$rep $v: oha -q $RATE -c $RATE_CONNS -z ${DURATION}s --latency-correction ${url[*]}"
        perf_start "$pfx.perf.txt"
        t0w=$(cpu_ticks "$WEB_PID") t0a=$(cpu_ticks "$API_PID") b0=$(core_busy "$PROXY_CPU")
        oha "$DURATION" "$pfx.oha.json" "${url[@]}"
    else
        log "r$rep $v: remora-tcp-load $addr --rate $RATE --conns $RATE_CONNS --warmup $WARMUP --duration $DURATION --size $SIZE"
        perf_start "$pfx.perf.txt"
        t0w=$(cpu_ticks "$WEB_PID") t0a=$(cpu_ticks "$API_PID") b0=$(core_busy "$PROXY_CPU")
        tcp_load "$addr" "$pfx.tcp.json"
    fi
    b1=$(core_busy "$PROXY_CPU") t1w=$(cpu_ticks "$WEB_PID") t1a=$(cpu_ticks "$API_PID")
    perf_stop
    set_fifo off "${SIDECARS[@]}" "${APPS[@]}"
    if ! alive "$WEB_PID" || ! alive "$API_PID"; then die "r$rep $v: a sidecar exited during the run"; fi
    read_counters C1
    local k d=() json=""
    for k in "${!C1[@]}"; do
        d+=("$k=$((C1[$k] - C0[$k]))")
        json+="\"d_$k\":$((C1[$k] - C0[$k])),"
    done
    local secs=$DURATION
    [[ $v == http-* ]] || secs=$((WARMUP + DURATION))
    # ticks_* and core ticks span what the script bracketed: the measured
    # oha run (HTTP) or the whole remora-tcp-load run, warm-up included (TCP,
    # whose measured-phase ticks are in its own output).
    printf '{"variant":"%s","repeat":%d,"clk_tck":%d,"ticks_web":%d,"ticks_api":%d,"proxy_core_busy_ticks":%d,"bracket_s":%d,"web_pid":%d,"api_pid":%d,%s"duration_s":%d}\n' \
        "$v" "$rep" "$CLK_TCK" $((t1w - t0w)) $((t1a - t0a)) $((b1 - b0)) "$secs" "$WEB_PID" "$API_PID" "$json" "$DURATION" >"$pfx.proc.json"
    log "r$rep $v: counter deltas ${d[*]}"

    # Did the run take the path it claims?
    local -A D
    for k in "${!C1[@]}"; do D[$k]=$((C1[$k] - C0[$k])); done
    case $v in
    *-direct)
        ((D[web_out_conns] == 0 && D[api_in_conns] == 0)) || die "r$rep $v: the sidecars accepted connections during a direct run"
        ;;
    http-explicit)
        ((D[web_out_conns] > 0)) || die "r$rep $v: web's outbound listener accepted nothing"
        ((D[web_detect_http1] == 0)) || die "r$rep $v: web ran protocol detection: the connections were intercepted"
        ;;
    http-intercepted)
        ((D[web_detect_http1] > 0)) || die "r$rep $v: web detected no HTTP/1 connection: not intercepted"
        ;;
    tcp-intercepted)
        ((D[web_detect_declared] > 0 && D[web_tcp_bytes_9000] >= RATE * DURATION * SIZE)) ||
            die "r$rep $v: web did not carry the load as opaque TCP to api:9000 (declared ${D[web_detect_declared]}, bytes ${D[web_tcp_bytes_9000]})"
        ;;
    tcp-detect)
        ((D[web_detect_opaque] > 0 && D[web_tcp_bytes_9001] >= RATE * DURATION * SIZE)) ||
            die "r$rep $v: web did not detect opaque TCP to api:9001 (opaque ${D[web_detect_opaque]}, bytes ${D[web_tcp_bytes_9001]})"
        ;;
    esac
    if [[ $v != *-direct ]]; then
        ((C1[web_tls_out_ok] > 0 && C1[api_tls_in_ok] > 0)) || die "r$rep $v: no mTLS handshake between the sidecars"
    fi
}

# ------------------------------------------------------------ sweep

read -r -a VLIST <<<"$VARIANTS"
log "sidecars on core $PROXY_CPU; load generator, apps and remora-control on core $LOADGEN_CPU; sched $SCHED, nice $NICE"
for ((rep = 1; rep <= REPEAT; rep++)); do
    n=${#VLIST[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${VLIST[(i + rep - 1) % n]}"); done
    log "repeat $rep/$REPEAT: ${order[*]}"
    for v in "${order[@]}"; do
        for p in "$APP_HTTP_PID" "$APP_TCP_PID" "$CONTROL_PID"; do alive "$p" || die "pid $p exited (see $OUT_DIR/logs)"; done
        run_variant "$rep" "$v"
    done
done
intercept off

# ------------------------------------------------------------ concurrent A/B

# ab_round N: pair 1 (A -> B) and pair 2 (C -> D) loaded at the same time,
# one intercepted, the other explicit; odd rounds intercept pair 1.
ab_round() {
    local n=$1 pfx=$OUT_DIR/raw/ab$1 ipair p pids=() t0=() t1=() b0 b1
    if ((n % 2)); then ipair=1; else ipair=2; fi
    local args1 args2
    if ((ipair == 1)); then
        rules off "$NS_C" "$NS_D" "$D_IP" "$API2_VIP"
        rules on "$NS_A" "$NS_B" "$B_IP" "$API_VIP"
        args1=("http://$API_VIP/") args2=(--host api2 "http://127.0.0.1:$OUTBOUND_PORT/")
    else
        rules off "$NS_A" "$NS_B" "$B_IP" "$API_VIP"
        rules on "$NS_C" "$NS_D" "$D_IP" "$API2_VIP"
        args1=(--host api "http://127.0.0.1:$OUTBOUND_PORT/") args2=("http://$API2_VIP/")
    fi
    local d1_0 d2_0 d1_1 d2_1 di de
    d1_0=$(metric "$WEB_ADMIN" remora_protocol_detections_total 'listener="outbound"' 'result="http1"')
    d2_0=$(metric "$C_IP:$ADMIN_PORT" remora_protocol_detections_total 'listener="outbound"' 'result="http1"')
    set_fifo on "${SIDECARS[@]}" "${APPS[@]}"
    log "ab$n: pair $ipair intercepted, pair $((3 - ipair)) explicit, both at $RATE req/s"
    if ((WARMUP > 0)); then
        oha_bg "$NS_A" "$WARMUP" "$TMP/warmup1.json" "${args1[@]}"
        pids=("$LAST_PID")
        oha_bg "$NS_C" "$WARMUP" "$TMP/warmup2.json" "${args2[@]}"
        pids+=("$LAST_PID")
        oha_wait "${pids[0]}" "$TMP/warmup1.json"
        oha_wait "${pids[1]}" "$TMP/warmup2.json"
        PIDS=("${PIDS[@]:0:${#PIDS[@]}-2}")
    fi
    for p in "${SIDECARS[@]}"; do t0+=("$(cpu_ticks "$p")"); done
    b0=$(core_busy "$PROXY_CPU")
    oha_bg "$NS_A" "$DURATION" "$pfx-pair1.oha.json" "${args1[@]}"
    pids=("$LAST_PID")
    oha_bg "$NS_C" "$DURATION" "$pfx-pair2.oha.json" "${args2[@]}"
    pids+=("$LAST_PID")
    oha_wait "${pids[0]}" "$pfx-pair1.oha.json"
    oha_wait "${pids[1]}" "$pfx-pair2.oha.json"
    PIDS=("${PIDS[@]:0:${#PIDS[@]}-2}")
    b1=$(core_busy "$PROXY_CPU")
    for p in "${SIDECARS[@]}"; do t1+=("$(cpu_ticks "$p")"); done
    set_fifo off "${SIDECARS[@]}" "${APPS[@]}"
    for p in "${SIDECARS[@]}"; do alive "$p" || die "ab$n: a sidecar exited"; done
    d1_1=$(metric "$WEB_ADMIN" remora_protocol_detections_total 'listener="outbound"' 'result="http1"')
    d2_1=$(metric "$C_IP:$ADMIN_PORT" remora_protocol_detections_total 'listener="outbound"' 'result="http1"')
    # The intercepted pair's web detected HTTP/1 on its connections; the
    # explicit pair's saw only connections addressed to its listener.
    if ((ipair == 1)); then di=$((d1_1 - d1_0)) de=$((d2_1 - d2_0)); else di=$((d2_1 - d2_0)) de=$((d1_1 - d1_0)); fi
    ((di > 0 && de == 0)) || die "ab$n: HTTP/1 detections: intercepted pair $di, explicit pair $de (want > 0 and 0)"
    # ticks in SIDECARS order: web, api, web2, api2.
    printf '{"round":%d,"intercepted_pair":%d,"clk_tck":%d,"ticks":[%d,%d,%d,%d],"proxy_core_busy_ticks":%d,"duration_s":%d}\n' \
        "$n" "$ipair" "$CLK_TCK" $((t1[0] - t0[0])) $((t1[1] - t0[1])) $((t1[2] - t0[2])) $((t1[3] - t0[3])) \
        $((b1 - b0)) "$DURATION" >"$pfx.proc.json"
}
for ((n = 1; n <= AB_REPEAT; n++)); do
    for p in "${APPS[@]}" "$CONTROL_PID"; do alive "$p" || die "pid $p exited (see $OUT_DIR/logs)"; done
    ab_round "$n"
done
((AB_REPEAT == 0)) || rules off "$NS_C" "$NS_D" "$D_IP" "$API2_VIP"
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"

# ------------------------------------------------------------ report

python3 - "$OUT_DIR" "$RATE" <<'PY' | tee "$OUT_DIR/results.txt"
import glob, json, os, statistics, sys

out, rate = sys.argv[1], int(sys.argv[2])
runs = {}
for pj in sorted(glob.glob(os.path.join(out, "raw", "r*-*.proc.json"))):
    p = json.load(open(pj))
    v, clk = p["variant"], p["clk_tck"]
    r = dict(p)
    if v.startswith("http-"):
        o = json.load(open(pj.replace(".proc.json", ".oha.json")))
        lp = o["latencyPercentiles"]
        codes = {str(k): int(n) for k, n in (o.get("statusCodeDistribution") or {}).items()}
        ok = sum(n for c, n in codes.items() if c.startswith("2"))
        r.update(p50=lp["p50"] * 1e3, p90=lp["p90"] * 1e3, p99=lp["p99"] * 1e3, p999=lp["p99.9"] * 1e3,
                 ok=ok, failed=sum(codes.values()) - ok + sum(int(n) for n in (o.get("errorDistribution") or {}).values()))
        tw, ta = p["ticks_web"], p["ticks_api"]
    else:
        t = json.load(open(pj.replace(".proc.json", ".tcp.json")))
        r.update(p50=t["p50_ms"], p90=t["p90_ms"], p99=t["p99_ms"], p999=t["p999_ms"], ok=t["ok"], failed=t["errors"],
                 pacer_lag_p99_ms=t["pacer_lag_p99_ms"])
        cpu = t["cpu_ticks"]
        tw, ta = cpu.get(str(p["web_pid"])), cpu.get(str(p["api_pid"]))
    # Other work on the sidecars' core during what the script bracketed.
    r["other_pct"] = 100.0 * max(0, p["proxy_core_busy_ticks"] - p["ticks_web"] - p["ticks_api"]) / clk / p["bracket_s"]
    if not v.endswith("-direct") and r["ok"] and tw is not None and ta is not None:
        us = 1e6 / clk / r["ok"]
        r.update(cpu_us_web=tw * us, cpu_us_api=ta * us, cpu_us=(tw + ta) * us)
    # perf stat (PERF_STAT=1): over the bracket, so per request sent in it.
    perf = pj.replace(".proc.json", ".perf.txt")
    if os.path.exists(perf) and not v.endswith("-direct"):
        ev = {}
        for line in open(perf):
            f_ = line.strip().split(",")
            if len(f_) > 2 and not line.startswith("#"):
                try:
                    ev[f_[2]] = float(f_[0])
                except ValueError:
                    pass
        sent = r["ok"] if v.startswith("http-") else rate * p["bracket_s"]
        if "task-clock" in ev and sent:
            r["perf_cpu_us"] = ev["task-clock"] * 1e3 / sent
        if "context-switches" in ev and sent:
            r["perf_cs_per_req"] = ev["context-switches"] / sent
    runs[(p["repeat"], v)] = r

reps = sorted({k[0] for k in runs})
order = ["http-direct", "http-explicit", "http-intercepted", "tcp-direct", "tcp-intercepted", "tcp-detect"]
variants = [v for v in order if any(k[1] == v for k in runs)]
pairs = [("http-intercepted", "http-explicit"), ("tcp-detect", "tcp-intercepted")]
for (rep, v), r in runs.items():
    d = runs.get((rep, v.split("-")[0] + "-direct"))
    if not v.endswith("-direct") and d:
        for q in ("p50", "p90", "p99", "p999"):
            r["added_" + q] = r[q] - d[q]
    for a, b in pairs:
        base = runs.get((rep, b))
        if v == a and base:
            r["vs_p50"] = r["p50"] - base["p50"]
            r["vs_p99"] = r["p99"] - base["p99"]
            if "cpu_us" in r and "cpu_us" in base:
                r["vs_cpu_ratio"] = r["cpu_us"] / base["cpu_us"]
            if "perf_cpu_us" in r and "perf_cpu_us" in base:
                r["vs_perf_cpu_ratio"] = r["perf_cpu_us"] / base["perf_cpu_us"]
                r["vs_perf_cs"] = r["perf_cs_per_req"] - base["perf_cs_per_req"]

def vals(v, key):
    return [runs[(rep, v)][key] for rep in reps if (rep, v) in runs and key in runs[(rep, v)]]

def med(v, key):
    xs = vals(v, key)
    return statistics.median(xs) if xs else None

def f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)

def spread(v, key, fmt="{:+.3f}"):
    xs = vals(v, key)
    if not xs:
        return "-"
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]"

print(f"\nPer run ({rate} req/s; latency ms, coordinated-omission corrected; CPU = both sidecars, measured phase)")
print("rep variant           p50    p90    p99    p99.9  added p99  CPU us/req (web+api)  ok     failed other%")
for rep in reps:
    for v in variants:
        r = runs.get((rep, v))
        if not r:
            continue
        cpu = "-" if "cpu_us" not in r else f"{r['cpu_us']:.1f} ({r['cpu_us_web']:.1f}+{r['cpu_us_api']:.1f})"
        print(f"{rep:<3} {v:<17} {r['p50']:.3f}  {r['p90']:.3f}  {r['p99']:.3f}  {r['p999']:.3f}  "
              f"{f(r.get('added_p99'), '{:+.3f}'):>9}  {cpu:<21} {r['ok']:<6} {r['failed']:<6} {r['other_pct']:.0f}")

print(f"\nMedians over {len(reps)} repeat(s); added = variant - direct of the same protocol and repeat, median [min, max]")
print("variant           p50    p90    p99    p99.9  added p50                 added p99                 CPU us/req (web+api)")
for v in variants:
    cpu = "-" if med(v, "cpu_us") is None else \
        f"{spread(v, 'cpu_us', '{:.1f}')} ({med(v, 'cpu_us_web'):.1f}+{med(v, 'cpu_us_api'):.1f})"
    print(f"{v:<17} {f(med(v, 'p50'))}  {f(med(v, 'p90'))}  {f(med(v, 'p99'))}  {f(med(v, 'p999'))}  "
          f"{spread(v, 'added_p50'):<25} {spread(v, 'added_p99'):<25} {cpu}")

if any("perf_cpu_us" in r for r in runs.values()):
    print("\nperf stat, both sidecars: task-clock us and context switches per request, median [min, max]")
    for v in variants:
        if vals(v, "perf_cpu_us"):
            print(f"{v:<17} {spread(v, 'perf_cpu_us', '{:.1f}'):<26} {spread(v, 'perf_cs_per_req', '{:.2f}')}")

print()
summary = {v: {k: med(v, k) for k in ("p50", "p90", "p99", "p999", "added_p50", "added_p99", "cpu_us", "cpu_us_web", "cpu_us_api",
                                     "perf_cpu_us", "perf_cs_per_req")}
           for v in variants}
for a, b in pairs:
    if (a in variants) and (b in variants):
        print(f"{a} vs {b} (median [min, max] of per-repeat values):")
        print(f"  CPU per request ratio   {spread(a, 'vs_cpu_ratio', '{:.3f}')}")
        print(f"  p50 difference (ms)     {spread(a, 'vs_p50')}")
        print(f"  p99 difference (ms)     {spread(a, 'vs_p99')}")
        if vals(a, "vs_perf_cpu_ratio"):
            print(f"  perf task-clock ratio   {spread(a, 'vs_perf_cpu_ratio', '{:.3f}')}")
            print(f"  context switches/req    {spread(a, 'vs_perf_cs', '{:+.2f}')}")
        summary[f"{a}_vs_{b}"] = {k: med(a, k) for k in ("vs_cpu_ratio", "vs_perf_cpu_ratio", "vs_perf_cs", "vs_p50", "vs_p99")}
# Concurrent A/B rounds.
ab = []
for pj in sorted(glob.glob(os.path.join(out, "raw", "ab*.proc.json")), key=lambda p: int(os.path.basename(p)[2:].split(".")[0])):
    p = json.load(open(pj))
    n, ip, clk = p["round"], p["intercepted_pair"], p["clk_tck"]
    pair = {}
    for k in (1, 2):
        o = json.load(open(pj.replace(".proc.json", f"-pair{k}.oha.json")))
        lp = o["latencyPercentiles"]
        codes = {str(c): int(m) for c, m in (o.get("statusCodeDistribution") or {}).items()}
        ok = sum(m for c, m in codes.items() if c.startswith("2"))
        failed = sum(codes.values()) - ok + sum(int(m) for m in (o.get("errorDistribution") or {}).values())
        ticks = p["ticks"][2 * (k - 1)] + p["ticks"][2 * (k - 1) + 1]
        pair[k] = dict(p50=lp["p50"] * 1e3, p99=lp["p99"] * 1e3, ok=ok, failed=failed,
                       cpu_us=ticks * 1e6 / clk / ok if ok else None)
    i, e = pair[ip], pair[3 - ip]
    other = 100.0 * max(0, p["proxy_core_busy_ticks"] - sum(p["ticks"])) / clk / p["duration_s"]
    ab.append(dict(round=n, ipair=ip, i=i, e=e, other=other,
                   cpu_ratio=(i["cpu_us"] / e["cpu_us"]) if i["cpu_us"] and e["cpu_us"] else None,
                   d_p50=i["p50"] - e["p50"], d_p99=i["p99"] - e["p99"]))
if ab:
    print(f"\nConcurrent A/B: pair 1 (A->B) and pair 2 (C->D) at {rate} req/s each, at the same time;")
    print("one intercepted, the other explicit, roles swapped each round (CPU = that pair's two sidecars)")
    print("round  intercepted  explicit: p50  p99    CPU us/req  intercepted: p50  p99    CPU us/req  CPU ratio  d p50   d p99   other%")
    for a in ab:
        i, e = a["i"], a["e"]
        print(f"{a['round']:<6} pair {a['ipair']:<7} {e['p50']:.3f}  {e['p99']:.3f}  {f(e['cpu_us'], '{:.1f}'):>10}  "
              f"{i['p50']:.3f}  {i['p99']:.3f}  {f(i['cpu_us'], '{:.1f}'):>10}  {f(a['cpu_ratio']):>9}  "
              f"{a['d_p50']:+.3f}  {a['d_p99']:+.3f}  {a['other']:.0f}")
    def ab_spread(key, fmt, sel=lambda a: True):
        xs = [a[key] for a in ab if sel(a) and a[key] is not None]
        if not xs:
            return "-"
        return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}] (n={len(xs)})"
    def ab_med(key, who):
        xs = [a[who][key] for a in ab if a[who][key] is not None]
        return statistics.median(xs) if xs else None
    print("intercepted vs explicit, median [min, max] over rounds:")
    print(f"  CPU per request ratio   {ab_spread('cpu_ratio', '{:.3f}')}")
    for k in (1, 2):
        print(f"    pair {k} intercepted    {ab_spread('cpu_ratio', '{:.3f}', lambda a, k=k: a['ipair'] == k)}")
    print(f"  p50 difference (ms)     {ab_spread('d_p50', '{:+.3f}')}")
    print(f"  p99 difference (ms)     {ab_spread('d_p99', '{:+.3f}')}")
    print(f"  medians: explicit p50 {f(ab_med('p50', 'e'))} p99 {f(ab_med('p99', 'e'))} CPU {f(ab_med('cpu_us', 'e'), '{:.1f}')}; "
          f"intercepted p50 {f(ab_med('p50', 'i'))} p99 {f(ab_med('p99', 'i'))} CPU {f(ab_med('cpu_us', 'i'), '{:.1f}')}")
    summary["ab"] = {k: statistics.median([a[k] for a in ab if a[k] is not None] or [0]) for k in ("cpu_ratio", "d_p50", "d_p99")}
bad = [f"r{k[0]} {k[1]}: {r['failed']} failed" for k, r in runs.items() if r["failed"]]
bad += [f"ab{a['round']}: {a['i']['failed'] + a['e']['failed']} failed" for a in ab if a["i"]["failed"] or a["e"]["failed"]]
if bad:
    print("FAILED REQUESTS: " + "; ".join(bad))
json.dump({"runs": [dict(r) for r in runs.values()], "ab": ab, "summary": summary},
          open(os.path.join(out, "results.json"), "w"), indent=1)
PY
log "done: $OUT_DIR/results.txt, $OUT_DIR/results.json"
if grep -q '^FAILED REQUESTS' "$OUT_DIR/results.txt"; then
    die "some requests failed (see results.txt)"
fi
