#!/usr/bin/env python3
"""Benchmark: what the bake's traffic analysis ([analysis], docs/traffic-analysis.md) adds to a deploy.

Run on the test host, as root (one test-bed container):

    sudo python3 bench/traffic_bench.py               # 20 good releases with the analysis, 20 without
    sudo python3 bench/traffic_bench.py --reloads 5

The example app (4 workers) under reload_bench.py's load (4 clients on /, one on /slow?s=1, through
nginx): N deploys of good releases with the analysis on (the default), then N with ``[analysis] enabled =
false`` (the bake of 2 s alone), in the same container and run. Per mode: false refusals (a good release
refused), the time to the new version's first answer and the command's return time (medians, as in
reload_bench.py), and from the analysis' own report in STATUS=: its verdicts, how long it judged and the
share of the requests the canary served. Writes bench/traffic_results.{md,json}; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reload_bench as rb  # noqa: E402  (puts tests/ and the checkout on sys.path)

appbed, testbed = rb.appbed, rb.testbed


def run(b: rb.Bench, label: str, reloads: int) -> dict[str, Any]:
    result = b.run_method(label, rb.RELOAD, reloads)
    outcomes = []
    lines = b.c.run("journalctl -u flaskapp -o cat --no-pager | grep -F 'serving release'",
                    check=False).stdout.splitlines()[-reloads:]
    for line in lines:
        m = re.search(r"traffic (passed) after ([\d.]+) s|(not enough traffic) to compare", line)
        share = re.search(r"served ([\d.]+) % of the requests", line)
        outcomes.append({"verdict": (m[1] or m[3]) if m else None, "judged_s": float(m[2]) if m and m[2] else None,
                         "share_pct": float(share[1]) if share else None})
    result["analysis"] = outcomes
    return result


def steady(b: rb.Bench, seconds: float) -> tuple[float, float]:
    """Requests per second through nginx with no deploy running (4 clients on /, for *seconds*), and
    their median latency in ms."""
    load = b.start_load(4, 0)
    time.sleep(seconds)
    report, _ = b.stop_load(load)
    return report["total"] / report["duration_s"], report["latency_ms"]["p50"]


def hook_cost(calls: int = 200_000) -> float:
    """Microseconds the rendered config's pre_request + post_request add to one request, on this host
    (the example's config, called directly; every 0.5 s one publishes its file)."""
    from types import SimpleNamespace

    from reloader import config
    from reloader.render import render

    source = next(f.content for f in render(config.load(rb.ROOT / "examples" / "flaskapp.toml"))
                  if f.name.endswith(".gunicorn.conf.py"))
    ns: dict[str, Any] = {}
    exec(compile(source, "gunicorn.conf.py", "exec"), ns)
    import tempfile

    ns["_READY_DIR"] = tempfile.mkdtemp()
    worker, resp, pre, post = SimpleNamespace(pid=2, ppid=1), SimpleNamespace(status_code=200), \
        ns["pre_request"], ns["post_request"]
    started = time.perf_counter()
    for _ in range(calls):
        req = SimpleNamespace(path="/")
        pre(worker, req)
        post(worker, req, {}, resp)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--reloads", type=int, default=20, help="good releases per mode (default 20)")
    p.add_argument("--out", default=str(HERE), help="directory for traffic_results.{md,json}")
    p.add_argument("--steady", type=float, default=10, help="seconds of each steady-state throughput run")
    p.add_argument("--steady-rounds", type=int, default=3, help="alternating on/off steady-state runs (default 3)")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with testbed.boot("bookworm") as c:
        app = appbed.App(c)
        app.install()
        if not app.wait_version("v1"):
            raise SystemExit("example app did not come up:\n" + app.journal(40))
        b = rb.Bench(c, app)
        config = c.read_file(appbed.EXAMPLE) + "\n[analysis]\nenabled = false\n"
        c.write_file("/root/no-analysis.toml", config)
        on = run(b, "analysis on (default)", args.reloads) if args.reloads else None
        b.install("/root/no-analysis.toml")
        off = run(b, "analysis off", args.reloads) if args.reloads else None
        # Steady state, alternating without / with the statistics, so load from elsewhere on the host
        # hits both alike.
        steady_off, steady_on = [], []
        for _ in range(args.steady_rounds):
            b.install("/root/no-analysis.toml")
            steady_off.append(steady(b, args.steady))
            b.install(appbed.EXAMPLE)
            steady_on.append(steady(b, args.steady))
    rps_on, rps_off = [r for r, _ in steady_on], [r for r, _ in steady_off]
    p50_off = statistics.median(p for _, p in steady_off)
    per_request_us = hook_cost()
    rows = []
    for m in (on, off) if on and off else ():
        verdicts = [o["verdict"] for o in m["analysis"]]
        judged = [o["judged_s"] for o in m["analysis"] if o["judged_s"] is not None]
        shares = [o["share_pct"] for o in m["analysis"] if o["share_pct"] is not None]
        rows.append({
            "mode": m["method"], "deploys": m["reloads"], "refused": len(m["command_failed"]),
            "never_served": len(m["never_served"]), "failed_requests": m["failed"],
            "time_to_new_version_s": m["median"]["time_to_new_version_s"], "command_s": m["median"]["command_s"],
            "passed": verdicts.count("passed"), "not_enough_traffic": verdicts.count("not enough traffic"),
            "judged_s_median": round(statistics.median(judged), 2) if judged else None,
            "canary_share_pct": [min(shares), round(statistics.median(shares), 1), max(shares)] if shares else None,
        })
    ratio = (on["median"]["command_s"] / off["median"]["command_s"]
             if on and off and on["median"]["command_s"] and off["median"]["command_s"] else None)
    md = [f"Measured {started} (host load average {' '.join(load_before)}); {args.reloads} good releases per mode, "
          "same container and load (4 clients on /, 1 on /slow?s=1, through nginx), 4 workers, medians.", "",
          "| mode | deploys | refused (false) | time to new version (s) | command (s) | passed / not enough traffic "
          "| judged (s) | canary share min/median/max (%) | failed requests |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "/".join(f"{v:g}" for v in r["canary_share_pct"]) if r["canary_share_pct"] else "-"
        md.append(f"| {r['mode']} | {r['deploys']} | {r['refused']} | {r['time_to_new_version_s']} | {r['command_s']} "
                  f"| {r['passed']} / {r['not_enough_traffic']} | {r['judged_s_median'] or '-'} | {share} "
                  f"| {r['failed_requests']} |")
    md += ["", f"Command time with the analysis over without: {ratio:.2f} x." if ratio else ""]
    on_rps, off_rps = statistics.median(rps_on), statistics.median(rps_off)
    md += ["", f"Steady-state throughput (no deploy, 4 clients on /, {args.steady:g} s runs, alternating off/on): "
           f"with the request statistics {on_rps:.0f} req/s (median of {', '.join(f'{v:.0f}' for v in rps_on)}), "
           f"without {off_rps:.0f} req/s ({', '.join(f'{v:.0f}' for v in rps_off)}): {on_rps / off_rps:.3f} x.",
           "", f"The hooks themselves (pre_request + post_request of the rendered config, called 200,000 times on "
           f"the host): {per_request_us:.2f} us per request, {per_request_us / 1000 / p50_off * 100:.3f} % of the "
           f"median request latency without them ({p50_off:.1f} ms)."]
    text = "\n".join(md) + "\n"
    out = Path(args.out)
    (out / "traffic_results.md").write_text(text)
    modes = [{k: v for k, v in m.items() if k != "first_reload_records"} for m in (on, off) if m]
    doc = {"started": started, "rows": rows, "steady_rps": {"on": rps_on, "off": rps_off},
           "hook_us_per_request": per_request_us, "modes": modes}
    (out / "traffic_results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
