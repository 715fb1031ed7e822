#!/usr/bin/env bash
# Two-hop mesh latency and CPU, with and without mutual TLS. See BENCHMARKS.md,
# "Mutual TLS (two hops)".
#
#   bash bench/mtls.sh                       # builds into ../target-bench, ~2 min
#   BIN_DIR=/path/to/release VARIANTS="direct plain h2c mtls" REPEAT=5 bash bench/mtls.sh
#
# At a fixed request rate (oha, coordinated-omission corrected), these paths
# to the same upstream, in one run (about 2 minutes with the defaults):
#
#   direct  oha -> upstream
#   plain   oha -> web sidecar (outbound) -> api sidecar (inbound) -> upstream,
#           plaintext between the sidecars (api Service `mtls: {mode: Disabled}`)
#   mtls    the same two hops, mTLS between the sidecars (the default, Strict)
#   h2c     (optional, not in the default VARIANTS) as plain, but the api port
#           is `protocol: http2`, so the sidecars speak HTTP/2 over plaintext.
#           Between mTLS sidecars remora negotiates h2 by ALPN (one multiplexed
#           connection), plaintext hops speak HTTP/1.1 (a connection per
#           concurrent request): h2c vs mtls isolates the cost of TLS itself.
#
# Every meshed variant runs the same setup: a fresh remora-control (the CA:
# --bootstrap-tokens, one token per identity, --trust-domain mesh.bench) with the Services `api`
# (port 80, its instance registered by the api sidecar) and `web` (calls: [api]),
# and two remora-proxy sidecars with certificates from it; only the api
# Service's mtls mode (and, for h2c, its port protocol) differs. oha sends
# `Host: api` to web's outbound listener.
# Reported per variant: p50/p90/p99/p99.9, "p99 added" = variant p99 - direct
# p99 of the same repeat, and CPU microseconds per request of the two sidecars
# together (utime + stime from /proc/<pid>/stat across the measured run, divided
# by the 2xx responses). The script fails unless the api sidecar's
# remora_tls_handshakes_total{direction="inbound",result="ok"} is > 0 after the
# mtls variant and 0 after plain / h2c.
#
# Environment (all optional):
#   REPEAT=3           repeats of the whole sweep; the variant order rotates each
#                      repeat; the report shows per-repeat values and medians
#   VARIANTS="direct plain mtls"   subset / order of direct plain h2c mtls
#                      (direct is needed for "added")
#   RATE=1000          requests/s of the fixed-rate run
#   RATE_CONNS=16      client connections oha uses
#   DURATION=10        seconds of the measured fixed-rate run per variant
#   WARMUP=2           seconds of the same load before it, not measured
#   WORKERS=1          --workers of each sidecar
#   PORT_BASE=18400    ports: BASE (remora-control), BASE+1 (upstream nginx),
#                      BASE+2/3 (web outbound/admin), BASE+4/5 (api inbound/admin)
#   LOADGEN_CPU=0      core for oha, the upstream and remora-control
#   PROXY_CPU=1        core for both sidecars
#   WEB_CPU, API_CPU   put one sidecar elsewhere (default PROXY_CPU); "other%"
#                      (CPU used on the sidecars' core by other work during the
#                      run) is only reported when both share PROXY_CPU
#   NICE=-20           nice level of everything started (default -20 as root,
#                      0 otherwise)
#   SCHED=fifo         "fifo" (default as root): during the warm-up and measured
#                      runs the sidecars, the upstream and oha run SCHED_FIFO
#                      priority 1 (chrt), so other work on the machine does not
#                      delay their wake-ups (at 1,000 req/s they use a small part
#                      of a core). "other": nice only.
#   CARGO_TARGET_DIR   where the release binaries are built
#                      (default <repo>/../target-bench)
#   BIN_DIR=path       use remora-control, remoractl and remora-proxy already
#                      built there (no cargo build)
#   OHA_BIN, NGINX_BIN override tool paths (bash bench/install.sh installs them)
#   OUT_DIR=path       results (default bench/out/mtls-<timestamp>): meta.txt,
#                      raw/r<N>-<variant>.{oha.json,proc.json}, logs/,
#                      results.txt, results.json
#   READY_TIMEOUT=30   seconds to wait for a process or the mesh to answer
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

REPEAT=${REPEAT:-3}
VARIANTS=${VARIANTS:-"direct plain mtls"}
RATE=${RATE:-1000}
RATE_CONNS=${RATE_CONNS:-16}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
WORKERS=${WORKERS:-1}
PORT_BASE=${PORT_BASE:-18400}
LOADGEN_CPU=${LOADGEN_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
WEB_CPU=${WEB_CPU:-$PROXY_CPU}
API_CPU=${API_CPU:-$PROXY_CPU}
READY_TIMEOUT=${READY_TIMEOUT:-30}
if [[ $(id -u) -eq 0 ]]; then NICE=${NICE:--20}; else NICE=${NICE:-0}; fi
if [[ $(id -u) -eq 0 ]]; then SCHED=${SCHED:-fifo}; else SCHED=${SCHED:-other}; fi

CONTROL_PORT=$PORT_BASE
UPSTREAM_PORT=$((PORT_BASE + 1))
WEB_OUT_PORT=$((PORT_BASE + 2))
WEB_ADMIN_PORT=$((PORT_BASE + 3))
API_IN_PORT=$((PORT_BASE + 4))
API_ADMIN_PORT=$((PORT_BASE + 5))

log() { printf '[mtls-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

for v in REPEAT RATE RATE_CONNS DURATION WARMUP WORKERS PORT_BASE LOADGEN_CPU PROXY_CPU WEB_CPU API_CPU READY_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be an integer (got '$NICE')"
((REPEAT >= 1 && DURATION >= 1 && RATE >= 1 && RATE_CONNS >= 1 && WORKERS >= 1)) ||
    die "REPEAT, DURATION, RATE, RATE_CONNS and WORKERS must be >= 1"
for v in $VARIANTS; do
    case $v in direct | plain | h2c | mtls) ;; *) die "unknown variant '$v' (direct, plain, h2c, mtls)" ;; esac
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
((LOADGEN_CPU < NCPU && PROXY_CPU < NCPU && WEB_CPU < NCPU && API_CPU < NCPU)) ||
    die "LOADGEN_CPU/PROXY_CPU/WEB_CPU/API_CPU must be below $NCPU"
((LOADGEN_CPU != PROXY_CPU)) || log "WARNING: LOADGEN_CPU == PROXY_CPU; sidecars and load generator share a core"
for tool in ss curl taskset chrt python3 awk getconf; do
    command -v "$tool" >/dev/null || die "$tool is required (bash bench/install.sh)"
done
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
find_tool OHA_BIN oha "$HOME/.cargo/bin/oha"
find_tool NGINX_BIN nginx /usr/sbin/nginx
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------ cleanup
# Every process started is recorded in PIDS and stopped by pid on exit
# (newest first: sidecars before the control plane they stream from).

PIDS=()
LAST_PID=
TMP=$(mktemp -d "${TMPDIR:-/tmp}/remora-mtls-bench.XXXXXX")
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
stop_from() { # stop_from N: stops PIDS[N..] newest first, keeps PIDS[0..N-1]
    local i
    for ((i = ${#PIDS[@]} - 1; i >= $1; i--)); do stop_pid "${PIDS[i]}"; done
    PIDS=("${PIDS[@]:0:$1}")
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_from 0
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------ checks

for p in "$CONTROL_PORT" "$UPSTREAM_PORT" "$WEB_OUT_PORT" "$WEB_ADMIN_PORT" "$API_IN_PORT" "$API_ADMIN_PORT"; do
    [[ -z $(ss -Htln "sport = :$p") ]] || die "port $p is in use (move the benchmark with PORT_BASE=...)"
done

# ------------------------------------------------------------ build

if [[ -n ${BIN_DIR:-} ]]; then
    BIN=$BIN_DIR
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd "$REPO/.." && pwd)/target-bench}
    log "building release binaries into $CARGO_TARGET_DIR"
    (cd "$REPO" && cargo build --release --quiet \
        -p remora-proxy -p remora-control --bin remora-proxy --bin remora-control --bin remoractl)
    BIN=$CARGO_TARGET_DIR/release
fi
for b in remora-control remoractl remora-proxy; do
    [[ -x $BIN/$b ]] || die "$BIN/$b not found"
done

OUT_DIR=${OUT_DIR:-$REPO/bench/out/mtls-$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT_DIR/raw" "$OUT_DIR/logs"
{
    echo "date: $(date -Is)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (dirty tree)')"
    echo "host: $(uname -srm); $NCPU cores; $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "bin: $BIN"
    for b in remora-control remora-proxy; do echo "$b: $("$BIN/$b" --version 2>/dev/null || echo ?)"; done
    echo "oha: $OHA_BIN $("$OHA_BIN" --version 2>/dev/null)"
    echo "nginx: $NGINX_BIN $("$NGINX_BIN" -v 2>&1)"
    echo "variants: $VARIANTS REPEAT=$REPEAT RATE=$RATE RATE_CONNS=$RATE_CONNS DURATION=$DURATION WARMUP=$WARMUP WORKERS=$WORKERS"
    echo "cores: web sidecar $WEB_CPU, api sidecar $API_CPU; oha, upstream, remora-control $LOADGEN_CPU; nice $NICE; sched $SCHED"
    echo "clk_tck: $CLK_TCK"
} >"$OUT_DIR/meta.txt"
log "results go to $OUT_DIR"

# ------------------------------------------------------------ helpers

# Starts a process in the background (nice/taskset/env exec, so $! is the
# process itself), logs to $OUT_DIR/logs/$1.log, pid in LAST_PID.
spawn() {
    local name=$1
    shift
    env -u REMORA_CONFIG -u REMORA_CONTROL_PLANE -u REMORA_NODE_ID -u REMORA_SERVICE \
        -u REMORA_BOOTSTRAP_TOKEN_FILE -u REMORA_ACCESS_LOG NO_COLOR=1 "$@" \
        >>"$OUT_DIR/logs/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

alive() { kill -0 "$1" 2>/dev/null; }

wait_http() { # url pid what [body]: until 200 (and that body, if given)
    local end=$((SECONDS + READY_TIMEOUT)) out body
    while :; do
        out=$(curl -s --max-time 1 -H 'Host: api' -w '\n%{http_code}' "$1" 2>/dev/null || true)
        body=${out%$'\n'*}
        body=${body%$'\n'}
        if [[ ${out##*$'\n'} == 200 ]] && [[ -z ${4:-} || $body == "$4" ]]; then return 0; fi
        alive "$2" || die "$3 exited (see $OUT_DIR/logs)"
        ((SECONDS < end)) || die "$3 not ready at $1 within ${READY_TIMEOUT}s (last answer: ${out//$'\n'/ / status })"
        sleep 0.05
    done
}

descendants() { # pid and its descendants
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { pid[NR] = $1; par[NR] = $2 }
        END {
            seen[root] = 1; print root
            do {
                changed = 0
                for (i = 1; i <= NR; i++)
                    if (!(pid[i] in seen) && (par[i] in seen)) { seen[pid[i]] = 1; print pid[i]; changed = 1 }
            } while (changed)
        }'
}

cpu_ticks() { # utime + stime (clock ticks) of one pid, all its threads
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

core_busy() { # busy jiffies of core $1 (everything but idle and iowait)
    awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

metric() { # metric admin-port name label...: sum of the matching samples
    local port=$1 name=$2
    shift 2
    curl -s --max-time 2 "http://127.0.0.1:$port/metrics" | awk -v name="$name" -v labels="$*" '
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

oha() { # oha seconds url out.json
    local pid rc=0
    "${RATE_PRIO[@]}" taskset -c "$LOADGEN_CPU" "$OHA_BIN" --no-tui --output-format json --latency-correction \
        -q "$RATE" -z "$1s" -c "$RATE_CONNS" -w --http-version 1.1 --worker-threads 1 --host api \
        "$2" >"$3" 2>"$3.stderr" </dev/null &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    unset 'PIDS[${#PIDS[@]}-1]'
    ((rc == 0)) || die "oha failed (rc $rc, see $3.stderr)"
}

# ------------------------------------------------------------ upstream

sed -e "s|@TMP@|$TMP|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" "$BENCH_DIR/nginx-upstream.conf" >"$TMP/upstream.conf"
spawn upstream "${PRIO[@]}" taskset -c "$LOADGEN_CPU" "$NGINX_BIN" -p "$TMP" -c "$TMP/upstream.conf" -e "$TMP/upstream-error.log"
UPSTREAM_PID=$LAST_PID
wait_http "http://127.0.0.1:$UPSTREAM_PORT/" "$UPSTREAM_PID" "upstream nginx" ok

# ------------------------------------------------------------ the mesh

# One bootstrap token per identity; the control plane keeps their hashes.
for sa in api web; do
    "$BIN/remoractl" token "default/$sa" --tokens-file "$TMP/tokens" >"$TMP/$sa.token" 2>/dev/null
done
WEB_PID=
API_PID=

start_mesh() { # start_mesh rep variant: control plane, config, both sidecars
    local rep=$1 v=$2 dir=$TMP/r$1-$2 mode="" proto=""
    mkdir -p "$dir"
    [[ $v == mtls ]] || mode=$'\n  mtls: {mode: Disabled}'
    [[ $v != h2c ]] || proto=", protocol: http2"
    spawn "r$rep-$v-control" env RUST_LOG=info "${PRIO[@]}" taskset -c "$LOADGEN_CPU" \
        "$BIN/remora-control" --listen "127.0.0.1:$CONTROL_PORT" --data-dir "$dir/data" \
        --bootstrap-tokens "$TMP/tokens" --trust-domain mesh.bench --cert-lifetime 1h
    local cp=$LAST_PID end=$((SECONDS + READY_TIMEOUT))
    until "$BIN/remoractl" --server "http://127.0.0.1:$CONTROL_PORT" status >/dev/null 2>&1; do
        alive "$cp" || die "remora-control exited (see $OUT_DIR/logs/r$rep-$v-control.log)"
        ((SECONDS < end)) || die "remora-control did not answer within ${READY_TIMEOUT}s"
        sleep 0.05
    done
    cat >"$dir/mesh.yaml" <<EOF
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80$proto}]$mode
---
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
  calls: [api]
EOF
    "$BIN/remoractl" --server "http://127.0.0.1:$CONTROL_PORT" apply -f "$dir/mesh.yaml" --author mtls-bench \
        >>"$OUT_DIR/logs/r$rep-$v-control.log" 2>&1 || die "remoractl apply failed"
    # Plaintext to the control plane on loopback: a local benchmark, said so.
    local common=(--control-plane "http://127.0.0.1:$CONTROL_PORT" --insecure-dev-plaintext
        --workers "$WORKERS" --control-plane-max-backoff 300ms)
    spawn "r$rep-$v-api" env RUST_LOG=warn "${PRIO[@]}" taskset -c "$API_CPU" "$BIN/remora-proxy" \
        "${common[@]}" --node-id api-1 --service api --state-dir "$dir/state-api" \
        --bootstrap-token-file "$TMP/api.token" \
        --inbound-addr "127.0.0.1:$API_IN_PORT" --app-addr "127.0.0.1:$UPSTREAM_PORT" \
        --outbound-addr off --admin-addr "127.0.0.1:$API_ADMIN_PORT"
    API_PID=$LAST_PID
    spawn "r$rep-$v-web" env RUST_LOG=warn "${PRIO[@]}" taskset -c "$WEB_CPU" "$BIN/remora-proxy" \
        "${common[@]}" --node-id web-1 --service web --state-dir "$dir/state-web" \
        --bootstrap-token-file "$TMP/web.token" \
        --inbound-addr off --outbound-addr "127.0.0.1:$WEB_OUT_PORT" --admin-addr "127.0.0.1:$WEB_ADMIN_PORT"
    WEB_PID=$LAST_PID
    wait_http "http://127.0.0.1:$API_ADMIN_PORT/ready" "$API_PID" "api sidecar"
    wait_http "http://127.0.0.1:$WEB_ADMIN_PORT/ready" "$WEB_PID" "web sidecar"
    # Until the api instance is registered and web has it (and, for mtls,
    # both certificates): a 200 "ok" through both hops.
    wait_http "http://127.0.0.1:$WEB_OUT_PORT/" "$WEB_PID" "the two-hop path web -> api -> upstream" ok
    local p
    for p in "$WEB_PID" "$API_PID"; do
        [[ $(cat "/proc/$p/comm") == remora-proxy ]] || die "pid $p is $(cat "/proc/$p/comm"), not remora-proxy"
    done
}

# ------------------------------------------------------------ one variant

run_variant() { # run_variant rep variant
    local rep=$1 v=$2 pfx=$OUT_DIR/raw/r$1-$2 url mark=${#PIDS[@]}
    local proxies=() up_pids=() t0w t0a t1w t1a b0 b1 hs_in0 hs_in1 hs_out0 hs_out1 p
    if [[ $v == direct ]]; then
        url="http://127.0.0.1:$UPSTREAM_PORT/"
    else
        start_mesh "$rep" "$v"
        url="http://127.0.0.1:$WEB_OUT_PORT/"
        proxies=("$WEB_PID" "$API_PID")
    fi
    mapfile -t up_pids < <(descendants "$UPSTREAM_PID")
    set_fifo on "${proxies[@]}" "${up_pids[@]}"
    if ((WARMUP > 0)); then
        log "r$rep $v: warm-up ${WARMUP}s at $RATE req/s"
        oha "$WARMUP" "$url" "$TMP/warmup.json"
    fi
    if [[ $v != direct ]]; then
        t0w=$(cpu_ticks "$WEB_PID") t0a=$(cpu_ticks "$API_PID")
        hs_in0=$(metric "$API_ADMIN_PORT" remora_tls_handshakes_total 'direction="inbound"' 'result="ok"')
        hs_out0=$(metric "$WEB_ADMIN_PORT" remora_tls_handshakes_total 'direction="outbound"' 'result="ok"')
    fi
    b0=$(core_busy "$PROXY_CPU")
    log "r$rep $v: oha -q $RATE -c $RATE_CONNS -z ${DURATION}s --latency-correction $url (Host: api)"
    oha "$DURATION" "$url" "$pfx.oha.json"
    b1=$(core_busy "$PROXY_CPU")
    set_fifo off "${proxies[@]}" "${up_pids[@]}"
    local own=0 hs_err=0 conns=0 other
    if [[ $v != direct ]]; then
        t1w=$(cpu_ticks "$WEB_PID") t1a=$(cpu_ticks "$API_PID")
        own=$((t1w - t0w + t1a - t0a))
        hs_in1=$(metric "$API_ADMIN_PORT" remora_tls_handshakes_total 'direction="inbound"' 'result="ok"')
        hs_out1=$(metric "$WEB_ADMIN_PORT" remora_tls_handshakes_total 'direction="outbound"' 'result="ok"')
        hs_err=$(metric "$API_ADMIN_PORT" remora_tls_handshakes_total 'direction="inbound"' 'result="error"')
        # Pooled connections web -> api (h2: one, multiplexed; HTTP/1.1: about
        # one per concurrent request).
        conns=$(ss -Htn state established "( dport = :$API_IN_PORT )" | wc -l)
        for p in "${proxies[@]}"; do alive "$p" || die "r$rep $v: a sidecar exited during the run"; done
        printf '{"ticks_web":%d,"ticks_api":%d,"hs_api_in_ok":%d,"hs_api_in_ok_run":%d,"hs_web_out_ok":%d,"hs_web_out_ok_run":%d,"hs_api_in_error":%d,"conns_web_api":%d,' \
            $((t1w - t0w)) $((t1a - t0a)) "$hs_in1" $((hs_in1 - hs_in0)) "$hs_out1" $((hs_out1 - hs_out0)) "$hs_err" "$conns" >"$pfx.proc.json"
    else
        printf '{' >"$pfx.proc.json"
    fi
    # Other work on the sidecars' core (only meaningful when both are on it).
    other=$((b1 - b0 - own))
    ((WEB_CPU == PROXY_CPU && API_CPU == PROXY_CPU)) || other=null
    printf '"variant":"%s","repeat":%d,"clk_tck":%d,"proxy_core_busy_ticks":%d,"proxy_core_other_ticks":%s,"duration_s":%d}\n' \
        "$v" "$rep" "$CLK_TCK" $((b1 - b0)) "$other" "$DURATION" >>"$pfx.proc.json"

    # Is the variant what it claims to be?
    case $v in
    mtls)
        ((hs_in1 > 0)) || die "r$rep mtls: api sidecar counted no inbound TLS handshake (remora_tls_handshakes_total{direction=\"inbound\",result=\"ok\"} = $hs_in1): the mtls variant did not use mTLS"
        ((hs_out1 > 0)) || die "r$rep mtls: web sidecar counted no outbound TLS handshake"
        ;;
    plain | h2c)
        ((hs_in1 == 0 && hs_out1 == 0)) || die "r$rep $v: TLS handshakes counted (api inbound $hs_in1, web outbound $hs_out1): the $v variant used TLS"
        ;;
    esac
    if [[ $v != direct ]]; then
        log "r$rep $v: handshakes api inbound ok $hs_in1 ($((hs_in1 - hs_in0)) during the run), errors $hs_err; web outbound ok $hs_out1; $conns connection(s) web -> api"
        stop_from "$mark"
    fi
}

# ------------------------------------------------------------ sweep

read -r -a VLIST <<<"$VARIANTS"
log "web sidecar on core $WEB_CPU, api sidecar on core $API_CPU; oha, upstream nginx and remora-control on core $LOADGEN_CPU; sched $SCHED, nice $NICE"
for ((rep = 1; rep <= REPEAT; rep++)); do
    n=${#VLIST[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${VLIST[(i + rep - 1) % n]}"); done
    log "repeat $rep/$REPEAT: ${order[*]}"
    for v in "${order[@]}"; do
        alive "$UPSTREAM_PID" || die "upstream died"
        run_variant "$rep" "$v"
    done
done
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"

# ------------------------------------------------------------ report

python3 - "$OUT_DIR" "$RATE" <<'PY' | tee "$OUT_DIR/results.txt"
import glob, json, os, statistics, sys

out, rate = sys.argv[1], int(sys.argv[2])
runs = {}
for pj in sorted(glob.glob(os.path.join(out, "raw", "r*-*.proc.json"))):
    p = json.load(open(pj))
    o = json.load(open(pj.replace(".proc.json", ".oha.json")))
    lp = o["latencyPercentiles"]
    codes = {str(k): int(v) for k, v in (o.get("statusCodeDistribution") or {}).items()}
    ok = sum(n for c, n in codes.items() if c.startswith("2"))
    r = dict(p)
    r.update(
        p50=lp["p50"] * 1e3, p90=lp["p90"] * 1e3, p99=lp["p99"] * 1e3, p999=lp["p99.9"] * 1e3,
        ok=ok, non2xx=sum(codes.values()) - ok,
        errors=sum(int(n) for n in (o.get("errorDistribution") or {}).values()),
        rps=o["summary"]["requestsPerSec"],
    )
    if "ticks_web" in p and ok:
        us = 1e6 / p["clk_tck"] / ok
        r["cpu_us_web"] = p["ticks_web"] * us
        r["cpu_us_api"] = p["ticks_api"] * us
        r["cpu_us"] = (p["ticks_web"] + p["ticks_api"]) * us
    o_t = p["proxy_core_other_ticks"]
    r["other_pct"] = None if o_t is None else 100.0 * max(0, o_t) / p["clk_tck"] / p["duration_s"]
    runs[(p["repeat"], p["variant"])] = r

reps = sorted({k[0] for k in runs})
variants = [v for v in ("direct", "plain", "h2c", "mtls") if any(k[1] == v for k in runs)]
for (rep, v), r in runs.items():
    d = runs.get((rep, "direct"))
    if v != "direct" and d:
        r["added_p50"] = r["p50"] - d["p50"]
        r["added_p99"] = r["p99"] - d["p99"]
    for base in ("plain", "h2c"):
        b = runs.get((rep, base))
        if v == "mtls" and b:
            r[f"mtls_minus_{base}_p99"] = r["p99"] - b["p99"]
            if "cpu_us" in r and "cpu_us" in b:
                r[f"cpu_ratio_{base}"] = r["cpu_us"] / b["cpu_us"]

def med(v, key):
    xs = [runs[(rep, v)][key] for rep in reps if (rep, v) in runs and key in runs[(rep, v)]]
    return statistics.median(xs) if xs else None

def f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)

print(f"\nPer run ({rate} req/s; latency ms, coordinated-omission corrected; CPU = both sidecars)")
print("rep variant  p50    p90    p99    p99.9  added p99  CPU us/req (web+api)   2xx    non2xx err  TLS hs api-in (run)  conns  other% proxy core")
for rep in reps:
    for v in variants:
        r = runs.get((rep, v))
        if not r:
            continue
        cpu = "-" if "cpu_us" not in r else f"{r['cpu_us']:.1f} ({r['cpu_us_web']:.1f}+{r['cpu_us_api']:.1f})"
        hs = "-" if "hs_api_in_ok" not in r else f"{r['hs_api_in_ok']} ({r['hs_api_in_ok_run']})"
        conns = str(r.get("conns_web_api", "-"))
        print(f"{rep:<3} {v:<8} {r['p50']:.3f}  {r['p90']:.3f}  {r['p99']:.3f}  {r['p999']:.3f}  "
              f"{f(r.get('added_p99'), '{:+.3f}'):>9}  {cpu:<22} {r['ok']:<6} {r['non2xx']:<6} {r['errors']:<4} "
              f"{hs:<20} {conns:<6} {f(r['other_pct'], '{:.0f}')}")

print(f"\nMedians over {len(reps)} repeat(s); 'added' = median of the per-repeat differences to direct")
print("variant  p50    p99    p99.9  added p50  added p99  CPU us/req  web   api")
for v in variants:
    print(f"{v:<8} {f(med(v, 'p50'))}  {f(med(v, 'p99'))}  {f(med(v, 'p999'))}  "
          f"{f(med(v, 'added_p50'), '{:+.3f}'):>9}  {f(med(v, 'added_p99'), '{:+.3f}'):>9}  "
          f"{f(med(v, 'cpu_us'), '{:.1f}'):>10}  {f(med(v, 'cpu_us_web'), '{:.1f}'):>4}  {f(med(v, 'cpu_us_api'), '{:.1f}'):>4}")
summary = {
    "added_p99_ms": {v: med(v, "added_p99") for v in variants if v != "direct"},
    "cpu_us_per_req": {v: med(v, "cpu_us") for v in variants if v != "direct"},
}
print()
for base in ("plain", "h2c"):
    d, c = med("mtls", f"mtls_minus_{base}_p99"), med("mtls", f"cpu_ratio_{base}")
    summary[f"mtls_minus_{base}_p99_ms"], summary[f"cpu_ratio_mtls_over_{base}"] = d, c
    if c is not None:
        print(f"CPU per request, mtls / {base} (median of per-repeat ratios): {c:.2f}")
    if d is not None:
        print(f"p99 mtls - {base} (median of per-repeat differences): {d:+.3f} ms")
a = summary["added_p99_ms"].get("mtls")
if a is not None:
    print(f"p99 added by two mTLS hops: {a:+.3f} ms; target <= 0.200 ms: {'met' if a <= 0.2 else 'NOT met'} "
          f"(Istio publishes 0.298 ms for its two sidecars)")
bad = [f"r{k[0]} {k[1]}: {r['non2xx']} non-2xx, {r['errors']} errors" for k, r in runs.items() if r["non2xx"] or r["errors"]]
if bad:
    print("FAILED REQUESTS: " + "; ".join(bad))
json.dump({"runs": [dict(r) for r in runs.values()], "summary": summary},
          open(os.path.join(out, "results.json"), "w"), indent=1)
PY
log "done: $OUT_DIR/results.txt, $OUT_DIR/results.json"
if grep -q '^FAILED REQUESTS' "$OUT_DIR/results.txt"; then
    die "some requests failed (see results.txt)"
fi
