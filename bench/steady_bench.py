#!/usr/bin/env python3
"""Benchmark: what reloader costs between deploys. Steady-state throughput and latency of the example app,
side by side in one container, against the seed's own setup.

Run on the test host, as root (it boots the real-systemd test bed of tests/testbed.py once):

    sudo python3 bench/steady_bench.py                       # 3 rounds x 10 s per setup
    sudo python3 bench/steady_bench.py --rounds 5 --seconds 20 --concurrency 8

Setups, all serving the same release of examples/flaskapp with the same 4 sync workers and venv
(/srv/flaskapp/venv), behind the same nginx:

* ``seed setup``            -- the seed's own: nginx (a plain ``proxy_pass``, port 8080) -> a plain gunicorn
                               on TCP 127.0.0.1:8000 (``gunicorn -w 4 app:app`` as a transient systemd service)
* ``reloader default``      -- ``reloader install examples/flaskapp.toml`` (``access_log = false``)
* ``reloader access_log on`` -- the same with ``[gunicorn] access_log = true`` (to the journal, priority debug)

Each round measures every setup for ``--seconds`` with the closed-loop keep-alive load generator
(reloader/loadgen.py, inside the container, against nginx), in the order seed, default, access log on,
default again (A-B-A: the second default run shows the drift of a shared machine). The two reloader configs
are switched with ``reloader install --restart`` between runs; the seed's gunicorn stays up meanwhile (idle).
The table sums every run of a setup (requests/s) and takes latency percentiles over all its requests; ratios
are against the seed setup measured in the same run. After a change to the gunicorn config (e.g. new server
hooks), re-run the same command: nothing here depends on what the config contains.

Writes bench/steady_results.json and bench/steady_results.md; prints the table. Not a test: asserts nothing.
"""

from __future__ import annotations

import argparse
import json
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

SEED_PORT, SEED_NGINX_PORT = 8000, 8080
SEED_UNIT = "seed-gunicorn"
#: The seed's nginx site: the plain proxy of gunicorn's own deployment docs (no upstream keep-alive).
SEED_SITE = f"""server {{
    listen {SEED_NGINX_PORT};
    server_name _;
    location / {{
        proxy_pass http://127.0.0.1:{SEED_PORT};
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_redirect off;
    }}
}}
"""
LOAD_OUT = "/var/tmp/steady-load.json"
SETUPS = ("seed setup", "reloader default", "reloader access_log on")


def log(msg: str) -> None:
    print(f"[steady {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


class Bed:
    def __init__(self, c: testbed.Container, workers: int) -> None:
        self.c, self.app, self.workers = c, appbed.App(c), workers
        self.default = self.app.variant(gunicorn=f"workers = {workers}", path="/root/steady-default.toml")
        self.access = self.app.variant(gunicorn=f"workers = {workers}\naccess_log = true",
                                       path="/root/steady-access.toml")
        self.current = ""

    def install(self) -> None:
        self.app.install(self.default)
        self.current = self.default
        assert self.app.wait_version("v1"), self.app.journal()
        # The seed's gunicorn: same venv, release and workers; gunicorn's defaults otherwise.
        self.c.run(["systemd-run", f"--unit={SEED_UNIT}", "--property=User=flaskapp", "--property=Group=flaskapp",
                    "--working-directory=/srv/flaskapp/current", "/srv/flaskapp/venv/bin/gunicorn",
                    "--workers", str(self.workers), "--bind", f"127.0.0.1:{SEED_PORT}", "app:app"])
        self.c.write_file("/etc/nginx/sites-enabled/seed.conf", SEED_SITE)
        self.c.run("nginx -t -q && systemctl reload nginx")
        deadline = time.monotonic() + 60
        while self.seed_version() != "v1":
            if time.monotonic() > deadline:
                raise SystemExit("the seed's gunicorn does not answer:\n"
                                 + self.c.run(f"journalctl -u {SEED_UNIT} -n 30", check=False).stdout)
            time.sleep(0.5)

    def seed_version(self) -> str:
        r = self.c.run(f"curl -s -m 5 http://127.0.0.1:{SEED_NGINX_PORT}/", check=False)
        try:
            return json.loads(r.stdout)["version"]
        except (ValueError, KeyError):
            return ""

    def use(self, config: str) -> None:
        """Switch reloader's app to *config* (a restart: the access log is a gunicorn start setting)."""
        if config == self.current:
            return
        r = self.c.run(["reloader", "install", "--restart", config], check=False, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"reloader install {config} failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        self.current = config
        assert self.app.wait_version("v1"), self.app.journal()

    def measure(self, url: str, seconds: float, concurrency: int) -> dict[str, Any]:
        self.c.run(["rm", "-f", LOAD_OUT])
        time.sleep(1.0)  # let a restart's boot settle
        cmd = ("cd /src && python3 -m reloader.loadgen " + url + f" --concurrency {concurrency} "
               f"--keepalive-fraction 1 -H 'Host: {appbed.HOST}' --duration {seconds:g} --timeout 30 "
               f"--out {LOAD_OUT}")
        self.c.run(cmd, check=False, timeout=seconds + 120)
        report = json.loads(self.c.read_file(LOAD_OUT))
        lat, seconds = report["latency_ms"], report["duration_s"]
        return {"requests": report["total"], "failed": report["failed"], "seconds": seconds,
                "p50": lat["p50"] / 1000, "p99": lat["p99"] / 1000, "rps": report["total"] / seconds}


def percentile_of_runs(runs: list[dict[str, Any]], key: str) -> float:
    """A request-weighted mean of the runs' percentiles (each run's are over its own requests)."""
    total = sum(r["requests"] for r in runs)
    return sum(r[key] * r["requests"] for r in runs) / total if total else 0.0


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = {}
    for setup, runs in results.items():
        requests, seconds = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
        rows[setup] = {"rps": requests / seconds, "p50": percentile_of_runs(runs, "p50"),
                       "p99": percentile_of_runs(runs, "p99"), "failed": sum(r["failed"] for r in runs),
                       "runs": [round(r["rps"]) for r in runs]}
    seed, default = rows["seed setup"], rows["reloader default"]
    lines = ["| setup | requests/s | x seed | x default | p50 ms | p99 ms | p99 x seed | failed | per run (req/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for setup, r in rows.items():
        lines.append(f"| {setup} | {r['rps']:.0f} | {r['rps'] / seed['rps']:.3f} | {r['rps'] / default['rps']:.3f} "
                     f"| {r['p50'] * 1000:.1f} | {r['p99'] * 1000:.1f} | {r['p99'] / seed['p99']:.2f} "
                     f"| {r['failed']} | {', '.join(map(str, r['runs']))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="per setup per round")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop keep-alive clients")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--suite", default="bookworm", choices=("bookworm", "trixie"))
    p.add_argument("--out", default=str(HERE / "steady_results"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    with testbed.boot(args.suite) as c:
        bed = Bed(c, args.workers)
        bed.install()
        log(f"container {c.name}: reloader's app on :80, the seed's setup on :{SEED_NGINX_PORT}")
        reloader_url, seed_url = "http://127.0.0.1/", f"http://127.0.0.1:{SEED_NGINX_PORT}/"
        for n in range(1, args.rounds + 1):
            for setup, config, url in (("seed setup", "", seed_url), ("reloader default", bed.default, reloader_url),
                                       ("reloader access_log on", bed.access, reloader_url),
                                       ("reloader default", bed.default, reloader_url)):
                if config:
                    bed.use(config)
                run = bed.measure(url, args.seconds, args.concurrency)
                results[setup].append(run)
                log(f"round {n}: {setup}: {run['rps']:.0f} req/s, p50 {run['p50'] * 1000:.1f} ms, "
                    f"p99 {run['p99'] * 1000:.1f} ms, {run['failed']} failed")
        journald = c.run("journalctl -u systemd-journald -o cat --no-pager | grep -c 'Suppressed' || true",
                         check=False).stdout.strip()
    md = table(results)
    head = (f"Steady state, {args.workers} sync workers, {args.concurrency} keep-alive clients, "
            f"{args.rounds} rounds x {args.seconds:g} s per setup (reloader default twice per round), "
            f"{args.suite}, one container. journald suppression notices during the run: {journald}.")
    print(head + "\n\n" + md)
    Path(args.out + ".md").write_text(head + "\n\n" + md + "\n")
    Path(args.out + ".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
