#!/usr/bin/env python3
"""Benchmark: N consecutive reloads of the example app under saturating load. Reports failed requests,
the longest stall seen by all clients at once, and p99 during reloads against p99 in between.

Run on the test host, as root (it boots the real-systemd test bed of tests/testbed.py once):

    sudo python3 bench/soak_bench.py                        # 100 reloads, 8 clients, 4 workers
    sudo python3 bench/soak_bench.py --reloads 25 --access-log

An all-client stall is a time span in which no client got any answer (of the regular requests; the long
ones, /slow?s=1, are left out): the gap between two consecutive completions over all clients, wherever
they come from. Each stall over ``--stall-ms`` is listed with the reload it fell in and the helper's step
running at that moment (its journal line, on the same monotonic clock as the requests: the container shares
the host's CLOCK_MONOTONIC), with the CPU the container's processes were getting: the machine's idle share
and the run queue sampled every 50 ms. "during" = from a reload command's start to its end; "steady" = the
rest of the run.

Writes bench/soak_results.json and bench/soak_results.md; prints the summary. Not a test: asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import appbed  # noqa: E402
import testbed  # noqa: E402

LOAD_OUT, LOAD_STOP = "/var/tmp/soak-load.json", "/var/tmp/soak-load.stop"
CPU_OUT, CPU_STOP = "/var/tmp/soak-cpu.tsv", "/var/tmp/soak-cpu.stop"
TIMED = "/root/timed.py"
TIMED_SRC = """import json, subprocess, sys, time
t0 = time.monotonic()
r = subprocess.run(sys.argv[1], shell=True, capture_output=True, text=True)
print(json.dumps({"start": t0, "end": time.monotonic(), "rc": r.returncode, "err": (r.stdout + r.stderr)[-400:]}))
"""
# Every 50 ms: monotonic time, the machine's idle share since the last sample, and procs_running.
CPU_SRC = """import os, sys, time
out, stop = sys.argv[1:3]
def cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]
rows, (t0, i0) = [], cpu()
while not os.path.exists(stop):
    time.sleep(0.05)
    (t1, i1) = cpu()
    with open("/proc/stat") as f:
        running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    rows.append("%.4f %.3f %d" % (time.monotonic(), (i1 - i0) / max(1, t1 - t0), running))
    t0, i0 = t1, i1
with open(out, "w") as f:
    f.write("\\n".join(rows) + "\\n")
"""


def log(msg: str) -> None:
    print(f"[soak {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def stalls(records: list[dict[str, Any]], start: float, end: float) -> list[tuple[float, float]]:
    """(begin, length) of every span without a completed regular request, longest first."""
    ends = sorted(r["start"] + r["latency"] for r in records if not r["long"])
    ends = [start, *[e for e in ends if start <= e <= end], end]
    gaps = [(a, b - a) for a, b in zip(ends, ends[1:], strict=False)]
    return sorted(gaps, key=lambda g: -g[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reloads", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--access-log", action="store_true", help="[gunicorn] access_log = true")
    p.add_argument("--stall-ms", type=float, default=500.0, help="list all-client stalls longer than this")
    p.add_argument("--suite", default="bookworm", choices=("bookworm", "trixie"))
    p.add_argument("--out", default=str(HERE / "soak_results"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    with testbed.boot(args.suite) as c:
        app = appbed.App(c)
        gunicorn = f"workers = {args.workers}" + ("\naccess_log = true" if args.access_log else "")
        app.install(app.variant(gunicorn=gunicorn, path="/root/soak.toml"))
        assert app.wait_version("v1"), app.journal()
        c.write_file(TIMED, TIMED_SRC)
        c.run(["rm", "-f", LOAD_OUT, LOAD_STOP, CPU_OUT, CPU_STOP])
        import subprocess

        cpu = c.popen(["python3", "-c", CPU_SRC, CPU_OUT, CPU_STOP], stdout=subprocess.DEVNULL)
        load = c.popen("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/ "
                       f"--concurrency {args.concurrency} --long 1 --long-path '/slow?s=1' "
                       f"-H 'Host: {appbed.HOST}' --until-file {LOAD_STOP} --out {LOAD_OUT} --records "
                       "--max-duration 3600 --timeout 30", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(6)  # steady state before the first reload
        if load.poll() is not None:
            raise SystemExit(f"the load generator exited: {load.stderr.read().decode()[-800:]}")
        events = []
        for n in range(2, args.reloads + 2):
            app.ship(f"v{n}")
            ev = json.loads(c.run(["python3", TIMED, "systemctl reload flaskapp"], timeout=600).stdout)
            ev["served"] = app.wait_version(f"v{n}", timeout=30)
            events.append(ev)
            log(f"reload {n - 1}/{args.reloads}: {ev['end'] - ev['start']:.1f} s rc={ev['rc']} served={ev['served']}")
            time.sleep(1.0)
        time.sleep(3)
        c.run(["touch", LOAD_STOP, CPU_STOP])
        load.wait(timeout=300)
        cpu.wait(timeout=60)
        report = json.loads(c.read_file(LOAD_OUT))
        samples = [tuple(map(float, line.split())) for line in c.read_file(CPU_OUT).split("\n") if line]
        journal = [json.loads(line) for line in c.run(
            "journalctl -u flaskapp -t reloader -o json --no-pager", check=False).stdout.splitlines()]
        steps = sorted((int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", ""))) for e in journal)
        suppressed = c.run("journalctl -t systemd-journald -o cat --no-pager | grep -c Suppressed || true",
                           check=False).stdout.strip()

    records = report["records"]
    begin, end = report["started_monotonic"], report["ended_monotonic"]
    windows = [(e["start"], e["end"]) for e in events]

    def during(t: float) -> int:
        """The reload (1-based) whose command ran at *t*, else 0."""
        return next((i + 1 for i, (a, b) in enumerate(windows) if a <= t <= b), 0)

    regular = [r for r in records if not r["long"]]
    lat_during = [r["latency"] for r in regular if during(r["start"])]
    lat_steady = [r["latency"] for r in regular if not during(r["start"])]
    gaps = stalls(records, begin + 1.0, end - 1.0)  # the load generator's own start and stop left out
    step_times = [t for t, _ in steps]

    def step_at(t: float) -> str:
        i = bisect_right(step_times, t) - 1
        return steps[i][1].removeprefix("reloader: flaskapp: ")[:90] if i >= 0 else "-"

    def cpu_at(a: float, b: float) -> str:
        inside = [s for s in samples if a <= s[0] <= b + 0.05]
        if not inside:
            return "-"
        return (f"idle {min(s[1] for s in inside) * 100:.0f}-{max(s[1] for s in inside) * 100:.0f} %, "
                f"run queue up to {max(int(s[2]) for s in inside)}")

    long_stalls = [(a, g) for a, g in gaps if g * 1000 > args.stall_ms]
    failed = report["failed"]
    rows = [
        "| reloads | served new version | requests | failed | longest all-client stall | stalls > "
        f"{args.stall_ms:.0f} ms | p99 steady | p99 during reloads | x steady | reload median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {len(events)} | {sum(e['served'] for e in events)} | {report['total']} | {failed} "
        f"| {gaps[0][1] * 1000:.0f} ms | {len(long_stalls)} | {pct(lat_steady, 99) * 1000:.0f} ms "
        f"| {pct(lat_during, 99) * 1000:.0f} ms | {pct(lat_during, 99) / max(pct(lat_steady, 99), 1e-9):.2f} "
        f"| {pct([e['end'] - e['start'] for e in events], 50):.1f} s |",
    ]
    detail = ["", "| stall | at | reload | helper's step then | CPU then |", "|---:|---:|---:|---|---|"]
    for a, g in gaps[:10]:
        n = during(a) or during(a + g)
        detail.append(f"| {g * 1000:.0f} ms | +{a - begin:.1f} s | {n or '-'} | {step_at(a + g) if n else '-'} "
                      f"| {cpu_at(a, a + g)} |")
    head = (f"Soak: {len(events)} reloads, {args.workers} workers, {args.concurrency} clients + 1 long, access log "
            f"{'on' if args.access_log else 'off'}, {args.suite}; journald suppression notices: {suppressed}. "
            "The ten longest all-client stalls:")
    text = "\n".join(rows) + "\n\n" + head + "\n" + "\n".join(detail)
    print(text)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps(
        {"args": vars(args), "events": events, "summary": report["summary"], "failed": failed,
         "stalls": [{"t": a - begin, "ms": g * 1000, "reload": during(a) or during(a + g),
                     "step": step_at(a + g), "cpu": cpu_at(a, a + g)} for a, g in gaps[:20]],
         "p99_steady_ms": pct(lat_steady, 99) * 1000, "p99_during_ms": pct(lat_during, 99) * 1000},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
