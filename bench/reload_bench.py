#!/usr/bin/env python3
"""Benchmark: how each way of deploying the example app behaves under load, side by side, on one container.

Run on the test host, as root (it boots the real-systemd test bed of tests/testbed.py):

    pip install matplotlib          # for the plot; the rest is the standard library
    sudo python3 bench/reload_bench.py            # full run, ~10 minutes
    sudo python3 bench/reload_bench.py --quick    # ~4 minutes, fewer reloads and sweep points

Methods compared (each deploys a freshly shipped release, several times, under the same load):

* ``reloader``         -- ``systemctl reload flaskapp`` with reloader's default strategy (new generation)
* ``reloader hup``     -- the same with ``strategy = "hup"`` (the master re-forks its workers in place)
* ``seed HUP``         -- the original method: ``service nginx reload`` then
                          ``kill -HUP $(ps -C gunicorn fch -o pid | head -n 1)``
* ``restart (socket)`` -- ``systemctl restart flaskapp`` with the socket held by flaskapp.socket
* ``restart (no socket)`` -- the same with ``socket_activation = false`` (gunicorn binds the socket)

plus how reloader's default strategy scales with the number of workers and with the app's import time.

The load generator (reloader/loadgen.py) runs inside the container against nginx; every reload command
runs inside too, wrapped so its start and end are taken on the same monotonic clock as the requests.
Writes bench/results.json, bench/results.md and bench/reload_latency.png; prints the tables.
This is not a test: it asserts nothing and exits 0 unless the bed itself breaks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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

STEADY = 2.0  # seconds of steady state measured before each reload
SETTLE = 2.0  # seconds of load after the new version is seen, before the next reload


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


# --- the bed ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, c: testbed.Container, app: appbed.App) -> None:
        self.c, self.app = c, app
        c.write_file(TIMED, TIMED_SRC)
        self.base_config = c.read_file("/src/examples/flaskapp.toml")

    def config(self, *, workers: int = 4, gunicorn: str = "", reload: str = "", name: str = "bench") -> str:
        text = self.base_config.replace("workers = 4", f"workers = {workers}")
        text = text.replace("[gunicorn]\n", f"[gunicorn]\n{gunicorn}\n")
        if reload:
            text += f"\n[reload]\n{reload}\n"
        path = f"/root/{name}.toml"
        self.c.write_file(path, text)
        return path

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

    def start_load(self, concurrency: int, long: int) -> Any:
        self.c.run(["rm", "-f", LOAD_OUT, LOAD_STOP])
        cmd = ("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/ "
               f"--concurrency {concurrency} --long {long} --long-path '/slow?s=1' -H 'Host: {HOST}' "
               f"--until-file {LOAD_STOP} --out {LOAD_OUT} --records --max-duration 1800 --timeout 30")
        import subprocess

        p = self.c.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        return p

    def stop_load(self, p: Any) -> dict[str, Any]:
        self.c.run(["touch", LOAD_STOP])
        p.wait(timeout=120)
        return json.loads(self.c.read_file(LOAD_OUT))

    def run_method(self, label: str, command: str, reloads: int, *, concurrency: int = 4, long: int = 1,
                   extra: str = "") -> dict[str, Any]:
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
                seen = self.app.wait_version(version, timeout=60)
                ev["served"] = seen
                events.append(ev)
                log(f"  {label}: {version} command {ev['end'] - ev['start']:.2f} s rc={ev['rc']} "
                    f"served={seen}" + (f" {ev['err'].strip()[-200:]}" if ev["rc"] else ""))
                time.sleep(SETTLE + (0 if seen else 5))
        finally:
            report = self.stop_load(load)
        result = analyse(label, command, report, events)
        result["last_reload_steps"] = self.steps(events[-1]["start"]) if events else []
        result["nginx_errors"] = self.nginx_errors()
        return result

    def steps(self, since: float) -> list[str]:
        """reloader's own journal lines (monotonic timestamps) since *since*: where the reload time goes."""
        r = self.c.run("journalctl -u flaskapp -o short-monotonic --no-pager -n 400", check=False)
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


def analyse(label: str, command: str, report: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    recs = report.get("records") or []
    regular = [r for r in recs if not r["long"]]
    per = []
    for ev in events:
        start, end = ev["start"], ev["end"]
        new = [r["start"] + r["latency"] for r in recs
               if r["version"] == ev["version"] and r["kind"] == "ok" and r["start"] + r["latency"] >= start]
        first_new = min(new) if new else None
        win_end = max(end, first_new or end)
        win_end = max(win_end, start + 0.2)
        steady = [r for r in regular if start - STEADY <= r["start"] < start - 0.1]
        during = [r for r in regular if start <= r["start"] <= win_end]
        fails: dict[str, int] = {}
        for r in recs:
            if r["kind"] != "ok" and start - 0.5 <= r["start"] <= win_end + SETTLE:
                fails[r["kind"]] = fails.get(r["kind"], 0) + 1
        steady_rps = len(steady) / (STEADY - 0.1)
        during_rps = len(during) / (win_end - start)
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
            "failures": fails,
            "error": ev["err"].strip()[-300:] if ev["rc"] else "",
        })
    keys = ("command_s", "time_to_new_version_s", "p50_ms", "p99_ms", "max_ms", "steady_p50_ms",
            "steady_p99_ms", "throughput_ratio")
    return {
        "method": label, "command": command, "reloads": len(events),
        "total_requests": report["total"], "failed": report["failed"], "failures": report["failures"],
        "keepalive_retries": report["keepalive_retries"],
        "long": {"total": report["long"]["total"], "failed": report["long"]["failed"]},
        "never_served": [p["version"] for p in per if p["time_to_new_version_s"] is None],
        "command_failed": [p["version"] for p in per if p["rc"]],
        "median": {k: _r(med([p[k] for p in per])) for k in keys},
        "per_reload": per,
        "first_reload_records": _timeline(recs, events[0], events[1]["start"] if len(events) > 1 else None)
        if events else None,
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _timeline(recs: list[dict[str, Any]], ev: dict[str, Any], next_start: float | None) -> dict[str, Any]:
    """Records around the first reload (until the next one starts), relative to its start, for the plot."""
    start = ev["start"]
    stop = min(start + 12, next_start - 0.05) if next_start else start + 12
    pts = [(round(r["start"] - start, 4), round(r["latency"] * 1000, 2), r["kind"] == "ok")
           for r in recs if not r["long"] and start - 2 <= r["start"] <= stop]
    new = [r["start"] + r["latency"] - start for r in recs
           if r["version"] == ev["version"] and r["kind"] == "ok" and r["start"] + r["latency"] >= start]
    return {"command_s": ev["end"] - start, "first_new_s": min(new) if new else None, "points": pts}


# --- output -----------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = "{:.0f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _fails(m: dict[str, Any]) -> str:
    if not m["failed"]:
        return "0"
    return f"**{m['failed']}** (" + ", ".join(f"{k} {v}" for k, v in sorted(m["failures"].items())) + ")"


def methods_table(methods: list[dict[str, Any]]) -> str:
    rows = ["| Method | Failed requests | Time to new version | Command returns after | p50 / p99 during "
            "| steady p99 | Throughput during |",
            "|---|---|---|---|---|---|---|"]
    for m in methods:
        md = m["median"]
        never = f" ({len(m['never_served'])}x never)" if m["never_served"] else ""
        rows.append(
            f"| {m['method']} | {_fails(m)} | {_f(md['time_to_new_version_s'], '{:.2f} s')}{never} "
            f"| {_f(md['command_s'], '{:.2f} s')} | {_f(md['p50_ms'])} / {_f(md['p99_ms'])} ms "
            f"| {_f(md['steady_p99_ms'])} ms | {_f(md['throughput_ratio'] and md['throughput_ratio'] * 100)} % |")
    return "\n".join(rows)


def sweep_table(title: str, key: str, rows_in: list[dict[str, Any]]) -> str:
    rows = [f"| {title} | Reload command | Time to new version | p99 during | Failed requests |",
            "|---|---|---|---|---|"]
    for m in rows_in:
        md = m["median"]
        rows.append(f"| {m[key]} | {_f(md['command_s'], '{:.2f} s')} | {_f(md['time_to_new_version_s'], '{:.2f} s')} "
                    f"| {_f(md['p99_ms'])} ms | {_fails(m)} |")
    return "\n".join(rows)


def plot(methods: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [m for m in methods if m["first_reload_records"]
              and m["method"] in ("reloader", "reloader hup", "seed HUP", "restart (socket)", "restart (no socket)")]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 2.3 * len(chosen)), sharex=True, squeeze=False)
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
        ax.set_title(f"{m['method']}: {m['command']}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the reload started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="fewer reloads and sweep points (~4 min)")
    p.add_argument("--reloads", type=int, default=None, help="reloads per method (default 5, quick 2)")
    p.add_argument("--out", default=str(HERE), help="directory for results.{md,json} and the plot")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args()
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("matplotlib is missing: pip install matplotlib (or pass --no-plot)")
    reloads = args.reloads or (2 if args.quick else 5)
    sweep_reloads = 1 if args.quick else 3
    worker_counts = (4, 8, 16)
    import_times = (0.1, 2.0) if args.quick else (0.1, 2.0, 10.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    with testbed.boot("bookworm") as c:
        app = appbed.App(c)
        log(f"container {c.name} booted; installing the example app")
        app.install()
        if not app.wait_version("v1"):
            raise SystemExit("example app did not come up:\n" + app.journal(40))
        b = Bench(c, app)
        has_service = c.run("command -v service", check=False).returncode == 0
        seed = SEED if has_service else SEED.replace("service nginx reload", "systemctl reload nginx")
        nproc = c.run("nproc").stdout.strip()
        versions = c.run("/opt/venv/bin/python3 -c 'import gunicorn, flask; print(gunicorn.__version__)'; "
                         "nginx -v 2>&1; systemctl --version | head -1", check=False).stdout.split("\n")

        b.nginx_errors()  # start each method with an empty nginx error log
        methods = []
        methods.append(b.run_method("reloader", RELOAD, reloads))
        # After a generation swap the master is re-executed as python3 (gunicorn's USR2 execs
        # sys.executable), so `ps -C gunicorn` no longer finds it. Record that, then give the seed's
        # command a master started by systemd, as it would have on the seed's hosts.
        ps_after_swap = c.run("ps -C gunicorn fch -o pid | head -n 1; ps -eo pid,ppid,comm,args | grep -v grep "
                              "| grep gunicorn", check=False).stdout
        c.run("systemctl restart flaskapp")
        ps_fresh = c.run("ps -C gunicorn fch -o pid | head -n 1", check=False).stdout.strip()
        log(f"seed: `ps -C gunicorn` after a swap: {ps_after_swap.splitlines()[:1]}; after a restart: {ps_fresh!r}")
        b.nginx_errors()
        methods.append(b.run_method("seed HUP", seed, reloads))
        methods.append(b.run_method("restart (socket)", RESTART, reloads))

        workers_rows = []
        for n in worker_counts:
            b.install(b.config(workers=n, name=f"bench-w{n}"))
            m = b.run_method(f"reloader, {n} workers", RELOAD, sweep_reloads)
            m["workers"] = n
            workers_rows.append(m)
        b.install(b.config(name="bench-default"))

        import_rows = []
        for s in import_times:
            m = b.run_method(f"reloader, import {s:g} s", RELOAD, sweep_reloads,
                             extra=f"\nimport time\ntime.sleep({s})\n")
            m["import_s"] = f"{s:g} s"
            import_rows.append(m)
        app.ship()  # a fast release again before reinstalling

        b.install(b.config(reload='strategy = "hup"', name="bench-hup"))
        methods.insert(1, b.run_method("reloader hup", RELOAD, reloads))

        # Without socket activation: stop everything, then install the variant (starts it fresh).
        c.run("systemctl stop flaskapp.service flaskapp.socket; systemctl disable flaskapp.socket", check=False)
        b.install(b.config(gunicorn="socket_activation = false", name="bench-nosocket"))
        methods.append(b.run_method("restart (no socket)", RESTART, reloads))

    load_after = Path("/proc/loadavg").read_text().split()[:3]
    env = {"started": started_wall, "host_loadavg_before": load_before, "host_loadavg_after": load_after,
           "cpus_in_container": nproc, "stack": [v for v in versions if v],
           "reloads_per_method": reloads, "reloads_per_sweep_point": sweep_reloads,
           "load": "4 workers on / (2 keep-alive, 2 new connections) + 1 on /slow?s=1, through nginx",
           "quick": args.quick, "seed_command": seed, "ps_gunicorn_after_swap": ps_after_swap,
           "ps_gunicorn_after_restart": ps_fresh}
    results = {"environment": env, "methods": methods, "workers": workers_rows, "import_time": import_rows}
    slim = json.loads(json.dumps(results))
    for group in ("methods", "workers", "import_time"):
        for m in slim[group]:
            m.pop("first_reload_records", None)
    (out / "results.json").write_text(json.dumps(slim, indent=2) + "\n")

    md = [
        f"Measured {started_wall} on the test bed (Debian 12 container, {nproc} CPUs, gunicorn "
        f"{env['stack'][0] if env['stack'] else '?'}). "
        f"Medians over {reloads} deploys per method, each of a freshly shipped release, under load "
        f"({env['load']}). Time to new version: from the reload command starting until the first response "
        "of the new release; p50/p99 and throughput: regular requests started between the command's start "
        "and the later of its end and the new version's first response, against the 2 s of steady state "
        "before it. Failed requests are all failures around all deploys of the method. Host load average "
        f"{' '.join(load_before)} before, {' '.join(load_after)} after (other jobs share the CPUs: "
        "compare rows of one run, not runs).",
        "",
        methods_table(methods),
        "",
        f"reloader's default strategy by worker count ({sweep_reloads} deploys each, median):",
        "",
        sweep_table("Workers", "workers", workers_rows),
        "",
        f"reloader's default strategy by app import time ({sweep_reloads} deploys each, median; the pre-flight "
        "imports the release too, then the new workers do, then the 2 s bake):",
        "",
        sweep_table("Import time", "import_s", import_rows),
    ]
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    if not args.no_plot:
        plot(methods, out / "reload_latency.png")
    print(text)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}" + ("" if args.no_plot else
                                                               f", {out / 'reload_latency.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
