#!/usr/bin/env python3
"""Fleet benchmark: a rolling deploy across 3 app hosts behind HAProxy, reloader's playbook vs a naive one.

Same fleet, same load, same run (tests/fleetbed.py: 3 app hosts + 1 HAProxy host in the test bed, load
from reloader/loadgen.py against the balancer, keep-alive and new connections plus long requests):

* ``reloader``: ansible/deploy.yml (serial 1): drain at HAProxy, wait for in-flight requests, ship,
  ``reloader deploy``, health-check, back in rotation.
* ``naive``: bench/naive-restart.yml (serial 1): ship, point ``current``, ``systemctl restart`` the app,
  next host; no draining (what hand-written playbooks and most roles do).

Prints, per method: deploy wall time, failed requests (by kind), and capacity during the roll: servers
HAProxy had in rotation (sampled every 0.2 s: mean and minimum) and throughput (requests/s over the roll,
and the worst 1-second bucket), and the latency (p99, max) of the short requests sent during the roll.
Writes bench/fleet_results.json.

    python3 bench/fleet_bench.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fleetbed  # noqa: E402
import testbed  # noqa: E402

NAIVE = ROOT / "bench/naive-restart.yml"


def measure(fleet: fleetbed.Fleet, method: str, release: Path) -> dict[str, Any]:
    sampler = fleet.sampler()
    load = fleet.load(records=True)
    try:
        sampler.wait_traffic(50)
        t0 = time.monotonic()
        if method == "reloader":
            run = fleet.playbook("deploy.yml", reloader_release=str(release))
        else:
            run = fleet.playbook(str(NAIVE), reloader_release=str(release))
        t1 = time.monotonic()
        time.sleep(1.0)  # a second of load after the roll, so requests sent during it are all answered
    finally:
        report = load.stop()
        samples = sampler.stop()
    if run.rc != 0:
        raise SystemExit(f"{method}: playbook failed ({run.rc}):\n{run.out[-4000:]}")
    during = [r for r in report["records"] if t0 <= r["start"] <= t1]
    failed = [r for r in report["records"] if r["kind"] != "ok" and t0 <= r["start"] <= t1 + 1.0]
    kinds: dict[str, int] = {}
    for r in failed:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    buckets: dict[int, int] = {}
    for r in during:
        if r["kind"] == "ok":
            buckets[int(r["start"] - t0)] = buckets.get(int(r["start"] - t0), 0) + 1
    seconds = max(1, int(t1 - t0))
    latency = sorted(r["latency"] for r in during if not r["long"])
    rows = [row for row in samples.rows if "servers" in row and t0 <= row["t"] <= t1]
    up = [sum(s.startswith("UP") for s in row["servers"].values()) for row in rows]
    return {
        "method": method,
        "deploy_s": round(run.seconds, 1),
        "requests": len(during),
        "failed": len(failed),
        "failures": kinds,
        "failed_total_run": report["failed"],
        "servers_up_mean": round(sum(up) / len(up), 2) if up else None,
        "servers_up_min": min(up) if up else None,
        "throughput_rps": round(sum(buckets.values()) / (t1 - t0), 1),
        "throughput_worst_1s": min(buckets.get(i, 0) for i in range(seconds)),
        "latency_p99_ms": round(1000 * latency[int(0.99 * (len(latency) - 1))], 1) if latency else None,
        "latency_max_ms": round(1000 * latency[-1], 1) if latency else None,
        "load": report["summary"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="deploys per method (alternating)")
    parser.add_argument("--out", default=str(ROOT / "bench/fleet_results.json"))
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, fleetbed.Fleet(Path(tmp)) as fleet:
        n = 1
        for _ in range(args.rounds):
            for method in ("reloader", "naive"):
                n += 1
                release = fleetbed.write_release(fleet.releases, f"r{n}", f"v{n}")
                testbed.log(f"{method}: deploying r{n}")
                results.append(measure(fleet, method, release))
                print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print("| method | deploy wall time | failed requests | servers in rotation (mean / min of 3) "
          "| throughput during the roll (mean / worst 1 s) | latency p99 / max |")
    print("|---|---|---|---|---|---|")
    for r in results:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))
        print(f"| {r['method']} | {r['deploy_s']} s | {r['failed']} of {r['requests']}"
              f"{' (' + kinds + ')' if kinds else ''} | {r['servers_up_mean']} / {r['servers_up_min']} "
              f"| {r['throughput_rps']} / {r['throughput_worst_1s']} req/s "
              f"| {r['latency_p99_ms']} / {r['latency_max_ms']} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
