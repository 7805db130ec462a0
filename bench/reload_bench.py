#!/usr/bin/env python3
"""Benchmark: how each way of deploying the example app behaves under load, side by side.

Run on the test host, as root (it boots the real-systemd test bed of tests/testbed.py, five times):

    pip install matplotlib          # for the plot; the rest is the standard library
    sudo python3 bench/reload_bench.py            # full run, 5 containers (results.md says how long)
    sudo python3 bench/reload_bench.py --quick    # 1 deploy per sweep point, fewer points
    sudo python3 bench/reload_bench.py --quick --parts single,sweeps --modes gated,lockstep,hup --no-plot

Modes (the reloader strategies, each in the main table and in both sweeps):

* ``gated``      -- ``systemctl reload flaskapp``, the default strategy: a gated new generation
* ``lockstep``   -- the same with ``[reload] max_surge = 1`` (workers swapped one by one, TTOU/TTIN)
* ``hup``        -- ``strategy = "hup"`` (workers re-forked in place): the baseline of the "x hup" ratios
* ``blue-green`` -- examples/flaskapp-blue-green.toml with ``bake_seconds = 1`` (own container)
* ``rolling``    -- examples/flaskapp-rolling.toml with ``instances = 2`` and workers / 2 per instance, so
                    every mode runs the same number of workers (own container)

Other methods in the main table:

* ``seed HUP``         -- the original method: ``service nginx reload`` then
                          ``kill -HUP $(ps -C gunicorn fch -o pid | head -n 1)``, on the master systemd
                          started in a freshly installed container (no reloader swap ever ran there)
* ``seed HUP, after a swap`` -- the seed's command on the master reloader's swaps left behind
* ``restart (socket)`` -- ``systemctl restart flaskapp`` with the socket held by flaskapp.socket
* ``restart (no socket)`` -- the same with ``socket_activation = false`` (gunicorn binds the socket)
* ``reloader, after the seed's HUPs`` -- reloader's default strategy on the master the seed's HUPs left behind

Sweeps, for each mode: the app's import time (0.1 / 2 / 10 s, at 4 workers) and the worker count (4 / 8 / 16).

Part ``first`` (``--parts first``): the time to the new version's first answer, reloader's gated generation
against the seed's own setup in the same container: nginx -> a plain gunicorn (not reloader's units or
config: ``gunicorn --workers 4 app:app`` in a transient unit), its app.py updated in place, ``kill -HUP``.
Both run the same app with a 2 s import (``--first-import``), alternately, ``--first-rounds`` times each;
four pollers ask / through nginx from the command's start until an answer names the new version. Prints
the medians and their ratio (the issue's goal: at most 1.10).

The load generator (reloader/loadgen.py) runs inside the container against nginx; every reload command
runs inside too, wrapped so its start and end are taken on the same monotonic clock as the requests.
A sampler inside the container sums VmRSS of every process in the app's units' cgroups (flaskapp.service,
and flaskapp@*.service for blue-green/rolling) every 50 ms, on the same clock. The helper's own cost is
what it reports in the journal at the end of each reload (getrusage: its peak RSS and CPU time, and
those of its children, the pre-flight and setup commands); the blue-green/rolling controller reports none.
Writes bench/results.json, bench/results.md and bench/reload_latency.png; prints the tables.
This is not a test: it asserts nothing and exits 0 unless the bed itself breaks.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import appbed  # noqa: E402
import testbed  # noqa: E402

HOST = appbed.HOST
LOAD_OUT = "/var/tmp/bench-load.json"
LOAD_STOP = "/var/tmp/bench-load.stop"
TIMED = "/root/timed.py"
TIMED_SRC = """import json, subprocess, sys, time
t0 = time.monotonic()
r = subprocess.run(sys.argv[1], shell=True, capture_output=True, text=True)
t1 = time.monotonic()
print(json.dumps({"start": t0, "end": t1, "rc": r.returncode, "err": (r.stdout + r.stderr)[-600:]}))
"""
SEED = "service nginx reload && kill -HUP $(ps -C gunicorn fch -o pid | head -n 1)"
RELOAD = "systemctl reload flaskapp"
RESTART = "systemctl restart flaskapp"
PS = "ps -C gunicorn fch -o pid | head -n 1; ps -eo pid,ppid,comm,args | grep -v grep | grep gunicorn"
FLASKAPP = "/src/examples/flaskapp.toml"
BLUE_GREEN = "/src/examples/flaskapp-blue-green.toml"
ROLLING = "/src/examples/flaskapp-rolling.toml"


@dataclass(frozen=True)
class Mode:
    """A reloader strategy as the bench runs it: its row label, the example config and [reload] lines."""

    key: str
    label: str
    base: str
    reload: str = ""
    fleet: bool = False
    instances: int = 1  #: workers are split across this many instances (rolling)


MODES = (
    Mode("gated", "reloader (gated generation)", FLASKAPP),
    Mode("lockstep", "reloader lockstep (max_surge = 1)", FLASKAPP, "max_surge = 1"),
    Mode("hup", "reloader hup", FLASKAPP, 'strategy = "hup"'),
    Mode("blue-green", "reloader blue-green", BLUE_GREEN, "bake_seconds = 1", fleet=True),
    Mode("rolling", "reloader rolling", ROLLING, "instances = 2", fleet=True, instances=2),
)
HUP_LABEL = "reloader hup"
#: "reloader: flaskapp: helper cost: peak RSS 31.2 MB, CPU 0.21 s; its children (…): peak RSS 58.0 MB, CPU 0.43 s"
COST = re.compile(r"helper cost: peak RSS ([\d.]+) MB, CPU ([\d.]+) s; .*peak RSS ([\d.]+) MB, CPU ([\d.]+) s")

STEADY = 2.0  # seconds of steady state measured before each reload
SETTLE = 2.0  # seconds of load after the new version is seen, before the next reload

# Memory sampler, run inside the container for the length of each load run: every 50 ms the sum of VmRSS
# of every process in the app's units' cgroups (the single unit, or the blue-green/rolling controller and
# its instances), on the same monotonic clock as the requests. "helper" is the part that is not gunicorn
# (reloader's ExecReload= helper and its pre-flight process). Writes "t total_kB helper_kB nprocs" lines.
MEM_OUT = "/var/tmp/bench-mem.tsv"
MEM_STOP = "/var/tmp/bench-mem.stop"
MEM_CGROUPS = [f"/sys/fs/cgroup/{h}system.slice/{u}/cgroup.procs" for h in ("", "unified/", "systemd/")
               for u in ("flaskapp.service", "system-flaskapp.slice/flaskapp@*.service")]
MEM_SRC = """import glob, os, sys, time
out, stop, pats = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
while not os.path.exists(stop):
    t = time.monotonic()
    total = helper = n = 0
    seen = set()
    for pat in pats:
        for f in glob.glob(pat):
            try:
                with open(f) as fh:
                    pids = fh.read().split()
            except OSError:
                continue
            for pid in pids:
                if pid in seen:
                    continue
                seen.add(pid)
                try:
                    with open("/proc/%s/status" % pid) as fh:
                        rss = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
                    with open("/proc/%s/cmdline" % pid, "rb") as fh:
                        argv = fh.read().split(b"\\0")
                    with open("/proc/%s/comm" % pid) as fh:
                        comm = fh.read().strip()
                except (OSError, ValueError):
                    continue
                total += rss
                n += 1
                if comm != "gunicorn" and not any(os.path.basename(a) == b"gunicorn" for a in argv[:2]):
                    helper += rss
    rows.append("%.4f %d %d %d" % (t, total, helper, n))
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
with open(out + ".tmp", "w") as fh:
    fh.write("\\n".join(rows) + "\\n")
os.replace(out + ".tmp", out)
"""


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


# --- the bed ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, c: testbed.Container, app: appbed.App) -> None:
        self.c, self.app = c, app
        c.write_file(TIMED, TIMED_SRC)

    def config(self, *, workers: int = 4, gunicorn: str = "", reload: str = "", name: str = "bench",
               base: str = FLASKAPP) -> str:
        return self.app.variant(gunicorn=f"workers = {workers}\n{gunicorn}", reload=reload,
                                path=f"/root/{name}.toml", base=base)

    def mode_config(self, mode: Mode, workers: int = 4) -> str:
        return self.config(workers=max(1, workers // mode.instances), reload=mode.reload, base=mode.base,
                           name=f"bench-{mode.key}-w{workers}")

    def install(self, path: str) -> None:
        r = self.c.run(["reloader", "install", path], check=False, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"reloader install {path} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n"
                             f"{self.app.journal(40)}")
        version = self.app.version()
        if not version.startswith("v"):
            raise SystemExit(f"after install {path} the app answers {version}:\n{self.app.journal(40)}")

    def timed(self, cmd: str, timeout: float = 600) -> dict[str, Any]:
        r = self.c.run(["python3", TIMED, cmd], timeout=timeout)
        return json.loads(r.stdout)

    def start_load(self, concurrency: int, long: int) -> tuple[Any, Any]:
        import subprocess

        self.c.run(["rm", "-f", LOAD_OUT, LOAD_STOP, MEM_OUT, MEM_STOP])
        mem = self.c.popen(["python3", "-c", MEM_SRC, MEM_OUT, MEM_STOP, *MEM_CGROUPS],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cmd = ("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/ "
               f"--concurrency {concurrency} --long {long} --long-path '/slow?s=1' -H 'Host: {HOST}' "
               f"--until-file {LOAD_STOP} --out {LOAD_OUT} --records --max-duration 1800 --timeout 30")
        p = self.c.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        return p, mem

    def stop_load(self, procs: tuple[Any, Any]) -> tuple[dict[str, Any], list[tuple[float, int, int, int]]]:
        p, mem = procs
        self.c.run(["touch", LOAD_STOP, MEM_STOP])
        p.wait(timeout=120)
        mem.wait(timeout=60)
        samples = []
        for line in self.c.read_file(MEM_OUT).splitlines():
            t, total, helper, n = line.split()
            samples.append((float(t), int(total), int(helper), int(n)))
        return json.loads(self.c.read_file(LOAD_OUT)), samples

    def run_method(self, label: str, command: str, reloads: int, *, concurrency: int = 4, long: int = 1,
                   extra: str = "", wait: float = 60) -> dict[str, Any]:
        """*reloads* deploys with *command* under one load run; returns per-reload metrics and medians."""
        log(f"{label}: {reloads} x `{command}`")
        load = self.start_load(concurrency, long)
        events = []
        try:
            time.sleep(STEADY + 0.5)
            for _ in range(reloads):
                n = self.app.release + 1
                version = f"v{n}"
                self.app.ship(version, extra=extra)
                ev = self.timed(command)
                ev["version"] = version
                seen = self.app.wait_version(version, timeout=wait)
                ev["served"] = seen
                ev["helper"] = self.helper_cost(ev["start"])
                events.append(ev)
                log(f"  {label}: {version} command {ev['end'] - ev['start']:.2f} s rc={ev['rc']} "
                    f"served={seen}" + (f" {ev['err'].strip()[-200:]}" if ev["rc"] else ""))
                time.sleep(SETTLE + (0 if seen else 5))
        finally:
            report, mem = self.stop_load(load)
        result = analyse(label, command, report, events, mem)
        result["last_reload_steps"] = self.steps(events[-1]["start"]) if events else []
        result["nginx_errors"] = self.nginx_errors()
        log(f"  {label}: {result['failed']} failed, {result['keepalive_retries']} keep-alive retries, "
            f"median {result['median']}")
        return result

    def helper_cost(self, since: float) -> dict[str, float]:
        """The cost the reload helper reported in the journal for the reload started at *since*."""
        r = self.c.run("journalctl -u flaskapp -o short-monotonic --no-pager -n 20000 | grep -F 'helper cost'",
                       check=False)
        for line in reversed(r.stdout.splitlines()):
            m = COST.search(line)
            try:
                t = float(line[1:line.index("]")])
            except ValueError:
                continue
            if m and t >= since - 0.05:
                return {"rss_mb": float(m[1]), "cpu_s": float(m[2]), "children_rss_mb": float(m[3]),
                        "children_cpu_s": float(m[4])}
        return {}

    def steps(self, since: float) -> list[str]:
        """reloader's own journal lines (monotonic timestamps) since *since*: where the reload time goes."""
        r = self.c.run("journalctl -u flaskapp -u 'flaskapp@*' -o short-monotonic --no-pager -n 20000 "
                       "| grep -E 'reloader:|Reload|Start|Stop|Booting|Listening'", check=False)
        out = []
        for line in r.stdout.splitlines():
            if not line.startswith("[") or "]" not in line:
                continue
            try:
                t = float(line[1:line.index("]")])
            except ValueError:
                continue
            if t >= since - 0.05 and ("reloader:" in line or "Reload" in line or "Start" in line
                                      or "Stop" in line or "Booting" in line or "Listening" in line):
                out.append(f"+{t - since:7.3f}s {line[line.index(']') + 2:][:220]}")
        return out[-60:]

    def nginx_errors(self) -> dict[str, int]:
        """upstream errors nginx logged since the last call, by message (then truncate the log)."""
        r = self.c.run("cat /var/log/nginx/error.log 2>/dev/null; : > /var/log/nginx/error.log", check=False)
        counts: dict[str, int] = {}
        for line in r.stdout.splitlines():
            if "[error]" in line or "[crit]" in line or "[warn]" in line:
                msg = line.split("*", 1)[-1].split(" ", 1)[-1].split(", client:")[0]
                msg = msg.split(" while ")[0] + (" while " + msg.split(" while ")[1][:60] if " while " in msg else "")
                counts[msg] = counts.get(msg, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# --- analysis ---------------------------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(1, -(-len(values) * p // 100))
    return values[int(min(k, len(values))) - 1]


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def analyse(label: str, command: str, report: dict[str, Any], events: list[dict[str, Any]],
            mem: list[tuple[float, int, int, int]]) -> dict[str, Any]:
    recs = report.get("records") or []
    regular = [r for r in recs if not r["long"]]
    per = []
    for i, ev in enumerate(events):
        start, end = ev["start"], ev["end"]
        next_start = events[i + 1]["start"] if i + 1 < len(events) else None
        new = [r["start"] + r["latency"] for r in recs
               if r["version"] == ev["version"] and r["kind"] == "ok" and r["start"] + r["latency"] >= start]
        first_new = min(new) if new else None
        win_end = max(end, first_new or end)
        win_end = max(win_end, start + 0.2)
        # Everything this deploy caused happens before the next one starts (or SETTLE after it is done).
        after = min(win_end + SETTLE, next_start) if next_start else win_end + SETTLE
        steady = [r for r in regular if start - STEADY <= r["start"] < start - 0.1]
        during = [r for r in regular if start <= r["start"] <= win_end]
        fails: dict[str, int] = {}
        for r in recs:
            if r["kind"] != "ok" and start - 0.5 <= r["start"] <= after:
                fails[r["kind"]] = fails.get(r["kind"], 0) + 1
        retries = sum(1 for r in recs if r.get("keepalive_retry") and start - 0.5 <= r["start"] <= after)
        steady_rps = len(steady) / (STEADY - 0.1)
        during_rps = len(during) / (win_end - start)
        mem_steady = [total for t, total, _, _ in mem if start - 1.5 <= t < start - 0.05]
        mem_during = [(total, helper, n) for t, total, helper, n in mem if start <= t <= after]
        per.append({
            "version": ev["version"], "rc": ev["rc"], "command_s": round(end - start, 3),
            "time_to_new_version_s": None if first_new is None else round(first_new - start, 3),
            "window_s": round(win_end - start, 3),
            "p50_ms": _r(pct([r["latency"] * 1000 for r in during], 50)),
            "p99_ms": _r(pct([r["latency"] * 1000 for r in during], 99)),
            "max_ms": _r(max((r["latency"] * 1000 for r in during), default=None)),
            "steady_p50_ms": _r(pct([r["latency"] * 1000 for r in steady], 50)),
            "steady_p99_ms": _r(pct([r["latency"] * 1000 for r in steady], 99)),
            "throughput_ratio": round(during_rps / steady_rps, 3) if steady_rps else None,
            "rss_steady_mb": _mb(med(mem_steady)),
            "rss_peak_mb": _mb(max((m[0] for m in mem_during), default=None)),
            "rss_peak_helper_mb": _mb(max((m[1] for m in mem_during), default=None)),
            "rss_peak_processes": max((m[2] for m in mem_during), default=None),
            "keepalive_retries": retries,
            "failures": fails,
            "error": ev["err"].strip()[-300:] if ev["rc"] else "",
            "helper_rss_mb": ev.get("helper", {}).get("rss_mb"),
            "helper_cpu_s": ev.get("helper", {}).get("cpu_s"),
            "helper_children_rss_mb": ev.get("helper", {}).get("children_rss_mb"),
            "helper_children_cpu_s": ev.get("helper", {}).get("children_cpu_s"),
        })
    keys = ("command_s", "time_to_new_version_s", "p50_ms", "p99_ms", "max_ms", "steady_p50_ms",
            "steady_p99_ms", "throughput_ratio", "rss_steady_mb", "rss_peak_mb", "rss_peak_helper_mb",
            "rss_peak_processes", "helper_rss_mb", "helper_cpu_s", "helper_children_rss_mb",
            "helper_children_cpu_s")
    return {
        "method": label, "command": command, "reloads": len(events),
        "total_requests": report["total"], "failed": report["failed"], "failures": report["failures"],
        "keepalive_retries": report["keepalive_retries"],
        "long": {"total": report["long"]["total"], "failed": report["long"]["failed"]},
        "never_served": [p["version"] for p in per if p["time_to_new_version_s"] is None],
        "command_failed": [p["version"] for p in per if p["rc"]],
        "median": {k: _r(med([p[k] for p in per])) for k in keys},
        "rss_peak_max_mb": max((p["rss_peak_mb"] for p in per if p["rss_peak_mb"] is not None), default=None),
        "per_reload": per,
        "first_reload_records": _timeline(recs, mem, events[0], events[1]["start"] if len(events) > 1 else None)
        if events else None,
    }


def _mb(kb: float | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _timeline(recs: list[dict[str, Any]], mem: list[tuple[float, int, int, int]], ev: dict[str, Any],
              next_start: float | None) -> dict[str, Any]:
    """Records around the first reload, relative to its start, for the plot: from 2 s before it until just
    before the next deploy starts (the last deploy: SETTLE after the new version was first served)."""
    start = ev["start"]
    new = [r["start"] + r["latency"] - start for r in recs
           if r["version"] == ev["version"] and r["kind"] == "ok" and r["start"] + r["latency"] >= start]
    first_new = min(new) if new else None
    if next_start is not None:
        stop = next_start - 0.05
    else:
        stop = start + max(ev["end"] - start, first_new or 0.0) + SETTLE
    pts = [(round(r["start"] - start, 4), round(r["latency"] * 1000, 2), r["kind"] == "ok")
           for r in recs if not r["long"] and start - 2 <= r["start"] <= stop]
    rss = [(round(t - start, 3), round(total / 1024, 1)) for t, total, _, _ in mem if start - 2 <= t <= stop]
    return {"command_s": ev["end"] - start, "first_new_s": first_new, "until_s": round(stop - start, 3),
            "next_deploy": next_start is not None, "points": pts, "rss": rss}


# --- output -----------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = "{:.0f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _fails(m: dict[str, Any]) -> str:
    if not m["failed"]:
        return "0"
    return f"**{m['failed']}** (" + ", ".join(f"{k} {v}" for k, v in sorted(m["failures"].items())) + ")"


def _rss(md: dict[str, Any]) -> str:
    return f"{_f(md['rss_peak_mb'])} / {_f(md['rss_steady_mb'])} MB"


def _ratio(m: dict[str, Any], hup: dict[str, Any] | None) -> str:
    """Time to new version as a multiple of the hup strategy's in the same run (same sweep point)."""
    mine = m["median"]["time_to_new_version_s"]
    base = hup and hup["median"]["time_to_new_version_s"]
    return f"{mine / base:.2f}" if mine and base else "-"


def _helper(md: dict[str, Any]) -> str:
    if md.get("helper_rss_mb") is None:
        return "-"
    return (f"{_f(md['helper_rss_mb'])} MB, {_f(md['helper_cpu_s'], '{:.2f}')} s "
            f"(+ {_f(md['helper_children_rss_mb'])} MB, {_f(md['helper_children_cpu_s'], '{:.2f}')} s)")


def methods_table(methods: list[dict[str, Any]]) -> str:
    hup = next((m for m in methods if m["method"] == HUP_LABEL), None)
    rows = ["| Method | Failed requests | Keep-alive retries | Time to new version | x hup | Command returns after "
            "| p50 / p99 during | steady p99 | Throughput during | RSS peak / steady | Helper peak RSS, CPU "
            "(+ pre-flight) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        md = m["median"]
        never = f" ({len(m['never_served'])}/{m['reloads']} never)" if m["never_served"] else ""
        if m["command_failed"]:
            never += f" (command failed {len(m['command_failed'])}/{m['reloads']})"
        rows.append(
            f"| {m['method']} | {_fails(m)} | {m['keepalive_retries']} "
            f"| {_f(md['time_to_new_version_s'], '{:.2f} s')}{never} | {_ratio(m, hup)} "
            f"| {_f(md['command_s'], '{:.2f} s')} | {_f(md['p50_ms'])} / {_f(md['p99_ms'])} ms "
            f"| {_f(md['steady_p99_ms'])} ms | {_f(md['throughput_ratio'] and md['throughput_ratio'] * 100)} % "
            f"| {_rss(md)} | {_helper(md)} |")
    return "\n".join(rows)


def sweep_table(title: str, key: str, rows_in: list[dict[str, Any]]) -> str:
    """One row per (sweep point, mode), the point's hup row as the ratio's base."""
    rows = [f"| {title} | Mode | Reload command | Time to new version | x hup | p99 during | Failed requests "
            "| Keep-alive retries | RSS peak / steady | Helper peak RSS, CPU (+ pre-flight) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    order = {mode.key: i for i, mode in enumerate(MODES)}
    for m in sorted(rows_in, key=lambda r: (r["point"], order.get(r["mode"], 99))):
        md = m["median"]
        hup = next((r for r in rows_in if r["mode"] == "hup" and r[key] == m[key]), None)
        failed = f" (command failed {len(m['command_failed'])}/{m['reloads']})" if m["command_failed"] else ""
        rows.append(f"| {m[key]} | {m['mode']} | {_f(md['command_s'], '{:.2f} s')}{failed} "
                    f"| {_f(md['time_to_new_version_s'], '{:.2f} s')} | {_ratio(m, hup)} "
                    f"| {_f(md['p99_ms'])} ms | {_fails(m)} | {m['keepalive_retries']} | {_rss(md)} | {_helper(md)} |")
    return "\n".join(rows)


PLOTTED = ("reloader (gated generation)", "reloader lockstep (max_surge = 1)", "reloader hup", "reloader blue-green",
           "reloader rolling", "seed HUP", "restart (socket)", "restart (no socket)")


def plot(methods: list[dict[str, Any]], path: Path) -> None:
    """One panel per method: every regular request around its first deploy, and the app's total RSS.

    Each panel ends where that method's next deploy starts, so nothing in it belongs to a later deploy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {m["method"]: m for m in methods if m["first_reload_records"]}
    chosen = [by_name[name] for name in PLOTTED if name in by_name]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 2.4 * len(chosen)), squeeze=False)
    for ax, m in zip(axes[:, 0], chosen, strict=True):
        tl = m["first_reload_records"]
        ok = [(t, ms) for t, ms, good in tl["points"] if good]
        bad = [(t, ms) for t, ms, good in tl["points"] if not good]
        ax.scatter([t for t, _ in ok], [ms for _, ms in ok], s=3, alpha=0.5, label="request")
        if bad:
            ax.scatter([t for t, _ in bad], [max(ms, 0.5) for _, ms in bad], s=18, marker="x", color="red",
                       label=f"failed ({len(bad)})")
        ax.axvline(0, color="black", lw=1, label="reload starts")
        ax.axvline(tl["command_s"], color="grey", ls="--", lw=1, label="command returns")
        if tl["first_new_s"] is not None:
            ax.axvline(tl["first_new_s"], color="green", ls=":", lw=1.5, label="new version first served")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_xlim(-2, tl["until_s"])
        end = "next deploy starts at the right edge" if tl["next_deploy"] else "last deploy"
        ax.set_title(f"{m['method']}: {m['command']}  ({end})", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if tl.get("rss"):
            ax2 = ax.twinx()
            line, = ax2.step([t for t, _ in tl["rss"]], [mb for _, mb in tl["rss"]], where="post", color="tab:orange",
                             lw=1.2, alpha=0.9, label="RSS of the app's units (MB)")
            top = max(mb for _, mb in tl["rss"])
            ax2.set_ylim(0, top * 1.15 if top else 1)
            ax2.set_ylabel("RSS (MB)", color="tab:orange", fontsize=8)
            ax2.tick_params(axis="y", labelcolor="tab:orange", labelsize=7)
            handles.append(line)
            labels.append(line.get_label())
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.07, 1.0), borderaxespad=0)
        ax.set_xlabel("seconds since the reload started", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------
def sweep_points(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[float, ...]]:
    workers, imports = ((4, 8), (0.1, 2.0)) if args.quick else ((4, 8, 16), (0.1, 2.0, 10.0))
    if args.sweep_workers:
        workers = tuple(int(n) for n in args.sweep_workers.split(","))
    if args.sweep_imports:
        imports = tuple(float(s) for s in args.sweep_imports.split(","))
    return workers, imports


def sweep(b: Bench, mode: Mode, args: argparse.Namespace, sweep_reloads: int,
          workers_rows: list[dict[str, Any]], import_rows: list[dict[str, Any]]) -> None:
    """*mode* at each worker count (fast import) and each import time (4 workers), in the bed *b*."""
    worker_counts, import_times = sweep_points(args)
    for n in worker_counts:
        b.install(b.mode_config(mode, n))
        m = b.run_method(f"{mode.label}, {n} workers", RELOAD, sweep_reloads)
        m.update(mode=mode.key, workers=n, point=n)
        workers_rows.append(m)
    b.install(b.mode_config(mode))
    for t in import_times:
        m = b.run_method(f"{mode.label}, import {t:g} s", RELOAD, sweep_reloads,
                         extra=f"\nimport time\ntime.sleep({t})\n", wait=120)
        m.update(mode=mode.key, import_s=f"{t:g} s", point=t)
        import_rows.append(m)
    b.app.ship()  # a fast release again before the next install


def single_unit_methods(args: argparse.Namespace, reloads: int, sweep_reloads: int,
                        env: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One container, examples/flaskapp.toml and variants: the single-master methods and their sweeps."""
    methods: dict[str, dict[str, Any]] = {}
    workers_rows: list[dict[str, Any]] = []
    import_rows: list[dict[str, Any]] = []
    modes = [m for m in MODES if not m.fleet and m.key in args.modes]
    with testbed.boot("bookworm") as c:
        app = appbed.App(c)
        log(f"container {c.name} booted; installing the example app")
        app.install()
        if not app.wait_version("v1"):
            raise SystemExit("example app did not come up:\n" + app.journal(40))
        b = Bench(c, app)
        has_service = c.run("command -v service", check=False).returncode == 0
        seed = SEED if has_service else SEED.replace("service nginx reload", "systemctl reload nginx")
        env["cpus_in_container"] = c.run("nproc").stdout.strip()
        env["stack"] = [v for v in c.run("/opt/venv/bin/python3 -c 'import gunicorn; print(gunicorn.__version__)'; "
                                         "nginx -v 2>&1; systemctl --version | head -1",
                                         check=False).stdout.split("\n") if v]
        env["seed_command"] = seed
        env["rss_cgroups_single"] = c.run("ls -d /sys/fs/cgroup/system.slice/flaskapp.service "
                                          "/sys/fs/cgroup/unified/system.slice/flaskapp.service 2>/dev/null",
                                          check=False).stdout.split()
        b.nginx_errors()  # start each method with an empty nginx error log
        if "single" in args.parts:
            env["ps_gunicorn_fresh_master"] = c.run(PS, check=False).stdout
            for mode in modes:
                b.install(b.mode_config(mode))
                methods[mode.label] = b.run_method(mode.label, RELOAD, reloads)
                if mode.key == "gated":
                    # After generation swaps the master was re-executed by USR2 (as python3); it renames
                    # itself "gunicorn" (prctl in when_ready). Does the seed's `ps -C gunicorn` still find it?
                    env["ps_gunicorn_after_swap"] = c.run(PS, check=False).stdout
                    env["mainpid_after_swap"] = app.props()["MainPID"]
                    log(f"seed after a swap: MainPID {env['mainpid_after_swap']}, "
                        f"ps: {env['ps_gunicorn_after_swap'].splitlines()[:2]}")
                    methods["seed HUP, after a swap"] = b.run_method("seed HUP, after a swap", seed, 2, wait=20)
                    methods["restart (socket)"] = b.run_method("restart (socket)", RESTART, reloads)
        if "sweeps" in args.parts:
            for mode in modes:
                sweep(b, mode, args, sweep_reloads, workers_rows, import_rows)
        if "single" in args.parts:
            # Without socket activation: stop everything, then install the variant (starts it fresh).
            c.run("systemctl stop flaskapp.service flaskapp.socket; systemctl disable flaskapp.socket", check=False)
            b.install(b.config(gunicorn="socket_activation = false", name="bench-nosocket"))
            methods["restart (no socket)"] = b.run_method("restart (no socket)", RESTART, reloads)
    order = [m.label for m in modes] + ["seed HUP, after a swap", "restart (socket)", "restart (no socket)"]
    return [methods[k] for k in order if k in methods], workers_rows, import_rows


# --- part "first": time to the first answer of the new version, gated against the seed's bare HUP ---------
PLAIN_DIR = "/srv/plain"
PLAIN_SOCK = "/run/plain.sock"
PLAIN_PID = "/run/plain.pid"
PLAIN_PORT = 8081
PLAIN_SITE = f"""# The seed's setup: nginx -> a plain gunicorn (bench, part "first").
server {{
    listen {PLAIN_PORT};
    location / {{
        proxy_pass http://unix:{PLAIN_SOCK};
        proxy_set_header Host $host;
    }}
}}
"""
#: Runs the command and, meanwhile, 4 pollers GET / (a new connection each, 100/s in all) through nginx until one answer
#: carries the wanted X-App-Version; prints the command's and that answer's time from the command's start.
FIRST = "/root/first_answer.py"
FIRST_SRC = """import http.client, json, subprocess, sys, threading, time
port, host, want, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
first, stop = [], threading.Event()
PERIOD = 0.04  # each of the 4 pollers: a request every 40 ms at most (100/s in all): the same load for both
def poll(i):
    last = time.monotonic() - PERIOD + i * PERIOD / 4  # staggered: one request every 10 ms
    while not stop.wait(max(0.0, PERIOD - (time.monotonic() - last))):
        last = time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", "/", headers={"Host": host})
            r = c.getresponse()
            r.read()
            c.close()
            if r.getheader("X-App-Version") == want:
                first.append(time.monotonic())
                stop.set()
        except (OSError, http.client.HTTPException):
            pass
pollers = [threading.Thread(target=poll, args=(i,)) for i in range(4)]
t0 = time.monotonic()
for t in pollers:
    t.start()
r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
t1 = time.monotonic()
stop.wait(120)
stop.set()
for t in pollers:
    t.join()
print(json.dumps({"t0": t0, "command_s": t1 - t0, "first_s": min(first) - t0 if first else None, "rc": r.returncode,
                  "err": (r.stdout + r.stderr)[-400:]}))
"""


def first_answer(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """Reloader's gated generation against the seed's bare `kill -HUP` of a plain gunicorn, both serving
    the example app with a *--first-import* s import, alternately in one container."""
    delay, rounds = args.first_import, args.first_rounds
    extra = f"\nimport time\ntime.sleep({delay:g})\n"
    with testbed.boot("bookworm") as c:
        app = appbed.App(c)
        log(f"container {c.name} booted; part first: gated vs the seed's bare HUP, {delay:g} s import")
        app.install()
        if not app.wait_version("v1"):
            raise SystemExit("example app did not come up:\n" + app.journal(40))
        c.write_file(FIRST, FIRST_SRC)
        source = c.read_file(appbed.APP_SRC)
        c.run(["mkdir", "-p", PLAIN_DIR])
        c.write_file(f"{PLAIN_DIR}/app.py", source.replace('VERSION = "v1"', 'VERSION = "p1"'))
        c.run(["systemd-run", "--unit", "plain-gunicorn", "--property", "KillMode=mixed",
               "/opt/venv/bin/gunicorn", "--workers", "4", "--bind", f"unix:{PLAIN_SOCK}", "--chdir", PLAIN_DIR,
               "--pid", PLAIN_PID, "app:app"])
        c.write_file("/etc/nginx/conf.d/plain.conf", PLAIN_SITE)
        c.run("nginx -t && systemctl reload nginx")
        hup = f"kill -HUP $(cat {PLAIN_PID})"
        rows: dict[str, list[dict[str, Any]]] = {"seed": [], "gated": []}
        for n in range(2, rounds + 2):
            c.write_file(f"{PLAIN_DIR}/app.py.new", source.replace('VERSION = "v1"', f'VERSION = "p{n}"') + extra)
            c.run(["mv", f"{PLAIN_DIR}/app.py.new", f"{PLAIN_DIR}/app.py"])  # updated in place, atomically
            rows["seed"].append(_first(c, PLAIN_PORT, "localhost", f"p{n}", hup))
            app.ship(f"v{n}", extra=extra)
            rows["gated"].append(_first(c, 80, HOST, f"v{n}", RELOAD))
            rows["gated"][-1]["steps"] = _gated_steps(c, rows["gated"][-1]["t0"])
            log(f"  round {n - 1}: seed HUP {rows['seed'][-1]['first_s']} s, gated {rows['gated'][-1]['first_s']} s "
                f"(command {rows['gated'][-1]['command_s']:.2f} s)")
            time.sleep(1)  # the retired generation's exit, outside the next round
        c.run("systemctl stop plain-gunicorn", check=False)
    seed = med([r["first_s"] for r in rows["seed"]])
    gated = med([r["first_s"] for r in rows["gated"]])
    names = [name for name, _ in GATED_STEPS] + ["last worker booting"]
    steps = {name: _r(med([r["steps"].get(name) for r in rows["gated"]])) for name in names}
    result = {"import_s": delay, "rounds": rounds, "seed_hup_first_s": _r(seed), "gated_first_s": _r(gated),
              "gated_steps_s": steps,
              "ratio": round(gated / seed, 3) if seed and gated else None, "per_round": rows}
    env["first_answer"] = {k: v for k, v in result.items() if k != "per_round"}
    return result


def _first(c: testbed.Container, port: int, host: str, version: str, command: str) -> dict[str, Any]:
    r = c.run(["python3", FIRST, str(port), host, version, command], timeout=300)
    out = json.loads(r.stdout)
    out["first_s"] = _r(out["first_s"])
    return out


#: Journal lines of a gated reload that mark where its time to the first answer goes.
GATED_STEPS = (("helper started", "reloader: flaskapp: "), ("USR2 sent", "starting a new generation"),
               ("new master up", "Starting gunicorn"), ("first worker booting", "Booting worker"),
               ("gate open", "gate open:"))


def _gated_steps(c: testbed.Container, since: float) -> dict[str, float]:
    """Seconds from the reload command's start to the first journal line of each of GATED_STEPS after it;
    "last worker booting": the last "Booting worker" before the gate opened."""
    r = c.run("journalctl -u flaskapp -o short-monotonic --no-pager -n 3000", check=False)
    steps: dict[str, float] = {}
    booting = []
    for line in r.stdout.splitlines():
        try:
            t = float(line[1:line.index("]")]) - since
        except ValueError:
            continue
        if t < 0:
            continue
        for name, text in GATED_STEPS:
            if text in line and name not in steps:
                steps[name] = round(t, 3)
        if "Booting worker" in line and "gate open" not in steps:
            booting.append(t)
    if booting:
        steps["last worker booting"] = round(max(booting), 3)
    return steps


def first_table(result: dict[str, Any]) -> str:
    return "\n".join([
        f"| Time to the new version's first answer ({result['import_s']:g} s import, median of "
        f"{result['rounds']}) | s |",
        "|---|---|",
        f"| seed: `kill -HUP` of a plain gunicorn, code updated in place "
        f"| {_f(result['seed_hup_first_s'], '{:.2f}')} |",
        f"| reloader: gated generation (`systemctl reload`) | {_f(result['gated_first_s'], '{:.2f}')} |",
        f"| ratio (goal: at most 1.10) | {_f(result['ratio'], '{:.2f}')} |",
        "",
        "Where the gated reload's time to the first answer goes (median s after `systemctl reload` started): "
        + ", ".join(f"{name} {_f(t, '{:.2f}')}" for name, t in sorted(
            result["gated_steps_s"].items(), key=lambda kv: kv[1] if kv[1] is not None else 1e9)),
    ])


def seed_methods(reloads: int, env: dict[str, Any]) -> list[dict[str, Any]]:
    """A fresh container: the seed's method on the master systemd started (no reloader swap ever ran),
    then reloader's default strategy on the master those HUPs left behind."""
    out = []
    with testbed.boot("bookworm") as c:
        app = appbed.App(c)
        log(f"container {c.name} booted; installing the example app for the seed's method")
        app.install()
        if not app.wait_version("v1"):
            raise SystemExit("example app did not come up:\n" + app.journal(40))
        b = Bench(c, app)
        seed = env["seed_command"]
        env["ps_gunicorn_fresh_master"] = c.run(PS, check=False).stdout
        b.nginx_errors()
        out.append(b.run_method("seed HUP", seed, reloads))
        master = app.props()["MainPID"]
        fds = f'for f in /proc/{master}/fd/*; do echo "${{f##*/}} -> $(readlink $f)"; done'
        env["master_fds_after_seed_hups"] = c.run(fds, check=False).stdout.splitlines()
        log(f"master {master} after the seed's HUPs: fds {env['master_fds_after_seed_hups']}")
        out.append(b.run_method("reloader, after the seed's HUPs", RELOAD, 2, wait=10))
    return out


def fleet_method(mode: Mode, args: argparse.Namespace, reloads: int, sweep_reloads: int, env: dict[str, Any],
                 workers_rows: list[dict[str, Any]], import_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A fresh container with a blue-green or rolling example installed: *reloads* deploys under load
    (part "fleet"), then the sweeps (part "sweeps")."""
    try:
        with testbed.boot("bookworm") as c:
            app = appbed.App(c)
            b = Bench(c, app)
            config = b.mode_config(mode)
            log(f"container {c.name} booted; installing {config} ({mode.base} + {mode.reload})")
            app.install(config)
            if not app.wait_version("v1"):
                raise RuntimeError(f"{mode.label}: the app did not come up:\n" + app.journal(40))
            env.setdefault("rss_cgroups_fleet", {})[mode.label] = c.run(
                "ls -d /sys/fs/cgroup/system.slice/flaskapp.service "
                "/sys/fs/cgroup/system.slice/system-flaskapp.slice/*.service 2>/dev/null", check=False).stdout.split()
            b.nginx_errors()
            m = None
            if "fleet" in args.parts:
                m = b.run_method(mode.label, RELOAD, reloads)
                m["config"] = f"{mode.base} + {mode.reload}, workers = {4 // mode.instances} per instance"
            if "sweeps" in args.parts:
                sweep(b, mode, args, sweep_reloads, workers_rows, import_rows)
            return m
    except Exception as e:  # noqa: BLE001 - keep the other methods' results; the error is reported
        log(f"{mode.label}: FAILED: {e}")
        env.setdefault("errors", []).append(f"{mode.label}: {str(e)[-1500:]}")
        return None


def _commit() -> str:
    """The checkout measured (bind-mounted into the containers as /src)."""
    import subprocess

    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() or "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="fewer reloads and sweep points")
    p.add_argument("--reloads", type=int, default=None, help="reloads per method (default 3, quick 2)")
    p.add_argument("--sweep-reloads", type=int, default=None, help="deploys per sweep point (default 2, quick 1)")
    p.add_argument("--sweep-workers", default="", help="worker counts of the sweep, e.g. 16 (default 4,8,16; "
                                                       "quick 4,8)")
    p.add_argument("--sweep-imports", default="", help="import times of the sweep in seconds, e.g. 10 (default "
                                                       "0.1,2,10; quick 0.1,2)")
    p.add_argument("--out", default=str(HERE), help="directory for results.{md,json} and the plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--first-import", type=float, default=2.0, help="part first: the app's import time (s)")
    p.add_argument("--first-rounds", type=int, default=5, help="part first: deploys of each method")
    p.add_argument("--parts", default="single,sweeps,seed,fleet",
                   help="comma-separated subset of single (the single-master modes and methods), sweeps (each "
                        "mode by worker count and import time), seed (the seed's method on a fresh master), "
                        "fleet (blue-green, rolling), first (time to the first answer: gated against the "
                        "seed's bare HUP of a plain gunicorn); default all but first")
    p.add_argument("--modes", default=",".join(m.key for m in MODES),
                   help="comma-separated subset of the modes " + ", ".join(m.key for m in MODES) + " (default all)")
    args = p.parse_args()
    args.parts = set(args.parts.split(","))
    args.modes = set(args.modes.split(","))
    unknown = args.modes - {m.key for m in MODES}
    if unknown:
        p.error(f"unknown mode {', '.join(sorted(unknown))}; use {', '.join(m.key for m in MODES)}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("matplotlib is missing: pip install matplotlib (or pass --no-plot)")
    reloads = args.reloads or (2 if args.quick else 3)
    sweep_reloads = args.sweep_reloads or (1 if args.quick else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    env: dict[str, Any] = {"started": started_wall, "host_loadavg_before": load_before, "commit": _commit(),
                           "reloads_per_method": reloads, "reloads_per_sweep_point": sweep_reloads,
                           "load": "4 workers on / (2 keep-alive, 2 new connections) + 1 on /slow?s=1, "
                                   "through nginx",
                           "rss": "sum of VmRSS of every process in the app's units' cgroups, sampled every "
                                  "50 ms inside the container",
                           "quick": args.quick, "parts": sorted(args.parts)}
    if "first" in args.parts:
        first = first_answer(args, env)
        text = (f"Measured {started_wall}, commit {env['commit']}, on the test bed (a Debian 12 container, "
                f"host load average {' '.join(load_before)} before):\n\n{first_table(first)}\n")
        (out / "first_answer.json").write_text(json.dumps({"environment": env, **first}, indent=2) + "\n")
        (out / "first_answer.md").write_text(text)
        print(text)
        log(f"wrote {out / 'first_answer.md'}, {out / 'first_answer.json'}")
        args.parts.discard("first")
        if not args.parts:
            return 0
    methods: list[dict[str, Any]] = []
    workers_rows: list[dict[str, Any]] = []
    import_rows: list[dict[str, Any]] = []
    single_modes = [m for m in MODES if not m.fleet and m.key in args.modes]
    if "single" in args.parts or ("sweeps" in args.parts and single_modes):
        methods, workers_rows, import_rows = single_unit_methods(args, reloads, sweep_reloads, env)
    if "seed" in args.parts:
        env.setdefault("seed_command", SEED)
        seeds = seed_methods(reloads, env)
        at = next((i for i, m in enumerate(methods) if m["method"] == "seed HUP, after a swap"), len(methods))
        methods[at:at] = seeds[:1]
        methods += seeds[1:]
    if args.parts & {"fleet", "sweeps"} and any(m.fleet and m.key in args.modes for m in MODES):
        fleet = [fleet_method(mode, args, reloads, sweep_reloads, env, workers_rows, import_rows)
                 for mode in MODES if mode.fleet and mode.key in args.modes]
        at = next((i + 1 for i, m in enumerate(methods) if m["method"] == HUP_LABEL), len(methods))
        methods[at:at] = [m for m in fleet if m]

    load_after = Path("/proc/loadavg").read_text().split()[:3]
    env["host_loadavg_after"] = load_after
    env["runtime_s"] = round(time.monotonic() - T0)
    results = {"environment": env, "methods": methods, "workers": workers_rows, "import_time": import_rows}
    slim = json.loads(json.dumps(results))
    for group in ("methods", "workers", "import_time"):
        for m in slim[group]:
            m.pop("first_reload_records", None)
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")

    nproc = env.get("cpus_in_container", "?")
    stack = env.get("stack") or ["?"]
    md = [
        f"Measured {started_wall} on the test bed (Debian 12 containers, {nproc} CPUs, gunicorn {stack[0]}; "
        f"{env['runtime_s'] // 60} min in all). "
        f"Medians over {reloads} deploys per method, each of a freshly shipped release, under load "
        f"({env['load']}). Time to new version: from the reload command starting until the first response "
        "of the new release; p50/p99 and throughput: regular requests started between the command's start "
        "and the later of its end and the new version's first response, against the 2 s of steady state "
        "before it. Failed requests and keep-alive retries (a reused idle keep-alive connection that nginx "
        "closed, re-sent as browsers do; not a failure) are totals over all deploys of the method. "
        "RSS: the sum of VmRSS of every process in the app's units (flaskapp.service; for blue-green and "
        "rolling also every flaskapp@*.service), sampled every 50 ms: median over deploys of the peak from "
        "the command's start until the next deploy, against the median over the 1.5 s before it. Shared "
        "pages of forked workers count once per process, and the peak includes reloader's own helper and "
        "its pre-flight process. blue-green runs with `bake_seconds = 1` (the example has 5; the default "
        "strategy bakes 2 s); rolling with 2 instances of workers / 2 each (the example has 3 x 2). x hup: "
        "time to new version over the hup strategy's in the same run (the same sweep point). Helper: the "
        "reload helper's own peak RSS and CPU time as it reports them (getrusage), + its children's "
        "(pre-flight, setup); median over deploys. "
        f"Host load average {' '.join(load_before)} before, {' '.join(load_after)} after (compare rows of "
        "one run, not runs).",
        "",
        methods_table(methods),
    ]
    if workers_rows:
        md += ["", f"Each mode by worker count ({sweep_reloads} deploys each, median; rolling: 2 instances of "
               "workers / 2):", "", sweep_table("Workers", "workers", workers_rows)]
    if import_rows:
        md += ["", f"Each mode by app import time at 4 workers ({sweep_reloads} deploys each, median; gated "
               "and lockstep import the release in the pre-flight and the new workers at the same time, "
               "lockstep one worker after another; then the bake):", "",
               sweep_table("Import time", "import_s", import_rows)]
    if env.get("errors"):
        md += ["", "Errors:", "", *[f"    {e.splitlines()[0]}" for e in env["errors"]]]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    if not args.no_plot and methods:
        plot(methods, out / "reload_latency.png")
    print(text)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}" + ("" if args.no_plot else
                                                               f", {out / 'reload_latency.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
