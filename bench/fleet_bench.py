#!/usr/bin/env python3
"""Fleet benchmark: ansible/deploy.yml (canary, then one wave) against the seed's way, same fleet, same run.

The fleet (tests/fleetbed.py): N app hosts (default 5) + 1 HAProxy host in the test bed, Ansible from the
checkout's root.  Each app host serves the example app twice, side by side: reloader's app (nginx ->
gunicorn under reloader, behind HAProxy :80) and the seed's setup (nginx :8000 -> a plain gunicorn unit,
behind HAProxy :8080, same HAProxy defaults).  Each method deploys a new release under the same load
(reloader/loadgen.py against its frontend: keep-alive and new connections plus long requests):

* ``reloader``: ``ansible/deploy.yml``: ship, ``reloader deploy --release`` on the canary, the canary
  judged at HAProxy for ``--window`` seconds, then all the other hosts at once; no draining.
* ``seed``: ``bench/seed-restart.yml``: host by host, the files copied over the code in place and
  ``systemctl restart`` (``--seed-method hup``: ``kill -HUP``); it really deploys (checked after).

Prints, per deploy: wall time, failed requests (by kind), throughput during the roll (mean / worst 1 s),
short-request latency (p99 / max), and for reloader the split of the wall time (tests/fleetbed.py
``Run.split``, from a task-timeline callback): ansible-playbook's start-up, the pre-flight and shipping,
the canary's ``reloader deploy``, the canary's judgement, the waves' ``reloader deploy``, and the rest.
Writes bench/fleet_results.json.

    python3 bench/fleet_bench.py [--hosts 5] [--rounds 1] [--window 5] [--seed-method restart|hup]
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

SEED = ROOT / "bench/seed-restart.yml"


def measure(fleet: fleetbed.Fleet, method: str, release: Path, args: argparse.Namespace) -> dict[str, Any]:
    sampler = fleet.sampler(backend="seed" if method == "seed" else fleetbed.APP)
    load = fleet.seed_load(records=True) if method == "seed" else fleet.load(records=True)
    try:
        sampler.wait_traffic(50)
        t0 = time.monotonic()
        if method == "reloader":
            run = fleet.playbook("deploy.yml", reloader_release=str(release), reloader_canary_window=args.window)
        else:
            run = fleet.playbook(str(SEED), seed_release=str(release), seed_method=args.seed_method)
        t1 = time.monotonic()
        time.sleep(1.0)  # a second of load after the roll, so requests sent during it are all answered
    finally:
        report = load.stop()
        sampler.stop()
    if run.rc != 0:
        raise SystemExit(f"{method}: playbook failed ({run.rc}):\n{run.out[-4000:]}")
    version = release.name.replace("r", "v", 1)
    served = {h: (fleet.seed_served(h) if method == "seed" else fleet.served(h)).get("version") for h in fleet.apps}
    if set(served.values()) != {version}:
        raise SystemExit(f"{method}: not every host serves {version}: {served}")
    during = [r for r in report["records"] if t0 <= r["start"] <= t1]
    failed = [r for r in report["records"] if r["kind"] != "ok" and t0 <= r["start"] <= t1 + 1.0]
    kinds: dict[str, int] = {}
    for r in failed:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    buckets: dict[int, int] = {}
    for r in during:
        if r["kind"] == "ok":
            buckets[int(r["start"] - t0)] = buckets.get(int(r["start"] - t0), 0) + 1
    latency = sorted(r["latency"] for r in during if not r["long"])
    result: dict[str, Any] = {
        "method": method if method == "reloader" else f"seed ({args.seed_method})",
        "hosts": len(fleet.apps),
        "deploy_s": round(run.seconds, 1),
        "requests": len(during),
        "failed": len(failed),
        "failures": kinds,
        "throughput_rps": round(sum(buckets.values()) / (t1 - t0), 1),
        "throughput_worst_1s": min(buckets.get(i, 0) for i in range(max(1, int(t1 - t0)))),
        "latency_p99_ms": round(1000 * latency[int(0.99 * (len(latency) - 1))], 1) if latency else None,
        "latency_max_ms": round(1000 * latency[-1], 1) if latency else None,
    }
    if method == "reloader":
        result["split_s"] = run.split()
        result["reloader_deploy_s"] = run.deploys()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=5, help="app hosts")
    parser.add_argument("--rounds", type=int, default=1, help="deploys per method (alternating)")
    parser.add_argument("--window", type=float, default=5, help="seconds the canary is judged")
    parser.add_argument("--seed-method", choices=("restart", "hup"), default="restart")
    parser.add_argument("--out", default=str(ROOT / "bench/fleet_results.json"))
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp, fleetbed.Fleet(Path(tmp), args.hosts) as fleet:
        fleet.install_seed()
        n = 1
        for _ in range(args.rounds):
            n += 1
            release = fleetbed.write_release(fleet.releases, f"r{n}", f"v{n}")
            for method in ("seed", "reloader"):
                testbed.log(f"{method}: deploying r{n}")
                results.append(measure(fleet, method, release, args))
                print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"| method ({args.hosts} hosts) | deploy wall time | ratio to the seed's way | failed requests "
          "| throughput during the roll (mean / worst 1 s) | latency p99 / max | split |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        base = results[i - i % 2]["deploy_s"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))
        split = ", ".join(f"{k} {v} s" for k, v in r.get("split_s", {}).items())
        print(f"| {r['method']} | {r['deploy_s']} s | {r['deploy_s'] / base:.2f} | {r['failed']} of {r['requests']}"
              f"{' (' + kinds + ')' if kinds else ''} | {r['throughput_rps']} / {r['throughput_worst_1s']} req/s "
              f"| {r['latency_p99_ms']} / {r['latency_max_ms']} ms | {split} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
