"""Verified by real traffic for blue-green and rolling, in a real systemd under load through nginx: the new
instance is judged through nginx's weighted canary route against the old one(s), on the same traffic in the
same seconds; a regressing release is refused and rolled back (the canary route back, the new instance
stopped or restarted on its old release) at a bounded cost in user requests, and a good one goes live.

The load generator records every request (``--records``, monotonic start times; the container shares the
host's monotonic clock), so the requests of the reload window and their answers are counted exactly."""

from __future__ import annotations

import json
import re

from appbed import App
from test_fleet import BLUE_GREEN, ROLLING, routes, status
from test_traffic_verdict import ANSWERS_500_TO_30_PERCENT, in_window, reload_timed, start_load

REFUSED = (r"reload refused: release 2 answered 5xx to \d+ % of [\d,]+ requests \(old generation: [\d.]+ % of "
           r"[\d,]+\) during the bake; still serving release 1 \({}\)")


def install(container, base: str, reload: str = "bake_seconds = 2") -> App:
    app = App(container)
    app.install(app.variant(base=base, reload=reload))
    assert app.wait_version("v1"), app.journal()
    return app


def cost(app: App, load, started: float, ended: float) -> tuple[list[dict], int, int]:
    """(the reload window's requests, how many answered 5xx, how many the new release answered 2xx)."""
    report = app.stop_load(load)
    window = in_window(report, started, ended)
    errors = sum(1 for rec in window if (rec["status"] or 0) >= 500)
    canary = sum(1 for rec in window if rec["version"] == "v2")
    print(f"reload window {ended - started:.1f} s: {len(window)} requests, {errors} answered 5xx "
          f"({100 * errors / max(1, len(window)):.2f} %), {canary} answered 2xx by the new release; "
          f"whole run: {report['summary']}")
    assert [rec for rec in window if rec["kind"] != "ok" and not (rec["status"] or 0) >= 500] == [], \
        "no request failed otherwise"
    return window, errors, canary


def test_blue_green_a_release_answering_500_to_30_percent_is_refused_through_the_canary(container) -> None:
    app = install(container, BLUE_GREEN)
    assert routes(app, canary=True) == {"live": "/run/flaskapp-blue.sock", "canary": "/run/flaskapp-blue.sock"}
    blue = app.props("flaskapp@blue.service")["MainPID"]
    load = start_load(app)
    app.ship("v2", extra=ANSWERS_500_TO_30_PERCENT)
    r, started, ended = reload_timed(app)
    props = app.props()
    assert r.returncode != 0, props["StatusText"]
    assert re.fullmatch(REFUSED.format("blue"), props["StatusText"]), props["StatusText"]
    assert app.version() == "v1"
    assert routes(app, canary=True) == {"live": "/run/flaskapp-blue.sock", "canary": "/run/flaskapp-blue.sock"}
    assert app.props("flaskapp@blue.service")["MainPID"] == blue, "the live colour was not touched"
    assert app.props("flaskapp@green.service")["ActiveState"] != "active", "the refused colour is stopped"
    window, errors, canary = cost(app, load, started, ended)
    assert len(window) > 300, len(window)
    assert canary > 0, "the canary served"
    assert errors <= 0.01 * len(window), (errors, len(window))
    analysis = status(app)["analysis"]
    assert analysis["verdict"] == "refused" and analysis["release"] == "2", analysis
    assert analysis["new"]["5xx"] > 0 and analysis["old"]["5xx"] == 0, analysis
    listing = app.c.run(["reloader", "releases", app.name]).stdout
    assert re.search(r"last traffic comparison: release 2 at .*: refused after [\d.]+ s; new generation [\d,]+ "
                     r"requests, 5xx \d+ %", listing), listing
    rows = json.loads(app.c.run(["reloader", "releases", app.name, "--json"]).stdout)["releases"]
    assert {row["release"]: row["state"] for row in rows} == {"1": "live", "2": "refused"}, rows


def test_blue_green_good_releases_under_load_go_live_through_the_canary(container) -> None:
    app = install(container, BLUE_GREEN)
    load = start_load(app)
    shares, colour = [], "blue"
    for n in (2, 3):
        app.ship(f"v{n}")
        r = app.reload()
        props = app.props()
        assert r.returncode == 0, (n, props["StatusText"], app.journal(30))
        colour = "green" if colour == "blue" else "blue"
        assert app.version() == f"v{n}"
        sock = f"/run/flaskapp-{colour}.sock"
        assert routes(app, canary=True) == {"live": sock, "canary": sock}
        share = re.search(r"traffic passed after [\d.]+ s: new [\d,]+ requests, 5xx [\d.]+ %, p95 [\d.,]+ ms; old "
                          r"[\d,]+, 5xx [\d.]+ %, p95 [\d.,]+ ms; canary route to \w+ \(weight 1 of 5\) served "
                          r"([\d.]+) % of the requests", props["StatusText"])
        assert share, props["StatusText"]
        shares.append(float(share[1]))
    report = app.stop_load(load)
    print(f"canary shares of 2 good blue-green deploys: {shares} %; {report['summary']}")
    assert report["failures"] == {}, report["summary"]
    assert all(5 <= s <= 40 for s in shares), shares  # the canary route weighs 1 against the live route's 4
    assert status(app)["analysis"]["verdict"] == "passed"


def test_rolling_a_release_answering_500_to_30_percent_is_refused_on_its_first_instance(container) -> None:
    app = install(container, ROLLING)
    load = start_load(app)
    app.ship("v2", extra=ANSWERS_500_TO_30_PERCENT)
    r, started, ended = reload_timed(app)
    props = app.props()
    assert r.returncode != 0, props["StatusText"]
    assert re.fullmatch(REFUSED.format("instances 1, 2, 3"), props["StatusText"]), props["StatusText"]
    st = status(app)
    assert {i["instance"]: (i["release"], i["state"]) for i in st["instances"]} == {
        i: ("1", "active/running") for i in ("1", "2", "3")}, st["instances"]
    assert routes(app, canary=True) == {**{i: f"/run/flaskapp-{i}.sock" for i in ("1", "2", "3")},
                                        "canary": "/run/flaskapp-1.sock"}
    assert app.version() == "v1"
    window, errors, canary = cost(app, load, started, ended)
    assert len(window) > 300, len(window)
    assert canary > 0, "the canary served"
    assert errors <= 0.01 * len(window), (errors, len(window))
    assert st["analysis"]["verdict"] == "refused", st["analysis"]
