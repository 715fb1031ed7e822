#!/usr/bin/env python3
"""Aggregate the raw files bench/run.sh wrote into OUT/results.json and
OUT/results.md, and print the comparison tables (medians over repeats).
Standard library only.

Usage: python3 bench/report.py OUT_DIR
"""
import glob
import json
import os
import re
import statistics
import sys

TARGET_ORDER = ["direct", "remora", "nginx", "haproxy", "envoy"]
RSS_LIMIT_MIB = 20.0  # team target for remora's peak RSS
BOUND_PCT = 85.0  # a max-throughput run counts if the proxy used >= this % of its core
NOISY_PCT = 10.0  # other work on the proxy core above this % marks a latency run noisy
PCTS = ["p50", "p90", "p99", "p99.9"]


def read_meta(out):
    meta = {}
    path = os.path.join(out, "meta.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v
    return meta


def parse_wrk(path):
    """Parse `wrk --latency` text output."""
    with open(path) as f:
        text = f.read()
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError(f"no Requests/sec in {path}")
    r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
    for p in ("50", "90", "99"):
        m = re.search(r"^\s+%s\.000%%\s+([\d.]+)(us|ms|s|m)\s*$" % p, text, re.M)
        if m:
            r[f"uncorrected_p{p}_ms"] = float(m.group(1)) * unit[m.group(2)]
    return r


def parse_oha(path):
    with open(path) as f:
        j = json.load(f)
    r = {}
    lp = j["latencyPercentiles"]
    for p in PCTS:
        v = lp.get(p)
        r[f"{p}_ms"] = None if v is None else v * 1e3
    codes = {str(k): int(v) for k, v in j.get("statusCodeDistribution", {}).items()}
    r["status_codes"] = codes
    r["ok"] = sum(v for k, v in codes.items() if k.startswith("2"))
    r["non2xx"] = sum(v for k, v in codes.items() if not k.startswith("2"))
    r["errors"] = j.get("errorDistribution", {})
    r["error_count"] = sum(int(v) for v in r["errors"].values())
    r["achieved_rps"] = j["summary"]["requestsPerSec"]
    r["duration_s"] = j["summary"]["total"]
    r["success_rate"] = j["summary"]["successRate"]
    return r


def core_busy(snap):
    """Busy % per core between two snapshots of /proc/stat cpuN lines."""
    def parse(s):
        out = {}
        for line in s.split(";"):
            f = line.split()
            if f:
                vals = [int(x) for x in f[1:]]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                out[f[0]] = (sum(vals[:8]), idle)
        return out
    b, a = parse(snap["before"]), parse(snap["after"])
    res = {}
    for k in a:
        if k in b:
            tot = a[k][0] - b[k][0]
            idle = a[k][1] - b[k][1]
            res[k] = 100.0 * (tot - idle) / tot if tot > 0 else None
    return res


def run_metrics(run, proc, meta):
    wrk, oha = run["wrk"], run["oha"]
    pcore = "cpu" + meta.get("proxy_cpu", "1")
    lcore = "cpu" + meta.get("loadgen_cpu", "0")
    m = {
        "rps": wrk["rps"],
        "rate_achieved_rps": oha["achieved_rps"],
        "upstream_conns_opened": proc.get("upstream_conns_opened"),
    }
    for p in PCTS:
        m[f"{p}_ms"] = oha[f"{p}_ms"]
    busy_max = core_busy(proc["core_stat_wrk"]) if "core_stat_wrk" in proc else {}
    busy_rate = core_busy(proc["core_stat_rate"]) if "core_stat_rate" in proc else {}
    m["loadgen_core_busy_pct_max"] = busy_max.get(lcore)
    m["proxy_core_busy_pct_max"] = busy_max.get(pcore)
    m["proxy_core_busy_pct_rate"] = busy_rate.get(pcore)
    proxy_pct_rate = 0.0
    if proc["processes"]:
        tck = proc["clk_tck"]
        ok = oha["ok"]
        m["cpu_us_per_req"] = proc["cpu_ticks_rate"] / tck * 1e6 / ok if ok else None
        wreq = wrk.get("requests")
        m["cpu_us_per_req_max"] = proc["cpu_ticks_wrk"] / tck * 1e6 / wreq if wreq else None
        if m["cpu_us_per_req_max"]:
            m["proxy_cpu_pct_max"] = m["cpu_us_per_req_max"] * m["rps"] / 1e4
            # Requests/s one core could serve at this CPU cost per request.
            m["capacity_rps"] = 1e6 / m["cpu_us_per_req_max"]
        proxy_pct_rate = proc["cpu_ticks_rate"] / tck / oha["duration_s"] * 100 if oha["duration_s"] else 0.0
        m["rss_mib"] = sum(p["vmhwm_kb"] for p in proc["processes"]) / 1024.0
        m["processes"] = "+".join(p["comm"] for p in proc["processes"])
    if m["proxy_core_busy_pct_rate"] is not None:
        # CPU time on the proxy core used by anything but the proxy during the
        # fixed-rate run (other jobs on the machine, and softirq work).
        m["other_load_proxy_core_pct_rate"] = max(0.0, m["proxy_core_busy_pct_rate"] - proxy_pct_rate)
    return m


def load_runs(out, meta):
    runs = []
    raw = os.path.join(out, "raw")
    names = set()
    for p in glob.glob(os.path.join(raw, "r*-*.*")):
        mm = re.match(r"r(\d+)-([a-z]+)\.", os.path.basename(p))
        if mm:
            names.add((int(mm.group(1)), mm.group(2)))
    for rep, target in sorted(names):
        pfx = os.path.join(raw, f"r{rep}-{target}")
        run = {"repeat": rep, "target": target}
        if os.path.exists(pfx + ".error"):
            with open(pfx + ".error") as f:
                run["error"] = f.read().strip()
            runs.append(run)
            continue
        try:
            run["wrk"] = parse_wrk(pfx + ".wrk.txt")
            run["oha"] = parse_oha(pfx + ".oha.json")
            with open(pfx + ".proc.json") as f:
                proc = json.load(f)
        except (OSError, ValueError, KeyError) as e:
            run["error"] = f"incomplete results: {e}"
            runs.append(run)
            continue
        run["proc"] = proc
        m = run_metrics(run, proc, meta)
        problems = []
        if run["wrk"]["non2xx"]:
            problems.append(f'wrk non-2xx responses: {run["wrk"]["non2xx"]}')
        if run["wrk"]["socket_errors"]:
            problems.append(f'wrk socket errors: {run["wrk"]["socket_errors"]}')
        if run["oha"]["non2xx"]:
            problems.append(f'oha non-2xx responses: {run["oha"]["non2xx"]}')
        if run["oha"]["error_count"]:
            problems.append(f'oha errors: {run["oha"]["errors"]}')
        if m.get("proxy_cpu_pct_max") is not None:
            m["proxy_bound"] = m["proxy_cpu_pct_max"] >= BOUND_PCT
            if not m["proxy_bound"]:
                problems.append(f'max-throughput run not bound by the proxy (it used {m["proxy_cpu_pct_max"]:.0f}% of its core, '
                                f'the core was {fmt(m["proxy_core_busy_pct_max"], ".0f")}% busy): left out of the req/s median')
        other = m.get("other_load_proxy_core_pct_rate")
        m["noisy_latency"] = other is not None and other > NOISY_PCT
        if m["noisy_latency"]:
            problems.append(f"fixed-rate run: other work used {other:.0f}% of the proxy core"
                            + (" (proxy, upstream and oha ran SCHED_FIFO)" if meta.get("sched") in ("rate-fifo", "fifo") else ""))
        up = m.get("upstream_conns_opened")
        # wrk + oha open CONNS + RATE_CONNS client connections; a proxy that
        # keeps upstream connections alive opens about as many upstream.
        if up is not None and up > 2000:
            problems.append(f"{up} upstream connections opened during the measurement: upstream keep-alive not working?")
        run["problems"] = problems
        run["metrics"] = m
        runs.append(run)
    return runs


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(runs, targets):
    summary = {}
    for t in targets:
        ok = [r for r in runs if r["target"] == t and "metrics" in r]
        failed = [r for r in runs if r["target"] == t and "error" in r]
        s = {"runs_ok": len(ok), "runs_failed": len(failed)}
        if failed:
            s["errors"] = sorted({r["error"] for r in failed})
        if not ok:
            summary[t] = s
            continue
        ms = [r["metrics"] for r in ok]
        keys = ["p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "rate_achieved_rps", "cpu_us_per_req",
                "cpu_us_per_req_max", "capacity_rps", "proxy_cpu_pct_max", "rss_mib", "upstream_conns_opened",
                "loadgen_core_busy_pct_max", "proxy_core_busy_pct_max", "other_load_proxy_core_pct_rate"]
        for k in keys:
            s[k] = median([m.get(k) for m in ms])
        s["rps_all_runs"] = median([m["rps"] for m in ms])
        bound = [m for m in ms if m.get("proxy_bound", True)]
        s["rps_runs_used"] = len(bound) if bound else len(ms)
        s["rps_fallback_all_runs"] = not bound
        s["rps"] = median([m["rps"] for m in (bound or ms)])
        s["noisy_latency_runs"] = sum(1 for m in ms if m.get("noisy_latency"))
        s["processes"] = ms[-1].get("processes")
        s["p99_by_repeat"] = {r["repeat"]: r["metrics"]["p99_ms"] for r in ok}
        probs = [f'r{r["repeat"]}: {p}' for r in ok for p in r["problems"]]
        if probs:
            s["problems"] = probs
        summary[t] = s

    d = summary.get("direct", {})
    n = summary.get("nginx", {})
    for t, s in summary.items():
        if not s["runs_ok"]:
            continue
        s["rps_vs_direct"] = ratio(s["rps"], d.get("rps"))
        s["rps_vs_nginx"] = ratio(s["rps"], n.get("rps"))
        s["capacity_vs_nginx"] = ratio(s.get("capacity_rps"), n.get("capacity_rps"))
        s["cpu_vs_nginx"] = ratio(s.get("cpu_us_per_req"), n.get("cpu_us_per_req"))
        s["rss_vs_nginx"] = ratio(s.get("rss_mib"), n.get("rss_mib"))
        if d.get("runs_ok") and t != "direct":
            s["p99_added_ms"] = s["p99_ms"] - d["p99_ms"]
            s["p50_added_ms"] = s["p50_ms"] - d["p50_ms"]
            # Same-repeat pairs give the spread of the added latency.
            pairs = [v - d["p99_by_repeat"][k] for k, v in s["p99_by_repeat"].items() if k in d["p99_by_repeat"]]
            if pairs:
                s["p99_added_range_ms"] = [min(pairs), max(pairs)]
    for t, s in summary.items():
        if "p99_added_ms" in s and "p99_added_ms" in n:
            nadd = n["p99_added_ms"]
            # A ratio to a near-zero added latency says nothing.
            s["p99_added_vs_nginx"] = ratio(s["p99_added_ms"], nadd) if nadd >= 0.05 else None
    return summary


def checks_for(summary, meta):
    checks = []
    r = summary.get("remora")
    n = summary.get("nginx", {})
    d = summary.get("direct", {})
    rate = meta.get("rate", "2000")
    names = ["throughput >= nginx (1 worker)", f"p99 added latency @{rate} req/s <= nginx's",
             f"peak RSS <= {RSS_LIMIT_MIB:g} MiB under load"]
    if r is None:
        return checks
    if not r["runs_ok"]:
        reason = "; ".join(r.get("errors", ["not run"]))
        return [{"check": c, "status": "not measured yet", "detail": reason} for c in names]
    if n.get("runs_ok"):
        by_rps = f'remora {r["rps"]:.0f} req/s vs nginx {n["rps"]:.0f} req/s ({r["rps_vs_nginx"]:.2f}x)'
        by_cpu = (f'CPU per request at saturation {r["cpu_us_per_req_max"]:.1f} vs {n["cpu_us_per_req_max"]:.1f} us '
                  f'(capacity {r["capacity_vs_nginx"]:.2f}x nginx)')
        fb = [t for t, s in (("remora", r), ("nginx", n)) if s.get("rps_fallback_all_runs")]
        if not fb:
            status = "met" if r["rps"] >= n["rps"] else "not met"
            detail = f"{by_rps}; {by_cpu}"
        else:
            # No run in which the proxy was the bottleneck: wrk's req/s measured
            # the machine's other load, so decide on CPU cost per request.
            status = "met" if r["capacity_vs_nginx"] >= 1.0 else "not met"
            detail = (f'decided on CPU cost, no proxy-bound max-throughput run for {" and ".join(fb)}: {by_cpu}; '
                      f'wrk (not proxy-bound) {by_rps}')
        checks.append({"check": names[0], "status": status, "detail": detail})
    else:
        checks.append({"check": names[0], "status": "not measured yet", "detail": "nginx not measured"})
    if "p99_added_ms" in r and "p99_added_ms" in n:
        detail = (f'remora +{r["p99_added_ms"]:.3f} ms vs nginx +{n["p99_added_ms"]:.3f} ms over direct p99 {d["p99_ms"]:.3f} ms')
        rr, nr = r.get("p99_added_range_ms"), n.get("p99_added_range_ms")
        if rr and nr:
            detail += f'; per-repeat ranges remora [{rr[0]:+.3f}, {rr[1]:+.3f}], nginx [{nr[0]:+.3f}, {nr[1]:+.3f}] ms'
            if rr[0] <= nr[1] and nr[0] <= rr[1] and (len(r["p99_by_repeat"]) > 1):
                detail += " (ranges overlap: difference within this run's noise)"
        noisy = sum(summary[t].get("noisy_latency_runs", 0) for t in ("direct", "remora", "nginx") if t in summary)
        if noisy and meta.get("sched") == "other":
            detail += f"; {noisy} of the direct/remora/nginx fixed-rate runs had >{NOISY_PCT:g}% other load on the proxy core"
        checks.append({
            "check": names[1],
            "status": "met" if r["p99_added_ms"] <= n["p99_added_ms"] else "not met",
            "detail": detail,
        })
    else:
        checks.append({"check": names[1], "status": "not measured yet", "detail": "needs direct and nginx results"})
    checks.append({
        "check": names[2],
        "status": "met" if r["rss_mib"] <= RSS_LIMIT_MIB else "not met",
        "detail": f'remora VmHWM {r["rss_mib"]:.1f} MiB (peak over warm-up, 64-connection max-throughput and fixed-rate runs)',
    })
    return checks


def md_table(hdr, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(hdr), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    meta = read_meta(out)
    runs = load_runs(out, meta)
    targets = [t for t in TARGET_ORDER if t in meta.get("targets", " ".join(TARGET_ORDER)).split()]
    for r in runs:
        if r["target"] not in targets:
            targets.append(r["target"])
    summary = summarize(runs, targets)
    checks = checks_for(summary, meta)

    conns, rate, dur = meta.get("conns", "?"), meta.get("rate", "?"), meta.get("duration_s", "?")
    t1_hdr = ["target", f"req/s @{conns} conns", "x direct", "x nginx", "CPU us/req @max", "capacity req/s",
              "capacity x nginx", f"CPU us/req @{rate}/s", "CPU x nginx", "peak RSS MiB", "runs"]
    t1 = []
    t2_hdr = ["target", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "p99 added ms", "added x nginx", "other load"]
    t2 = []
    for t in targets:
        s = summary[t]
        total = s["runs_ok"] + s["runs_failed"]
        if not s["runs_ok"]:
            t1.append([t, "not measured yet"] + [""] * (len(t1_hdr) - 3) + [f"0/{total}"])
            t2.append([t, "not measured yet"] + [""] * (len(t2_hdr) - 2))
            continue
        rps = fmt(s["rps"], ".0f")
        if t != "direct" and s["rps_fallback_all_runs"]:
            rps += " (noisy)"
        elif t != "direct" and s["rps_runs_used"] != s["runs_ok"]:
            rps += f' ({s["rps_runs_used"]}/{s["runs_ok"]})'
        t1.append([
            t, rps, fmt(s.get("rps_vs_direct")), fmt(s.get("rps_vs_nginx")),
            fmt(s.get("cpu_us_per_req_max"), ".1f"), fmt(s.get("capacity_rps"), ".0f"),
            fmt(s.get("capacity_vs_nginx")), fmt(s.get("cpu_us_per_req"), ".1f"), fmt(s.get("cpu_vs_nginx")),
            fmt(s.get("rss_mib"), ".1f"), f'{s["runs_ok"]}/{total}',
        ])
        t2.append([
            t, fmt(s["p50_ms"], ".3f"), fmt(s["p90_ms"], ".3f"), fmt(s["p99_ms"], ".3f"), fmt(s["p99.9_ms"], ".3f"),
            "-" if t == "direct" else fmt(s.get("p99_added_ms"), "+.3f"),
            "-" if t == "direct" else fmt(s.get("p99_added_vs_nginx")),
            f'{s["noisy_latency_runs"]}/{s["runs_ok"]}',
        ])

    sched = {
        "fifo": "SCHED_FIFO priority 1",
        "rate-fifo": f'nice {meta.get("nice", "0")}, SCHED_FIFO priority 1 during the fixed-rate run (proxy, upstream, oha)',
    }.get(meta.get("sched"), "nice " + meta.get("nice", "0"))
    text = [
        "",
        f'Remora benchmark, {meta.get("date", "?")}, git {meta.get("git_rev", "?")}, {meta.get("ncpu", "?")} cores '
        f'({meta.get("cpu_model", "?")}), kernel {meta.get("kernel", "?")}; medians of REPEAT={meta.get("repeat", "?")}',
        f'Pinning: proxy under test on core {meta.get("proxy_cpu", "?")}; upstream nginx, wrk and oha on core '
        f'{meta.get("loadgen_cpu", "?")} (taskset); all at {sched}. One worker per proxy, keep-alive on both sides, '
        f'HTTP/1.1, no access log.',
        "",
        f"Throughput and cost. req/s: wrk -t1 -c{conns} -d{dur}s, median over runs in which the proxy was the "
        f"bottleneck (used >= {BOUND_PCT:g}% of its core; '(k/n)' = runs used; '(noisy)' = no such run, median of all). CPU us/req @max: proxy CPU time "
        f"(utime+stime, all its processes) / requests in that run; capacity = 1e6 / that (req/s the proxy's core "
        f"could serve). CPU us/req @{rate}/s: same during the fixed-rate run. Peak RSS: VmHWM summed over the "
        f"proxy's processes (nginx: master + worker).",
        "",
        *md_table(t1_hdr, t1),
        "",
        f"Latency at a fixed {rate} req/s: oha -q {rate} --latency-correction -c {meta.get('rate_conns', '?')} "
        f"-z {dur}s (coordinated-omission corrected). p99 added = p99 - direct p99 (\"added x nginx\" only when "
        f"nginx adds >= 0.05 ms). Other load: runs in which other work used >{NOISY_PCT:g}% of the proxy core.",
        "",
        *md_table(t2_hdr, t2),
        "",
    ]
    for t in targets:
        s = summary[t]
        if s.get("runs_ok"):
            parts = []
            if s.get("processes"):
                parts.append(f'processes summed: {s["processes"]}')
                parts.append(f'proxy CPU at max throughput {fmt(s.get("proxy_cpu_pct_max"), ".0f")}% of a core')
            parts.append(f'cores busy at max throughput: load-gen {fmt(s.get("loadgen_core_busy_pct_max"), ".0f")}%, '
                         f'proxy {fmt(s.get("proxy_core_busy_pct_max"), ".0f")}%')
            parts.append(f'fixed rate achieved {fmt(s.get("rate_achieved_rps"), ".0f")} req/s')
            if s.get("processes"):
                parts.append(f'new upstream connections {fmt(s.get("upstream_conns_opened"), ".0f")}')
            if s.get("rps_runs_used") != s.get("runs_ok") or t == "direct":
                parts.append(f'req/s median over all runs {fmt(s.get("rps_all_runs"), ".0f")}')
            text.append(f"  {t}: " + "; ".join(parts))
        for p in s.get("problems", []):
            text.append(f"    note {t} {p}")
        for e in s.get("errors", []):
            text.append(f"    {t} FAILED: {e}")
    if checks:
        text.append("")
        text.append("Remora targets:")
        for c in checks:
            text.append(f'  [{c["status"]}] {c["check"]}: {c["detail"]}')
    text.append("")
    report = "\n".join(text)
    print(report)

    result = {"meta": meta, "summary": summary, "checks": checks, "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
