"""Verified by real traffic, in a real systemd under load through nginx: during the bake a canary of the
new generation serves beside the old one, and a release that answers more 5xx or answers slower is refused
and rolled back; good releases go live, and too little traffic says so and proceeds.

The load generator records every request (``--records``, monotonic start times; the container shares the
host's monotonic clock), so the requests of the reload window are counted exactly."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

from appbed import HOST, App

#: A broken view: 30 % of the pages answer 500, the health path is fine (the pre-flight passes).
ANSWERS_500_TO_30_PERCENT = """
import random as _random

@app.before_request
def _broken_view():
    if request.path != '/health' and _random.random() < 0.3:
        return 'broken view', 500
"""
#: An N+1 query: every page 300 ms slower, the health path as fast as before.
ADDS_300_MS = """
@app.before_request
def _n_plus_one():
    if request.path != '/health':
        time.sleep(0.3)
"""


def start_load(app: App, *, concurrency: int = 6, interval: float = 0.0) -> subprocess.Popen:
    """The load generator (no long requests), every request recorded; see App.start_load."""
    app.c.run(["rm", "-f", "/run/loadgen.json", "/run/loadgen.stop"])
    cmd = ("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/ --records "
           f"--concurrency {concurrency} --interval {interval:g} -H {shlex.quote('Host: ' + HOST)} "
           "--until-file /run/loadgen.stop --out /run/loadgen.json --max-duration 900")
    return app.c.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def reload_timed(app: App) -> tuple[subprocess.CompletedProcess, float, float]:
    started = time.monotonic()
    r = app.reload()
    return r, started, time.monotonic()


def in_window(report: dict, start: float, end: float) -> list[dict]:
    return [r for r in report["records"] if start <= r["start"] <= end]


def status_json(app: App) -> dict:
    return json.loads(app.c.run(["reloader", "status", app.name, "--json"], check=False).stdout)


def test_a_release_answering_500_to_30_percent_is_refused_within_the_bake_at_a_bounded_cost(app: App) -> None:
    serving = app.props()["MainPID"]
    load = start_load(app)
    app.ship("v2", extra=ANSWERS_500_TO_30_PERCENT)
    r, started, ended = reload_timed(app)
    props = app.props()
    assert r.returncode != 0, props["StatusText"]
    assert re.fullmatch(r"reload refused: release 2 answered 5xx to \d+ % of [\d,]+ requests \(old generation: "
                        r"[\d.]+ % of [\d,]+\) during the bake; still serving release 1 \(master \d+\)",
                        props["StatusText"]), props["StatusText"]
    assert props["MainPID"] == serving and props["SubState"] == "running", props
    assert app.version() == "v1"
    report = app.stop_load(load)
    window = in_window(report, started, ended)
    errors = sum(1 for rec in window if (rec["status"] or 0) >= 500)
    canary = sum(1 for rec in window if rec["version"] == "v2")
    print(f"reload window {ended - started:.1f} s: {len(window)} requests, {errors} answered 5xx "
          f"({100 * errors / len(window):.2f} %), {canary} by the canary")
    assert len(window) > 300, report["summary"]
    assert canary > 0, "the canary served"
    assert errors <= 0.01 * len(window), (errors, len(window))
    assert [rec for rec in window if rec["kind"] != "ok" and not (rec["status"] or 0) >= 500] == []
    journal = app.journal_with("reloader: flaskapp: ")
    assert "canary open: 1 of master" in journal and "rolling back: stopping new master" in journal, journal
    # The comparison is the last deploy's: `reloader status` and `releases` show it.
    analysis = status_json(app)["analysis"]
    assert analysis["verdict"] == "refused" and analysis["release"] == "2", analysis
    assert analysis["new"]["5xx"] > 0 and analysis["old"]["5xx"] == 0, analysis
    assert analysis["seconds"] < 30, "refused within the bake"
    listing = app.c.run(["reloader", "releases", app.name]).stdout
    assert re.search(r"last traffic comparison: release 2 at .*: refused after [\d.]+ s; new generation [\d,]+ "
                     r"requests, 5xx \d+ %", listing), listing


def test_a_release_adding_300_ms_is_refused_with_the_latency_comparison(app: App) -> None:
    serving = app.props()["MainPID"]
    load = start_load(app)
    app.ship("v2", extra=ADDS_300_MS)
    r = app.reload()
    props = app.props()
    report = app.stop_load(load)
    assert r.returncode != 0, props["StatusText"]
    match = re.fullmatch(r"reload refused: release 2 answered slower: p95 ([\d,]+) ms, p50 ([\d,]+) ms over [\d,]+ "
                         r"requests \(old generation: p95 ([\d.,]+) ms, p50 ([\d.,]+) ms over [\d,]+\) during the "
                         r"bake; still serving release 1 \(master \d+\)", props["StatusText"])
    assert match, props["StatusText"]
    new_p50, old_p50 = float(match[2].replace(",", "")), float(match[4].replace(",", ""))
    assert new_p50 >= 270 and new_p50 - old_p50 >= 250, props["StatusText"]
    assert props["MainPID"] == serving and app.version() == "v1"
    assert report["failures"] == {}, report["summary"]


def test_good_releases_go_live_under_load_and_low_traffic_proceeds_saying_why(app: App) -> None:
    load = start_load(app)
    shares = []
    for n in range(2, 7):  # 5 good releases in a row: no false refusal
        app.ship(f"v{n}")
        r = app.reload()
        props = app.props()
        assert r.returncode == 0, (n, props["StatusText"], app.journal_with("reloader: ")[-2000:])
        assert app.version() == f"v{n}"
        share = re.search(r"traffic passed after [\d.]+ s: new [\d,]+ requests, 5xx [\d.]+ %, p95 [\d.,]+ ms; old "
                          r"[\d,]+, 5xx [\d.]+ %, p95 [\d.,]+ ms; canary 1 of 4 workers served ([\d.]+) % of the "
                          r"requests", props["StatusText"])
        assert share, props["StatusText"]
        shares.append(float(share[1]))
    report = app.stop_load(load)
    print(f"canary shares of 5 good deploys: {shares} %")
    assert report["failures"] == {}, report["summary"]
    assert all(5 <= s <= 50 for s in shares), shares  # about 1 / (4 + 1), measured

    # 1 request/s: the canary cannot reach min_requests; the deploy proceeds on the health checks and says why.
    load = start_load(app, concurrency=1, interval=1.0)
    app.ship("v7")
    r = app.reload()
    props = app.props()
    app.stop_load(load)
    assert r.returncode == 0, props["StatusText"]
    assert app.version() == "v7"
    assert re.search(r"not enough traffic to compare: \d+ requests? to the new generation in \d+ s",
                     props["StatusText"]), props["StatusText"]
    assert "proceeding on the health checks alone" in app.journal_with("not enough traffic")
    assert status_json(app)["analysis"]["verdict"] == "not enough traffic"
