#!/usr/bin/env bash
# Per-connection memory of remora-proxy and nginx, side by side in one run.
# See BENCHMARKS.md, "Per-connection memory".
#
#   bash bench/memory.sh                     # builds remora-proxy (release), then ~5 min
#   REMORA_BIN=/path/to/remora-proxy REPEAT=5 bash bench/memory.sh
#   REMORA_B_BIN=/path/to/older/remora-proxy bash bench/memory.sh   # before/after in one run
#
# Both proxies forward to the same upstream (bench/nginx-upstream.conf, an
# nginx answering 200 "ok\n"). nginx runs bench/nginx.conf (the load
# benchmark's: one worker, keep-alive both sides). remora-proxy runs with a
# file config (a Service `app` whose endpoint is the upstream) and is
# reached on its outbound listener with `Host: app`, as the local app would
# (REMORA_LISTENER=inbound uses the inbound listener with --app-addr
# instead, as bench/run.sh does). remora gets --header-read-timeout 60s and
# --idle-timeout 300s, nginx's client_header_timeout and the keepalive_timeout
# of bench/nginx.conf, so that no connection is closed by a timer during a
# phase; every other setting is the default, --workers 1 included.
#
# Each target is started fresh; a few requests warm it up; then, per cycle
# (CYCLES, on the same process), RSS (VmRSS of /proc/<pid>/status, summed
# over the target's processes: nginx master + worker) is read:
#
#   base    before the cycle
#   idle    after CONNS connections were opened one after another, each sent
#           one GET, read its response, and stays open (HTTP/1.1 keep-alive)
#   half    after CONNS more connections each sent HEAD_BYTES of a request
#           head (request line and headers, no blank line) and stopped
#   closed  after the client closed all of them and the proxy's side of every
#           one is gone, and LATER seconds more (allocators that give memory
#           back do it on a timer: jemalloc's decay, mimalloc's purge delay)
#
# per idle connection = (idle - base) / CONNS, per half-open request =
# (half - idle) / CONNS, retained = closed - base. Before reading RSS the
# client waits until the proxy has accepted every connection and read every
# byte sent (each server-side socket's receive queue in /proc/net/tcp is
# empty), then SETTLE seconds. The first cycle runs on a fresh process; the
# second shows what the process does with memory it already had (the spread
# the issue describes). REPEAT repeats the whole sweep (fresh processes, the
# target order rotates); the table shows medians and ratios to nginx.
#
# Then, for each remora target (bench/nginx.conf speaks no h2c), HTTP/2 with
# a client that stops reading, on a fresh process: H2_CONNS h2c connections
# (prior knowledge) each open every stream the proxy allows
# (--max-concurrent-streams), each GET /big (H2_BODY_BYTES from the upstream),
# grant the proxy all the flow-control window HTTP/2 can express, and never
# read. Pinned = VmRSS once it has stopped growing (no move over 256 KiB for
# 2 s) - before; retained = LATER s after the client closed them.
#
# Environment (all optional):
#   CONNS=2000         connections per phase (the client needs 2*CONNS+ open
#                      files, the proxy as many; lowered, with a warning, if
#                      `ulimit -n` cannot be raised far enough)
#   HEAD_BYTES=2000    bytes of the half-sent request head
#   CYCLES=2           cycles per started process
#   H2_CONNS=2         connections of the HTTP/2 phase (0: skip it)
#   H2_BODY_BYTES=1048576   size of each response in the HTTP/2 phase
#   REPEAT=3           repeats of the sweep
#   SETTLE=1           seconds to wait before each RSS reading
#   LATER=10           seconds after the close before the "closed" reading
#   TARGETS="remora nginx"   add remora-b to measure REMORA_B_BIN too
#   REMORA_BIN=path    remora-proxy to measure; when unset the script runs
#                      `cargo build --release -p remora-proxy` and uses
#                      ${CARGO_TARGET_DIR:-<repo>/target}/release/remora-proxy
#   REMORA_B_BIN=path  a second remora-proxy (target remora-b, e.g. a build
#                      from before a change); adds remora-b to TARGETS
#   REMORA_ENV="K=V .."  extra environment for remora (e.g. MALLOC_ARENA_MAX=1,
#                      LD_PRELOAD=...); REMORA_B_ENV likewise for remora-b
#   REMORA_LISTENER=outbound   or inbound (see above)
#   NGINX_BIN          nginx binary (default: from PATH or /usr/sbin/nginx)
#   PORT_BASE=18500    ports: BASE (upstream), BASE+1 (nginx), BASE+2..4
#                      (remora outbound, inbound, admin), BASE+5..7 (remora-b)
#   READY_TIMEOUT=30   seconds to wait for a process to become ready
#   OUT_DIR=path       where results go (default bench/out/memory-<timestamp>)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

CONNS=${CONNS:-2000}
HEAD_BYTES=${HEAD_BYTES:-2000}
CYCLES=${CYCLES:-2}
H2_CONNS=${H2_CONNS:-2}
H2_BODY_BYTES=${H2_BODY_BYTES:-1048576}
REPEAT=${REPEAT:-3}
SETTLE=${SETTLE:-1}
LATER=${LATER:-10}
TARGETS=${TARGETS:-"remora nginx"}
REMORA_LISTENER=${REMORA_LISTENER:-outbound}
PORT_BASE=${PORT_BASE:-18500}
READY_TIMEOUT=${READY_TIMEOUT:-30}
if [[ -n ${REMORA_B_BIN:-} && " $TARGETS " != *" remora-b "* ]]; then TARGETS="$TARGETS remora-b"; fi

UPSTREAM_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))

log() { printf '[memory %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in CONNS HEAD_BYTES CYCLES REPEAT PORT_BASE READY_TIMEOUT H2_CONNS H2_BODY_BYTES; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
for v in SETTLE LATER; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds (got '${!v}')"
done
((CONNS >= 1 && CYCLES >= 1 && REPEAT >= 1)) || die "CONNS, CYCLES and REPEAT must be >= 1"
((HEAD_BYTES >= 32)) || die "HEAD_BYTES must be >= 32"
for t in $TARGETS; do
    case $t in remora | remora-b | nginx) ;; *) die "unknown target '$t' in TARGETS" ;; esac
done
case $REMORA_LISTENER in outbound | inbound) ;; *) die "REMORA_LISTENER must be outbound or inbound" ;; esac
wants() { [[ " $TARGETS " == *" $1 "* ]]; }
[[ -z ${REMORA_B_BIN:-} ]] && wants remora-b && die "target remora-b needs REMORA_B_BIN"

# shellcheck source=bench/lib.sh
. "$BENCH_DIR/lib.sh"
for t in curl python3 ss awk; do
    command -v "$t" >/dev/null || die "$t not found; run: bash bench/install.sh"
done
find_tool NGINX_BIN nginx /usr/sbin/nginx

# ---------------------------------------------------------------- open files
# The client holds 2*CONNS sockets, each proxy as many plus its upstream
# connections and its own files. Raise the soft limit as far as the hard
# one allows (raising the hard limit needs privileges this sandbox may not
# have); if that is not enough, measure fewer connections and say so.
want_files=$((2 * CONNS + 256))
if (($(ulimit -n) < want_files)); then
    hard=$(ulimit -Hn)
    [[ $hard == unlimited ]] && hard=$want_files
    ulimit -n "$((hard < want_files ? hard : want_files))" 2>/dev/null || true
fi
if (($(ulimit -n) < want_files)); then
    fit=$((($(ulimit -n) - 256) / 2))
    ((fit >= 100)) || die "open files limit $(ulimit -n) is too low"
    log "WARNING: open files limit is $(ulimit -n) (hard $(ulimit -Hn)); measuring $fit connections per phase instead of $CONNS"
    CONNS=$fit
fi

# ---------------------------------------------------------------- ports
PORTS=("$UPSTREAM_PORT" "$NGINX_PORT" $((PORT_BASE + 2)) $((PORT_BASE + 3)) $((PORT_BASE + 4)) $((PORT_BASE + 5)) $((PORT_BASE + 6)) $((PORT_BASE + 7)))
for p in "${PORTS[@]}"; do
    [[ -z $(ss -Hltn "sport = :$p") ]] || die "port $p is already in use (set PORT_BASE to move the block $PORT_BASE-$((PORT_BASE + 7)))"
done

# ---------------------------------------------------------------- processes
# Every process started is recorded in STARTED and stopped by pid (with its
# descendants) on exit, error or Ctrl-C.
STARTED=()
LAST_PID=

descendants() { # pid and all its descendants, one per line
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

alive() { kill -0 "$1" 2>/dev/null; }

stop_tree() {
    local root=$1 pids p i any
    alive "$root" || { wait "$root" 2>/dev/null || true; return 0; }
    mapfile -t pids < <(descendants "$root")
    kill -TERM "$root" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        any=0
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

stop_last() { # stop the most recently started process
    local n=${#STARTED[@]}
    ((n)) || return 0
    stop_tree "${STARTED[n - 1]}"
    unset 'STARTED[n-1]'
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

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$@" 2>/dev/null || true; }

wait_ok() { # wait_ok NAME PID CURL-ARGS... : poll until 200, with a deadline
    local name=$1 pid=$2 deadline=$((SECONDS + READY_TIMEOUT))
    shift 2
    while [[ $(http_code "$@") != 200 ]]; do
        alive "$pid" || { tail -n 20 "$TMP/$name.log" >&2 || true; die "$name exited during start-up"; }
        ((SECONDS < deadline)) || { tail -n 20 "$TMP/$name.log" >&2 || true; die "$name not ready after ${READY_TIMEOUT}s"; }
        sleep 0.05
    done
}

render() { # render TEMPLATE OUT PORT
    sed -e "s|@TMP@|$TMP|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" -e "s|@PORT@|$3|g" "$1" >"$2"
    if grep -q '@[A-Z_]*@' "$2"; then die "unsubstituted placeholder in $2"; fi
}

OUT=${OUT_DIR:-$BENCH_DIR/out/memory-$(date +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/remora-memory.XXXXXX)
trap 'cleanup; rm -rf "$TMP"' EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- remora binary
if wants remora && [[ -z ${REMORA_BIN:-} ]]; then
    log "building remora-proxy: cargo build --release -p remora-proxy (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-<repo>/target})"
    (cd "$REPO" && cargo build --release -p remora-proxy) >"$OUT/remora-build.log" 2>&1 ||
        { tail -n 30 "$OUT/remora-build.log" >&2; die "cargo build failed (see $OUT/remora-build.log)"; }
    td=${CARGO_TARGET_DIR:-$REPO/target}
    [[ $td == /* ]] || td=$REPO/$td
    REMORA_BIN=$td/release/remora-proxy
fi
wants remora && { [[ -x $REMORA_BIN ]] || die "REMORA_BIN=$REMORA_BIN is not executable"; }
wants remora-b && { [[ -x $REMORA_B_BIN ]] || die "REMORA_B_BIN=$REMORA_B_BIN is not executable"; }

cat >"$TMP/mesh.yaml" <<EOF
# The one Service both remora targets route to: the upstream nginx.
kind: Service
metadata: {name: app}
spec:
  ports: [{port: 80, protocol: http}]
  endpoints: [{address: 127.0.0.1, port: $UPSTREAM_PORT}]
EOF

# ---------------------------------------------------------------- the client
# Opens the connections, waits on /proc/net/tcp, reads RSS, writes one JSON
# line per cycle; `report` turns those lines into the tables.
cat >"$TMP/memclient.py" <<'PY'
import json, os, socket, statistics, sys, time

def rss_kb(pids):
    total = {"rss": 0, "anon": 0}
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total["rss"] += int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    total["anon"] += int(line.split()[1])
    return total

def server_sockets(port):
    """(count, bytes unread) over the proxy's side of client connections."""
    n = unread = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) != port or f[3] in ("0A", "06"):
                continue  # another port, LISTEN, TIME_WAIT
            n += 1
            unread += int(f[4].split(":")[1], 16)
    return n, unread

def wait_sockets(port, want, what, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        n, unread = server_sockets(port)
        if n == want and unread == 0:
            return
        if time.monotonic() > deadline:
            sys.exit(f"{what}: {n} server-side sockets, {unread} bytes unread; wanted {want} read")
        time.sleep(0.05)

def request(port, host):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: memory-bench\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("connection closed before a response")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        sys.exit(f"unexpected response: {lines[0]}")
    length = next((int(l.split(":", 1)[1]) for l in lines[1:] if l.lower().startswith("content-length:")), None)
    if length is None:
        sys.exit("response without content-length")
    while len(body) < length:
        body += s.recv(4096)
    return s

def half_head(host, size):
    head = f"GET /half HTTP/1.1\r\nHost: {host}\r\nUser-Agent: memory-bench\r\nAccept: */*\r\n"
    pad = "X-Pad: " + "a" * 64 + "\r\n"
    while len(head) + len(pad) <= size:
        head += pad
    head += "X-Last: " + "b" * max(0, size - len(head) - 8)
    return head.encode()[:size]

def measure(args):
    target, port, host, pids = args[0], int(args[1]), args[2], [int(p) for p in args[3].split(",")]
    conns, head_bytes, cycles, settle, rep = int(args[4]), int(args[5]), int(args[6]), float(args[7]), int(args[8])
    later = float(args[9])
    for _ in range(20):  # warm-up: a few requests on short connections
        request(port, host).close()
    wait_sockets(port, 0, "warm-up")
    head = half_head(host, head_bytes)
    for cycle in range(1, cycles + 1):
        time.sleep(settle)
        base = rss_kb(pids)
        idle = [request(port, host) for _ in range(conns)]
        wait_sockets(port, conns, "idle")
        time.sleep(settle)
        r_idle = rss_kb(pids)
        half = []
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head)
            half.append(s)
        wait_sockets(port, 2 * conns, "half-open")
        time.sleep(settle)
        r_half = rss_kb(pids)
        for s in idle + half:
            s.close()
        wait_sockets(port, 0, "closing")
        time.sleep(settle)
        r_closed = rss_kb(pids)
        time.sleep(max(0.0, later - settle))
        r_later = rss_kb(pids)
        print(json.dumps({"target": target, "repeat": rep, "cycle": cycle, "conns": conns,
                          "head_bytes": head_bytes, "later_s": later, "base": base, "idle": r_idle,
                          "half": r_half, "closed": r_closed, "later": r_later}), flush=True)

def h2_frame(ftype, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload

def hpack_literal(name, value):
    # literal header field without indexing, new name, no Huffman coding
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v

def h2_stuck_conn(port, host, path):
    """An h2c connection that opens every stream the server allows, each
    asking for a large body, grants the server all the window it can use,
    and then never reads again. Returns (socket, streams opened)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    big = 2**31 - 1
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
              + h2_frame(4, 0, 0, (4).to_bytes(2, "big") + big.to_bytes(4, "big"))
              + h2_frame(8, 0, 0, (big - 65535).to_bytes(4, "big")))
    buf, streams = b"", None
    while streams is None:  # the server's SETTINGS: how many streams it allows
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("h2: connection closed during the handshake")
        buf += chunk
        while len(buf) >= 9:
            length, ftype, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            if len(buf) < 9 + length:
                break
            payload, buf = buf[9:9 + length], buf[9 + length:]
            if ftype == 4 and not flags & 1:
                streams = 100  # RFC 9113 leaves it unlimited; hyper's default
                for i in range(0, len(payload), 6):
                    if int.from_bytes(payload[i:i + 2], "big") == 3:
                        streams = int.from_bytes(payload[i + 2:i + 6], "big")
    s.sendall(h2_frame(4, 1, 0))  # SETTINGS ACK
    block = (hpack_literal(":method", "GET") + hpack_literal(":scheme", "http")
             + hpack_literal(":path", path) + hpack_literal(":authority", host))
    s.sendall(b"".join(h2_frame(1, 0x5, 2 * i + 1, block) for i in range(streams)))
    return s, streams

def wait_stable(pids, quiet=2.0, timeout=60.0):
    """RSS once it has not moved by more than 256 KiB for `quiet` seconds."""
    deadline, last, since = time.monotonic() + timeout, rss_kb(pids)["rss"], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_kb(pids)["rss"]
        if abs(now - last) > 256:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return rss_kb(pids)

def h2stuck(args):
    target, port, host, pids = args[0], int(args[1]), args[2], [int(p) for p in args[3].split(",")]
    conns, body, later, rep = int(args[4]), int(args[5]), float(args[6]), int(args[7])
    request(port, host).close()
    time.sleep(1)
    base = rss_kb(pids)
    socks, streams = [], 0
    for _ in range(conns):
        s, n = h2_stuck_conn(port, host, "/big")
        socks.append(s)
        streams += n
    stuck = wait_stable(pids)
    for s in socks:
        s.close()
    wait_sockets(port, 0, "h2 closing")
    time.sleep(later)
    print(json.dumps({"target": target, "repeat": rep, "h2_conns": conns, "streams": streams,
                      "body": body, "later_s": later, "base": base, "stuck": stuck,
                      "later": rss_kb(pids)}), flush=True)

def report_h2(args):
    rows = [json.loads(l) for l in open(args[0]) if l.strip()]
    if not rows:
        return
    order = []
    for r in rows:
        if r["target"] not in order:
            order.append(r["target"])
    med = statistics.median
    r0 = rows[0]
    out = [f"HTTP/2, a client that stops reading: {r0['h2_conns']} h2c connection(s), "
           f"{r0['streams'] // r0['h2_conns']} streams each (all the proxy allows), each asking for "
           f"{r0['body'] // 1024} KiB; the client grants all the window it can and never reads. "
           f"Medians of {max(r['repeat'] for r in rows)} repeats.", "",
           "| target | streams | pinned MiB | KiB / stream | MiB / connection | retained MiB |",
           "|---|---|---|---|---|---|"]
    for t in order:
        rs = [r for r in rows if r["target"] == t]
        pinned = [(r["stuck"]["rss"] - r["base"]["rss"]) / 1024 for r in rs]
        kept = [(r["later"]["rss"] - r["base"]["rss"]) / 1024 for r in rs]
        n, c = rs[0]["streams"], rs[0]["h2_conns"]
        out.append(f"| {t} | {n} | {med(pinned):.1f} | {med(pinned) * 1024 / n:.0f} "
                   f"| {med(pinned) / c:.1f} | {med(kept):.1f} |")
    print("\n".join(out + [""]))

def report(args):
    rows = [json.loads(l) for l in open(args[0]) if l.strip()]
    order = []
    for r in rows:
        if r["target"] not in order:
            order.append(r["target"])
    conns, later = rows[0]["conns"], rows[0]["later_s"]
    med = statistics.median
    rng = lambda xs: f"{med(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"
    out = [f"{conns} connections per phase, {rows[0]['head_bytes']}-byte half-sent heads. "
           f"Medians of {max(r['repeat'] for r in rows)} repeats [min-max]. KiB per connection = "
           f"VmRSS delta / {conns}; retained = VmRSS after close - base, {rows[0]['later_s']:g} s "
           "after the last connection closed.", ""]
    for cycle in sorted({r["cycle"] for r in rows}):
        stats = {}
        for t in order:
            rs = [r for r in rows if r["target"] == t and r["cycle"] == cycle]
            stats[t] = {
                "base": [r["base"]["rss"] / 1024 for r in rs],
                "idle": [(r["idle"]["rss"] - r["base"]["rss"]) / conns for r in rs],
                "half": [(r["half"]["rss"] - r["idle"]["rss"]) / conns for r in rs],
                "peak": [(r["half"]["rss"] - r["base"]["rss"]) / 1024 for r in rs],
                "kept": [(r["later"]["rss"] - r["base"]["rss"]) / 1024 for r in rs],
            }
        ref = stats.get("nginx")
        ratio = lambda t, k: (f"{med(stats[t][k]) / med(ref[k]):.1f}"
                              if ref and t != "nginx" and med(ref[k]) > 0.05 else "-")
        what = "a fresh process" if cycle == 1 else "the same process again"
        out += [f"Cycle {cycle}, {what}:", "",
                "| target | base MiB | KiB / idle conn | x nginx | KiB / half-open | x nginx "
                "| peak delta MiB | retained MiB |",
                "|---|---|---|---|---|---|---|---|"]
        for t in order:
            s = stats[t]
            out.append(f"| {t} | {med(s['base']):.1f} | {rng(s['idle'])} | {ratio(t, 'idle')} "
                       f"| {rng(s['half'])} | {ratio(t, 'half')} | {med(s['peak']):.1f} | {rng(s['kept'])} |")
        out.append("")
    print("\n".join(out))

if __name__ == "__main__":
    {"measure": measure, "report": report, "h2stuck": h2stuck, "report_h2": report_h2}[sys.argv[1]](sys.argv[2:])
PY

# ---------------------------------------------------------------- upstream
render "$BENCH_DIR/nginx-upstream.conf" "$TMP/upstream.conf" "$UPSTREAM_PORT"
# A large response for the HTTP/2 phase, readable by nginx's worker (which
# drops root privileges).
mkdir -p "$TMP/www"
head -c "$H2_BODY_BYTES" /dev/zero >"$TMP/www/big"
chmod 711 "$TMP"
chmod 755 "$TMP/www"
chmod 644 "$TMP/www/big"
sed -i "s|^        location / {|        location = /big { alias $TMP/www/big; }\n        location / {|" "$TMP/upstream.conf"
grep -q 'location = /big' "$TMP/upstream.conf" || die "could not add /big to the upstream config"
start_bg upstream "$NGINX_BIN" -p "$TMP" -c "$TMP/upstream.conf" -e "$TMP/upstream-error.log"
wait_ok upstream "$LAST_PID" "http://127.0.0.1:$UPSTREAM_PORT/"
UPSTREAM_PID=$LAST_PID

{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel=$(uname -r)"
    echo "git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- proxy 2>/dev/null || echo '+dirty')"
    echo "conns=$CONNS head_bytes=$HEAD_BYTES h2_conns=$H2_CONNS h2_body_bytes=$H2_BODY_BYTES cycles=$CYCLES repeat=$REPEAT settle=$SETTLE later=$LATER targets=$TARGETS listener=$REMORA_LISTENER"
    echo "nginx=$NGINX_BIN $("$NGINX_BIN" -v 2>&1)"
    if wants remora; then echo "remora=$REMORA_BIN env=${REMORA_ENV:-}"; fi
    if wants remora-b; then echo "remora-b=$REMORA_B_BIN env=${REMORA_B_ENV:-}"; fi
    echo "open_files=$(ulimit -n)"
} | tee "$OUT/meta.txt" >&2

# start_target T: sets TARGET_PORT, TARGET_HOST, TARGET_PIDS (comma-separated)
start_target() {
    local t=$1 bin env_extra base v unset_env=()
    case $t in
    nginx)
        render "$BENCH_DIR/nginx.conf" "$TMP/nginx.conf" "$NGINX_PORT"
        start_bg nginx "$NGINX_BIN" -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/nginx-proxy-error.log"
        TARGET_PORT=$NGINX_PORT
        TARGET_HOST=app
        wait_ok nginx "$LAST_PID" "http://127.0.0.1:$TARGET_PORT/"
        ;;
    remora | remora-b)
        if [[ $t == remora ]]; then
            bin=$REMORA_BIN env_extra=${REMORA_ENV:-} base=$((PORT_BASE + 2))
        else
            bin=$REMORA_B_BIN env_extra=${REMORA_B_ENV:-} base=$((PORT_BASE + 5))
        fi
        # Only the flags below configure it: drop REMORA_* from the caller.
        for v in $(compgen -e); do [[ $v == REMORA_* ]] && unset_env+=(-u "$v"); done
        local -a extra
        read -r -a extra <<<"$env_extra"
        start_bg "$t" env "${unset_env[@]}" RUST_LOG=warn "${extra[@]}" "$bin" \
            --config "$TMP/mesh.yaml" \
            --outbound-addr "127.0.0.1:$base" \
            --inbound-addr "127.0.0.1:$((base + 1))" \
            --app-addr "127.0.0.1:$UPSTREAM_PORT" \
            --admin-addr "127.0.0.1:$((base + 2))" \
            --header-read-timeout 60s --idle-timeout 300s
        wait_ok "$t" "$LAST_PID" "http://127.0.0.1:$((base + 2))/ready"
        if [[ $REMORA_LISTENER == outbound ]]; then
            TARGET_PORT=$base
        else
            TARGET_PORT=$((base + 1))
        fi
        TARGET_HOST=app
        wait_ok "$t" "$LAST_PID" -H "Host: app" "http://127.0.0.1:$TARGET_PORT/"
        ;;
    esac
    TARGET_PIDS=$(descendants "$LAST_PID" | paste -sd, -)
}

read -r -a TLIST <<<"$TARGETS"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
for ((rep = 1; rep <= REPEAT; rep++)); do
    n=${#TLIST[@]}
    for ((i = 0; i < n; i++)); do
        t=${TLIST[(i + rep - 1) % n]}
        alive "$UPSTREAM_PID" || die "upstream died"
        start_target "$t"
        log "r$rep $t (pids $TARGET_PIDS): $CYCLES cycle(s) of $CONNS idle + $CONNS half-open connections"
        python3 "$TMP/memclient.py" measure "$t" "$TARGET_PORT" "$TARGET_HOST" "$TARGET_PIDS" \
            "$CONNS" "$HEAD_BYTES" "$CYCLES" "$SETTLE" "$rep" "$LATER" | tee -a "$RESULTS" >&2 ||
            die "$t: the client failed"
        stop_last
    done
done

# ---------------------------------------------------------------- HTTP/2
H2_RESULTS=$OUT/h2.jsonl
: >"$H2_RESULTS"
if ((H2_CONNS > 0)); then
    [[ $(curl -s -o /dev/null -w '%{size_download}' "http://127.0.0.1:$UPSTREAM_PORT/big") == "$H2_BODY_BYTES" ]] ||
        die "the upstream does not serve /big"
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for t in "${TLIST[@]}"; do
            [[ $t == remora* ]] || continue
            start_target "$t"
            log "r$rep $t: HTTP/2, $H2_CONNS connection(s) whose client stops reading"
            python3 "$TMP/memclient.py" h2stuck "$t" "$TARGET_PORT" "$TARGET_HOST" "$TARGET_PIDS" \
                "$H2_CONNS" "$H2_BODY_BYTES" "$LATER" "$rep" | tee -a "$H2_RESULTS" >&2 ||
                die "$t: the HTTP/2 client failed"
            stop_last
        done
    done
fi

cleanup
{
    python3 "$TMP/memclient.py" report "$RESULTS"
    python3 "$TMP/memclient.py" report_h2 "$H2_RESULTS"
} | tee "$OUT/results.md"
log "results: $OUT/results.md (raw: $RESULTS)"
