#!/usr/bin/env bash
# Remora control-plane scale benchmark. See BENCHMARKS.md, "Control plane".
#
#   bash bench/control_plane.sh
#
# Scenarios (all on loopback, each with its own remora-control and data dir):
#   fanout     one remora-control holding STREAMS Discovery streams (opened by
#              remora-cp-bench over CHANNELS HTTP/2 connections); REPEAT applies,
#              Apply -> ACK latency per stream, from Admin.Status and (when the
#              control plane has --metrics-addr) its own commit -> last ACK
#              gauge; control-plane VmRSS / VmHWM while holding them.
#   versions   one remora-control on a ROUTES-route mesh: VERSIONS one-route
#              changes committed back to back; its VmRSS as versions
#              accumulate, and the Admin.Apply time.
#   swap       a real remora-proxy on a ROUTES-route mesh: `config applied ...
#              micros=` for the first snapshot and for re-applies, and request
#              latency at RATE req/s through its outbound listener without swaps
#              and with a swap every SWAP_EVERY_MS.
#   breakdown  in process (remora-cp-bench links remora-proxy): decode, prepare,
#              compile and swap of a ROUTES-route snapshot, timed step by step, for
#              BREAKDOWN_PARENTS shapes.
#
# Environment (all optional):
#   SCENARIOS="fanout versions swap breakdown"
#   STREAMS=10000 CHANNELS=400 REPEAT=5      fan-out size and applies (the
#                      control plane takes at most 32 streams per connection)
#   FANOUT_ROUTES=100 FANOUT_PARENTS=10      mesh the fan-out streams receive
#   STATUS_POLL_MS=20                        Admin.Status poll interval
#   ROUTES=5000 PARENTS=50 BACKENDS=4        mesh of the swap and versions scenarios
#   VERSIONS=1000                            versions committed by `versions`
#   RATE=1000 DURATION=5 WARMUP=1            paced load (req/s, s per phase)
#   SWAP_EVERY_MS=500 IDLE_SWAPS=10          swaps under load / without load
#   BREAKDOWN_PARENTS=1,50,500 BREAKDOWN_ITERS=11
#   PORT_BASE=18300    ports: BASE (control, fanout and versions), BASE+1
#                      (control, swap), BASE+2 (remora-demo upstream), BASE+3
#                      (proxy outbound), BASE+4 (proxy admin), BASE+5 and
#                      BASE+6 (the two control planes' metrics)
#   LOADGEN_CPU=0 PROXY_CPU=1   swap scenario: the proxy alone on PROXY_CPU;
#                      control plane, upstream and load generator on LOADGEN_CPU
#   NICE=-20           nice level of the processes measured (default -20 as root,
#                      0 otherwise) so unrelated work on the machine disturbs less
#   CARGO_TARGET_DIR   where the release binaries are built
#                      (default <repo>/../target-bench)
#   BIN_DIR=path       use binaries already built there (no cargo build)
#   OUT_DIR=path       results (default bench/out/cp-<timestamp>)
#   READY_TIMEOUT=30   seconds to wait for a process to answer
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

SCENARIOS=${SCENARIOS:-"fanout versions swap breakdown"}
STREAMS=${STREAMS:-10000}
CHANNELS=${CHANNELS:-400}
REPEAT=${REPEAT:-5}
FANOUT_ROUTES=${FANOUT_ROUTES:-100}
FANOUT_PARENTS=${FANOUT_PARENTS:-10}
STATUS_POLL_MS=${STATUS_POLL_MS:-20}
ROUTES=${ROUTES:-5000}
PARENTS=${PARENTS:-50}
BACKENDS=${BACKENDS:-4}
VERSIONS=${VERSIONS:-1000}
RATE=${RATE:-1000}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
SWAP_EVERY_MS=${SWAP_EVERY_MS:-500}
IDLE_SWAPS=${IDLE_SWAPS:-10}
BREAKDOWN_PARENTS=${BREAKDOWN_PARENTS:-1,50,500}
BREAKDOWN_ITERS=${BREAKDOWN_ITERS:-11}
PORT_BASE=${PORT_BASE:-18300}
LOADGEN_CPU=${LOADGEN_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
READY_TIMEOUT=${READY_TIMEOUT:-30}
if [[ $(id -u) -eq 0 ]]; then NICE=${NICE:--20}; else NICE=${NICE:-0}; fi

CONTROL_FANOUT_PORT=$PORT_BASE
CONTROL_SWAP_PORT=$((PORT_BASE + 1))
UPSTREAM_PORT=$((PORT_BASE + 2))
OUTBOUND_PORT=$((PORT_BASE + 3))
ADMIN_PORT=$((PORT_BASE + 4))
METRICS_FANOUT_PORT=$((PORT_BASE + 5))
METRICS_SWAP_PORT=$((PORT_BASE + 6))

log() { printf '[cp-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for v in STREAMS CHANNELS REPEAT FANOUT_ROUTES FANOUT_PARENTS STATUS_POLL_MS ROUTES PARENTS BACKENDS VERSIONS \
    RATE DURATION WARMUP SWAP_EVERY_MS IDLE_SWAPS BREAKDOWN_ITERS PORT_BASE LOADGEN_CPU PROXY_CPU READY_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be an integer (got '$NICE')"
[[ $BREAKDOWN_PARENTS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "BREAKDOWN_PARENTS must be a comma-separated list of integers"
for s in $SCENARIOS; do
    case $s in fanout | versions | swap | breakdown) ;; *) die "unknown scenario '$s' (fanout, versions, swap, breakdown)" ;; esac
done
NCPU=$(nproc)
((LOADGEN_CPU < NCPU && PROXY_CPU < NCPU)) || die "LOADGEN_CPU/PROXY_CPU must be below $NCPU"
for tool in ss curl taskset; do command -v "$tool" >/dev/null || die "$tool is required"; done

PRIO=()
if ((NICE != 0)); then PRIO=(nice -n "$NICE"); fi

# ------------------------------------------------------------ cleanup

PIDS=()
TMP=$(mktemp -d "${TMPDIR:-/tmp}/remora-cp-bench.XXXXXX")
stop_pid() {
    local pid=$1 name
    name=$(ps -o comm= -p "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        # Exited but not yet reaped.
        [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] || {
            wait "$pid" 2>/dev/null || true
            return 0
        }
        sleep 0.1
    done
    log "$name (pid $pid) still running 5 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# Drops an exited (and reaped) pid from PIDS, so it is never signalled again.
forget() {
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
# Newest first: proxies leave before the control plane they stream from.
stop_all() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    PIDS=()
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    wait 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------ checks

port_free() { [[ -z $(ss -Htln "sport = :$1") ]]; }
needed_ports=()
for s in $SCENARIOS; do
    case $s in
    fanout | versions) needed_ports+=("$CONTROL_FANOUT_PORT" "$METRICS_FANOUT_PORT") ;;
    swap) needed_ports+=("$CONTROL_SWAP_PORT" "$UPSTREAM_PORT" "$OUTBOUND_PORT" "$ADMIN_PORT" "$METRICS_SWAP_PORT") ;;
    esac
done
for p in $(printf '%s\n' "${needed_ports[@]}" | sort -u); do
    port_free "$p" || die "port $p is in use (move the benchmark with PORT_BASE=...)"
done

# Many streams ride on few connections, so this matters little; raise it anyway.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------ build

if [[ -n ${BIN_DIR:-} ]]; then
    BIN=$BIN_DIR
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd "$REPO/.." && pwd)/target-bench}
    log "building release binaries into $CARGO_TARGET_DIR"
    (cd "$REPO" && cargo build --release --quiet \
        -p remora-control -p remora-proxy -p remora-tests \
        --bin remora-control --bin remora-proxy --bin remora-demo --bin remora-cp-bench)
    BIN=$CARGO_TARGET_DIR/release
fi
for b in remora-control remora-proxy remora-demo remora-cp-bench; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found"
done

OUT_DIR=${OUT_DIR:-$REPO/bench/out/cp-$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT_DIR/logs"
{
    echo "date: $(date -Is)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?) $(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
    echo "host: $(uname -srm); $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "mem: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "open files limit: $(ulimit -n)"
    echo "nice: $NICE"
    echo "scenarios: $SCENARIOS"
    echo "fanout: STREAMS=$STREAMS CHANNELS=$CHANNELS REPEAT=$REPEAT FANOUT_ROUTES=$FANOUT_ROUTES FANOUT_PARENTS=$FANOUT_PARENTS STATUS_POLL_MS=$STATUS_POLL_MS"
    echo "versions: ROUTES=$ROUTES PARENTS=$PARENTS BACKENDS=$BACKENDS VERSIONS=$VERSIONS"
    echo "swap: ROUTES=$ROUTES PARENTS=$PARENTS BACKENDS=$BACKENDS RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP SWAP_EVERY_MS=$SWAP_EVERY_MS IDLE_SWAPS=$IDLE_SWAPS LOADGEN_CPU=$LOADGEN_CPU PROXY_CPU=$PROXY_CPU"
    echo "breakdown: ROUTES=$ROUTES BREAKDOWN_PARENTS=$BREAKDOWN_PARENTS BREAKDOWN_ITERS=$BREAKDOWN_ITERS BACKENDS=$BACKENDS"
    for b in remora-control remora-proxy; do echo "$b: $("$BIN/$b" --version 2>/dev/null)"; done
} >"$OUT_DIR/meta.txt"
log "results go to $OUT_DIR"

# ------------------------------------------------------------ helpers

# Starts a process in the background, logs to $1, remembers its pid in $LAST_PID.
spawn() {
    local logfile=$1
    shift
    env -u REMORA_CONFIG -u REMORA_CONTROL_PLANE -u REMORA_NODE_ID -u REMORA_SERVICE \
        NO_COLOR=1 "$@" >"$logfile" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_tcp() { # port pid what
    local end=$((SECONDS + READY_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        kill -0 "$2" 2>/dev/null || die "$3 exited (see $OUT_DIR/logs)"
        ((SECONDS < end)) || die "$3 did not listen on $1 within ${READY_TIMEOUT}s"
        sleep 0.05
    done
}

wait_ready() { # url pid what
    local end=$((SECONDS + READY_TIMEOUT))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "$1" || true) == 200 ]]; do
        kill -0 "$2" 2>/dev/null || die "$3 exited (see $OUT_DIR/logs)"
        ((SECONDS < end)) || die "$3 not ready within ${READY_TIMEOUT}s"
        sleep 0.05
    done
}

# Whether this remora-control serves metrics (releases before --metrics-addr
# do not; the benchmark runs against them too, for before/after figures).
HAS_METRICS=0
if "$BIN/remora-control" --help 2>/dev/null | grep -q -- --metrics-addr; then HAS_METRICS=1; fi

start_control() { # port metrics-port name prefix... -> CONTROL_PID, CONTROL_METRICS
    local data=$TMP/data-$3 metrics=()
    rm -rf "$data"
    mkdir -p "$data"
    CONTROL_METRICS=
    if ((HAS_METRICS)); then
        metrics=(--metrics-addr "127.0.0.1:$2")
        CONTROL_METRICS=127.0.0.1:$2
    fi
    spawn "$OUT_DIR/logs/control-$3.log" "${@:4}" env RUST_LOG=info \
        "$BIN/remora-control" --listen "127.0.0.1:$1" --data-dir "$data" "${metrics[@]}"
    CONTROL_PID=$LAST_PID
    wait_tcp "$1" "$CONTROL_PID" "remora-control ($3)"
}

# Runs a remora-cp-bench subcommand: table to $OUT_DIR/<name>.txt (and the
# terminal), progress to logs/<name>-client.log. In the background with
# `wait`, so that Ctrl-C / SIGTERM reach the trap at once.
bench() { # name prefix... -- args...
    local name=$1 pre=()
    shift
    while [[ $1 != -- ]]; do
        pre+=("$1")
        shift
    done
    shift
    "${pre[@]}" "$BIN/remora-cp-bench" "$@" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/logs/$name-client.log" &
    local pid=$! rc=0
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget "$pid"
    ((rc == 0)) || die "remora-cp-bench $1 failed (see $OUT_DIR/logs/$name-client.log)"
    cat "$OUT_DIR/$name.txt"
}

# ------------------------------------------------------------ scenarios

run_fanout() {
    log "fanout: remora-control + $STREAMS streams over $CHANNELS connections, $REPEAT applies"
    start_control "$CONTROL_FANOUT_PORT" "$METRICS_FANOUT_PORT" fanout "${PRIO[@]}"
    local metrics=()
    [[ -z $CONTROL_METRICS ]] || metrics=(--control-metrics "$CONTROL_METRICS")
    bench fanout "${PRIO[@]}" -- fanout \
        --control "127.0.0.1:$CONTROL_FANOUT_PORT" --control-pid "$CONTROL_PID" "${metrics[@]}" \
        --streams "$STREAMS" --channels "$CHANNELS" --repeat "$REPEAT" \
        --status-poll-ms "$STATUS_POLL_MS" \
        --routes "$FANOUT_ROUTES" --parents "$FANOUT_PARENTS" --backends "$BACKENDS" \
        --out "$OUT_DIR/fanout.json"
    stop_all
}

run_versions() {
    log "versions: remora-control on a $ROUTES-route mesh, $VERSIONS one-route changes"
    start_control "$CONTROL_FANOUT_PORT" "$METRICS_FANOUT_PORT" versions "${PRIO[@]}"
    bench versions "${PRIO[@]}" -- versions \
        --control "127.0.0.1:$CONTROL_FANOUT_PORT" --control-pid "$CONTROL_PID" \
        --versions "$VERSIONS" --routes "$ROUTES" --parents "$PARENTS" --backends "$BACKENDS" \
        --out "$OUT_DIR/versions.json"
    stop_all
}

run_swap() {
    log "swap: remora-proxy on a $ROUTES-route mesh (proxy on core $PROXY_CPU, the rest on core $LOADGEN_CPU)"
    local side=(taskset -c "$LOADGEN_CPU") pin=(taskset -c "$PROXY_CPU")
    # The control plane's apply work shares the load generator's core; it
    # runs at normal priority so the load generator is not delayed by it.
    start_control "$CONTROL_SWAP_PORT" "$METRICS_SWAP_PORT" swap "${side[@]}"
    spawn "$OUT_DIR/logs/upstream.log" "${PRIO[@]}" "${side[@]}" \
        "$BIN/remora-demo" --addr "127.0.0.1:$UPSTREAM_PORT" --name upstream
    local upstream_pid=$LAST_PID
    wait_tcp "$UPSTREAM_PORT" "$upstream_pid" remora-demo
    bench seed "${side[@]}" -- seed --control "127.0.0.1:$CONTROL_SWAP_PORT" \
        --routes "$ROUTES" --parents "$PARENTS" --backends "$BACKENDS" \
        --upstream "127.0.0.1:$UPSTREAM_PORT" --out "$OUT_DIR/seed.json"
    local proxy_log=$OUT_DIR/logs/proxy.log
    spawn "$proxy_log" "${PRIO[@]}" "${pin[@]}" env RUST_LOG=info \
        "$BIN/remora-proxy" --control-plane "http://127.0.0.1:$CONTROL_SWAP_PORT" \
        --node-id bench-proxy --state-dir "$TMP/proxy-state" --log-format json \
        --inbound-addr off --outbound-addr "127.0.0.1:$OUTBOUND_PORT" \
        --admin-addr "127.0.0.1:$ADMIN_PORT" --workers 1
    local proxy_pid=$LAST_PID
    wait_ready "http://127.0.0.1:$ADMIN_PORT/ready" "$proxy_pid" remora-proxy
    bench swap "${PRIO[@]}" "${side[@]}" -- swap \
        --control "127.0.0.1:$CONTROL_SWAP_PORT" --control-pid "$CONTROL_PID" \
        --proxy-log "$proxy_log" --proxy-outbound "127.0.0.1:$OUTBOUND_PORT" --proxy-pid "$proxy_pid" \
        --proxy-core "$PROXY_CPU" \
        --routes "$ROUTES" --parents "$PARENTS" --backends "$BACKENDS" \
        --upstream "127.0.0.1:$UPSTREAM_PORT" \
        --idle-swaps "$IDLE_SWAPS" --rate "$RATE" --duration-s "$DURATION" --warmup-s "$WARMUP" \
        --swap-every-ms "$SWAP_EVERY_MS" \
        --out "$OUT_DIR/swap.json"
    stop_all
}

run_breakdown() {
    log "breakdown: decode / prepare / compile / swap of $ROUTES routes, in process on core $PROXY_CPU"
    bench breakdown "${PRIO[@]}" taskset -c "$PROXY_CPU" -- breakdown \
        --routes "$ROUTES" --parents "$BREAKDOWN_PARENTS" --backends "$BACKENDS" \
        --iters "$BREAKDOWN_ITERS" --out "$OUT_DIR/breakdown.json"
    stop_all
}

for s in $SCENARIOS; do
    "run_$s"
    {
        echo
        [[ $s != swap ]] || cat "$OUT_DIR/seed.txt"
        cat "$OUT_DIR/$s.txt"
    } >>"$OUT_DIR/results.txt"
done
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"
log "done: $OUT_DIR/results.txt, $OUT_DIR/*.json"
