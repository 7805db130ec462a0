"""Blue/green and rolling: `systemctl reload flaskapp` switches instances behind nginx with the same promises.

Every instance is health-checked on its own socket before nginx sends it traffic, nginx is switched only
through its verified reload, and a failure leaves the instances that were serving untouched.
Keep-alive connections that nginx closes while reloading are retried by the load generator (as browsers
do) and reported separately; they are not failed requests.
"""

from __future__ import annotations

import json
import subprocess
import time

from appbed import BROKEN, App

RELOADS = 20
BLUE_GREEN = "/src/examples/flaskapp-blue-green.toml"
ROLLING = "/src/examples/flaskapp-rolling.toml"


def install(container, base: str, reload: str = "") -> App:
    app = App(container)
    app.install(app.variant(base=base, reload=reload))
    assert app.wait_version("v1"), app.journal()
    return app


def status(app: App) -> dict:
    return json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)


def live(app: App) -> list[str]:
    return status(app)["live"]


def releases(app: App) -> dict[str, dict]:
    listed = json.loads(app.c.run(["reloader", "releases", "flaskapp", "--json"]).stdout)
    return {row["release"]: row for row in listed["releases"]}


def states(app: App) -> dict[str, str]:
    return {name: row["state"] for name, row in releases(app).items()}


def assert_no_failed_request(report: dict) -> None:
    assert report["total"] > 0
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]


def deploy(app: App, version: str) -> dict:
    app.ship(version)
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal(30))
    assert app.version() == version, "reload returned before the new release was serving"
    props = app.props()
    assert props["ActiveState"] == "active" and props["ReloadResult"] == "success", props
    return status(app)


def test_blue_green_twenty_deploys_under_load(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    assert live(app) == ["blue"]
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    colour = "blue"
    for n in range(2, RELOADS + 2):
        st = deploy(app, f"v{n}")
        colour = "green" if colour == "blue" else "blue"
        assert st["live"] == [colour], st
        by_name = {i["instance"]: i for i in st["instances"]}
        assert by_name[colour]["state"] == "active/running" and by_name[colour]["release"] == str(n)
        idle = by_name["green" if colour == "blue" else "blue"]
        assert idle["state"].startswith("inactive"), "the old colour is stopped after the bake"
    report = app.stop_load(load)
    assert_no_failed_request(report)
    assert set(report["versions"]) == {f"v{n}" for n in range(1, RELOADS + 2)}
    print("blue-green:", report["summary"])


def test_blue_green_refuses_broken_releases_and_leaves_the_live_colour_alone(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1\npreflight_timeout = 5")
    blue = app.props("flaskapp@blue.service")["MainPID"]
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    extra = "\nimport sys\nif 'gunicorn' in ' '.join(sys.argv):\n    raise RuntimeError('only in production')\n"
    cases = [*BROKEN.items(), ("fails only under gunicorn", (None, "flaskapp@green.service"))]
    for kind, (code, reason) in cases:
        if code is None:
            app.ship("v9", extra=extra)
        else:
            app.ship(code=code)
        r = app.reload()
        props = app.props()
        assert r.returncode != 0, kind
        assert reason in props["StatusText"], (kind, props["StatusText"])
        assert live(app) == ["blue"], kind
        assert app.props("flaskapp@blue.service")["MainPID"] == blue, f"{kind}: the live colour was touched"
        assert app.props("flaskapp@green.service")["ActiveState"] != "active", f"{kind}: idle colour left up"
        assert app.version() == "v1", kind
    report = app.stop_load(load)
    assert_no_failed_request(report)
    assert set(report["versions"]) == {"v1"}


def test_blue_green_rollback_under_load(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 60")
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    # During the bake: the old colour is still up, rollback is one switch back.
    app.ship("v2")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while "baking" not in app.props()["StatusText"]:
        assert time.monotonic() < deadline, app.journal(20)
        time.sleep(0.2)
    assert app.version() == "v2"
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert reload.wait(timeout=120) != 0, "the deploy that was rolled back reports failure"
    assert "rolled back on operator request" in app.props()["StatusText"]
    assert live(app) == ["blue"] and app.version() == "v1"
    assert app.props("flaskapp@green.service")["ActiveState"] != "active"
    # After a finished deploy the previous colour is stopped, but still pinned: rollback restarts it.
    app.c.run("sed -i 's/bake_seconds = 60/bake_seconds = 1/' /etc/reloader/flaskapp.toml")
    deploy(app, "v3")
    assert live(app) == ["green"]
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert live(app) == ["blue"] and app.version() == "v1"
    rows = releases(app)
    assert {n: row["state"] for n, row in rows.items()} == {"1": "live", "2": "refused", "3": "previous"}, rows
    assert "rolled back on operator request" in rows["2"]["reason"]
    # rollback RELEASE: the named proven release goes onto the idle colour through the verified deploy.
    r = app.c.run(["reloader", "rollback", "flaskapp", "3"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert live(app) == ["green"] and app.version() == "v3"
    assert states(app) == {"1": "previous", "2": "refused", "3": "live"}
    r = app.c.run(["reloader", "rollback", "flaskapp", "2"], check=False, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "was refused" in r.stderr, r.stderr
    report = app.stop_load(load)
    assert_no_failed_request(report)


def test_stopping_the_app_stops_every_instance(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    deploy(app, "v2")
    assert app.systemctl("stop", "flaskapp").returncode == 0
    for colour in ("blue", "green"):
        assert app.props(f"flaskapp@{colour}.service")["ActiveState"] == "inactive"
    assert app.systemctl("start", "flaskapp").returncode == 0
    assert live(app) == ["green"] and app.version() == "v2", "a restart keeps the live colour and its release"


def test_rolling_twenty_deploys_under_load(container) -> None:
    app = install(container, ROLLING)
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    for n in range(2, RELOADS + 2):
        st = deploy(app, f"v{n}")
        assert st["live"] == ["1", "2", "3"]
        assert {i["release"] for i in st["instances"]} == {str(n)}
        assert all(i["state"] == "active/running" and i["workers"] == 2 for i in st["instances"]), st
    report = app.stop_load(load)
    assert_no_failed_request(report)
    print("rolling:", report["summary"])


def test_rolling_stops_at_a_failing_instance_and_restores_it(container) -> None:
    app = install(container, ROLLING)
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    app.ship(code=BROKEN["import error"][0])
    r = app.reload()
    assert r.returncode != 0 and "ModuleNotFoundError" in app.props()["StatusText"]
    extra = "\nimport sys\nif 'gunicorn' in ' '.join(sys.argv):\n    raise RuntimeError('only in production')\n"
    app.ship("v3", extra=extra)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0
    assert "instance 1" in props["StatusText"] and "restored release 1" in props["StatusText"], props
    st = status(app)
    assert {i["release"] for i in st["instances"]} == {"1"}, st
    assert all(i["state"] == "active/running" for i in st["instances"]), st
    assert app.version() == "v1"
    report = app.stop_load(load)
    assert_no_failed_request(report)
    assert set(report["versions"]) == {"v1"}


def test_rolling_records_releases_and_rolls_back_under_load(container) -> None:
    """The single-master records for rolling: live/previous/refused in `reloader releases`, and
    `reloader rollback` rolls the previous proven release across the instances."""
    started = time.monotonic()
    app = install(container, ROLLING)
    assert states(app) == {"1": "live"}
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    deploy(app, "v2")
    assert states(app) == {"1": "previous", "2": "live"}
    app.ship(code=BROKEN["import error"][0])
    assert app.reload().returncode != 0
    rows = releases(app)
    assert {n: row["state"] for n, row in rows.items()} == {"1": "previous", "2": "live", "3": "refused"}, rows
    assert "ModuleNotFoundError" in rows["3"]["reason"] and rows["2"]["instances"] == ["1", "2", "3"], rows
    st = status(app)
    assert st["release"] == "2" and st["refused_release"] == "3" and "ModuleNotFoundError" in st["refused_reason"]
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    st = status(app)
    assert {i["release"] for i in st["instances"]} == {"1"} and app.version() == "v1", st
    assert all(i["state"] == "active/running" for i in st["instances"]), st
    assert st["current"] == "/srv/flaskapp/releases/1", "rollback points current at what it deployed"
    assert states(app) == {"1": "live", "2": "previous", "3": "refused"}
    for name, why in (("3", "was refused"), ("4", "no such release directory")):
        r = app.c.run(["reloader", "rollback", "flaskapp", name], check=False, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    report = app.stop_load(load)
    assert_no_failed_request(report)
    assert set(report["versions"]) == {"v1", "v2"}
    print(f"rolling records + rollback: {report['summary']}; {time.monotonic() - started:.0f} s")
