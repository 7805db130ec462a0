"""Blue/green and rolling: `systemctl reload flaskapp` switches instances behind nginx with the same promises.

Every instance is health-checked on its own socket before it gets traffic. Traffic moves by re-pointing
the routes (symlinks nginx's upstream names, replaced with rename(2)), so a deploy never reloads nginx:
the same nginx workers serve throughout and no client keep-alive connection is closed (the load
generator counts every close of a reused connection as a keepalive_retry; it must stay 0). A failure
leaves the instances that were serving untouched.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from appbed import BROKEN, App

from reloader import config, render

DEPLOYS = 4
BLUE_GREEN = "/src/examples/flaskapp-blue-green.toml"
ROLLING = "/src/examples/flaskapp-rolling.toml"
ROUTES = "/var/lib/reloader/flaskapp/routes"
#: A release that imports fine in the pre-flight but fails under gunicorn.
ONLY_IN_PRODUCTION = ("\nimport sys\nif 'gunicorn' in ' '.join(sys.argv):\n"
                      "    raise RuntimeError('only in production')\n")


def install(container, base: str, reload: str = "", gunicorn: str = "", analysis: str = "") -> App:
    app = App(container)
    app.install(app.variant(base=base, reload=reload, gunicorn=gunicorn, analysis=analysis))
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


def nginx_workers(app: App) -> list[int]:
    """The PIDs of nginx's workers: a reload replaces them all."""
    master = app.c.read_file("/run/nginx.pid").strip()
    return sorted(int(p) for p in app.c.run(["pgrep", "-P", master]).stdout.split())


def routes(app: App, *, canary: bool = False) -> dict[str, str]:
    """route → the socket its symlink points at (*canary*: the analysis' canary route too)."""
    out = app.c.run(f"for l in {ROUTES}/*.sock; do echo \"$l $(readlink $l)\"; done").stdout.split("\n")
    found = {line.split()[0].rsplit("/", 1)[1][: -len(".sock")]: line.split()[1] for line in out if line.strip()}
    return {k: v for k, v in found.items() if canary or k != "canary"}


def assert_no_failed_request(report: dict) -> None:
    assert report["total"] > 0
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]


def assert_no_client_saw_a_close(report: dict) -> None:
    assert_no_failed_request(report)
    assert report["keepalive_retries"] == 0, report["summary"]


def deploy(app: App, version: str) -> dict:
    app.ship(version)
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal(30))
    assert app.version() == version, "reload returned before the new release was serving"
    props = app.props()
    assert props["ActiveState"] == "active" and props["ReloadResult"] == "success", props
    return status(app)


def wait_status(app: App, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in app.props()["StatusText"]:
        assert time.monotonic() < deadline, (text, app.journal(20))
        time.sleep(0.1)


def test_the_instance_socket_unit_listens_where_the_routes_point() -> None:
    """A '%' in the socket path is escaped for systemd in NAME@.socket, so systemd listens on exactly the
    literal path the routes (and so nginx) connect to."""
    base = {"app": {"name": "flaskapp", "working_directory": "/srv/flaskapp/current", "wsgi": "app:app",
                    "virtualenv": "/srv/flaskapp/venv"}, "reload": {"strategy": "blue-green"}}
    for socket in ("/run/flaskapp.sock", "/run/%p.sock", "/run/flask%iapp.sock"):
        app = config.parse({**base, "gunicorn": {"socket": socket}})
        unit = next(f.content for f in render.render(app) if f.name == "flaskapp@.socket")
        listen = re.search(r"^ListenStream=(.*)$", unit, re.M).group(1)
        for colour in app.instance_names:
            # What systemd makes of it for NAME@COLOUR.socket: %% is %, %i the instance, any other
            # specifier something else (marked here so that it cannot match).
            expanded = re.sub(r"%(.)", lambda m, c=colour: {"%": "%", "i": c}.get(m[1], f"<%{m[1]}>"), listen)
            assert expanded == app.instance_socket(colour), (socket, listen)
    site = next(f.content for f in render.render(app) if f.name == "flaskapp.upstream.conf")
    assert f"server unix:{app.route('live')} weight={app.workers} max_fails=0;" in site, site


def test_blue_green_deploys_under_load_never_reload_nginx(container) -> None:
    """gthread workers, so nginx holds upstream keep-alive connections to the old colour across the
    switch: they drain there (nginx resends on a new connection what the retiring colour closed)."""
    started = time.monotonic()
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1",
                  gunicorn='worker_class = "gthread"\nthreads = 4')
    assert live(app) == ["blue"] and routes(app) == {"live": "/run/flaskapp-blue.sock"}
    workers = nginx_workers(app)
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    colour = "blue"
    for n in range(2, DEPLOYS + 2):
        st = deploy(app, f"v{n}")
        colour = "green" if colour == "blue" else "blue"
        assert st["live"] == [colour] and routes(app) == {"live": f"/run/flaskapp-{colour}.sock"}, st
        by_name = {i["instance"]: i for i in st["instances"]}
        assert by_name[colour]["state"] == "active/running" and by_name[colour]["release"] == str(n)
        idle = by_name["green" if colour == "blue" else "blue"]
        assert idle["state"].startswith("inactive"), "the old colour is stopped after the bake"
    report = app.stop_load(load)
    assert nginx_workers(app) == workers, "a deploy reloaded nginx"
    assert_no_client_saw_a_close(report)
    assert set(report["versions"]) == {f"v{n}" for n in range(1, DEPLOYS + 2)}
    print(f"blue-green: {report['summary']}; nginx workers {workers} before and after; "
          f"{time.monotonic() - started:.0f} s")


def test_blue_green_refuses_broken_releases_and_leaves_the_live_colour_alone(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1\npreflight_timeout = 5")
    blue = app.props("flaskapp@blue.service")["MainPID"]
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    cases = [*BROKEN.items(), ("fails only under gunicorn", (None, "flaskapp@green.service"))]
    for kind, (code, reason) in cases:
        if code is None:
            app.ship("v9", extra=ONLY_IN_PRODUCTION)
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
    # Without the analysis: its bake is the canary's, before the switch (tests/test_traffic_fleet.py).
    app = install(container, BLUE_GREEN, reload="bake_seconds = 60", analysis="enabled = false")
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    # During the pre-flight: the rollback takes effect before the switch (it is not lost).
    app.ship("v2", extra="\nimport time\ntime.sleep(3)\n")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_status(app, "pre-flight: importing")
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(20))
    assert reload.wait(timeout=120) != 0, "the deploy that was rolled back reports failure"
    assert "rolled back on operator request" in app.props()["StatusText"]
    assert live(app) == ["blue"] and app.version() == "v1"
    assert app.props("flaskapp@green.service")["ActiveState"] != "active"
    # During the bake: the old colour is still up, rollback is one switch back.
    app.ship("v2")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_status(app, "baking")
    assert app.version() == "v2"
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert reload.wait(timeout=120) != 0, "the deploy that was rolled back reports failure"
    assert "rolled back on operator request" in app.props()["StatusText"]
    assert live(app) == ["blue"] and app.version() == "v1"
    assert app.props("flaskapp@green.service")["ActiveState"] != "active"
    # After a finished deploy the previous colour is stopped, but still pinned: rollback restarts it.
    app.c.run("sed -i 's/bake_seconds = 60/bake_seconds = 1/' /etc/reloader/flaskapp.toml")
    deploy(app, "v4")
    assert live(app) == ["green"]
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert live(app) == ["blue"] and app.version() == "v1"
    rows = releases(app)
    assert {n: row["state"] for n, row in rows.items()} == {"1": "live", "2": "refused", "3": "refused",
                                                           "4": "previous"}, rows
    assert "rolled back on operator request" in rows["3"]["reason"]
    # rollback RELEASE: the named proven release goes onto the idle colour through the verified deploy.
    r = app.c.run(["reloader", "rollback", "flaskapp", "4"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert live(app) == ["green"] and app.version() == "v4"
    assert states(app) == {"1": "previous", "2": "refused", "3": "refused", "4": "live"}
    r = app.c.run(["reloader", "rollback", "flaskapp", "3"], check=False, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "was refused" in r.stderr, r.stderr
    report = app.stop_load(load)
    assert_no_failed_request(report)


def test_a_rollback_too_late_for_the_deploy_is_refused_and_not_left_for_the_next(container) -> None:
    """A rollback while the deploy already retires the old colour (past its bake) cannot switch back: it
    says so and exits 1, the deploy completes, and the next deploy is not rolled back by it."""
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    slow = app.c.popen(["curl", "-s", "-H", "Host: flaskapp.example", "http://127.0.0.1/slow?s=20"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    app.ship("v2")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_status(app, "stopping flaskapp@blue.service gracefully")
    r = app.c.run(["reloader", "rollback", "flaskapp"], check=False, timeout=120)
    assert r.returncode == 1 and "rollback not applied" in r.stderr and r.stderr.count("\n") == 1, r
    assert reload.wait(timeout=120) == 0 and live(app) == ["green"] and app.version() == "v2"
    assert json.loads(slow.communicate(timeout=60)[0])["version"] == "v1", "the in-flight request finished"
    deploy(app, "v3")
    assert live(app) == ["blue"]


def test_routing_and_state_agree_when_nginx_cannot_reload_or_a_deploy_is_killed(container) -> None:
    """The live colour is the one the route points at: a deploy needs no nginx reload (one that would
    fail changes nothing), and after a deploy killed mid-bake the next one replaces the colour that is
    not serving."""
    app = install(container, BLUE_GREEN, reload="bake_seconds = 30", analysis="enabled = false")  # bake after switch
    workers = nginx_workers(app)
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    # Another site's broken file: `systemctl reload nginx` would fail; deploys do not need it.
    app.c.write_file("/etc/nginx/conf.d/broken.conf", "this is not nginx\n")
    app.c.run("sed -i 's/bake_seconds = 30/bake_seconds = 1/' /etc/reloader/flaskapp.toml")
    deploy(app, "v2")
    assert live(app) == ["green"] and nginx_workers(app) == workers
    app.c.run(["rm", "/etc/nginx/conf.d/broken.conf"])
    assert app.systemctl("reload", "nginx").returncode == 0
    assert app.version() == "v2" and live(app) == ["green"], "nginx's own reload changes no routing"
    # Kill the deploy during its bake, after the switch: the route says blue, and so does status.
    app.c.run("sed -i 's/bake_seconds = 1/bake_seconds = 30/' /etc/reloader/flaskapp.toml")
    app.ship("v3")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_status(app, "baking blue")
    app.c.run(["kill", "-KILL", str(app.props()["ControlPID"])])
    assert reload.wait(timeout=60) != 0
    assert live(app) == ["blue"] and app.version() == "v3"
    assert app.props("flaskapp@green.service")["ActiveState"] == "active", "killed before retiring green"
    # The next deploy replaces green (not serving), and a release failing there leaves blue serving.
    app.c.run("sed -i 's/bake_seconds = 30/bake_seconds = 1/' /etc/reloader/flaskapp.toml")
    app.ship("v4", extra=ONLY_IN_PRODUCTION)
    assert app.reload().returncode != 0
    assert live(app) == ["blue"] and app.version() == "v3"
    deploy(app, "v5")
    assert live(app) == ["green"] and app.version() == "v5"
    assert app.props("flaskapp@blue.service")["ActiveState"] == "inactive"
    report = app.stop_load(load)
    assert_no_failed_request(report)  # the test's own nginx reload above closes client keep-alives


def test_reloader_install_upgrades_an_app_whose_upstream_named_the_instances(container) -> None:
    """Upgrade from the layout whose upstream include named the instances' sockets (rewritten with an
    nginx reload by every deploy): `reloader install` (no --restart) deploys through the routes, pointed
    at what served; nginx is reloaded then, and never again by a deploy."""
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    deploy(app, "v2")
    # What the previous reloader left: its include, its site comment, no routes.
    app.c.write_file("/var/lib/reloader/flaskapp/upstream.conf",
                     "# Instances of flaskapp that get traffic, written by reloader (blue-green). Do not edit.\n"
                     "server unix:/run/flaskapp-green.sock max_fails=0;\n"
                     "server unix:/run/flaskapp-green.sock max_fails=0 backup;\n")
    site = app.c.read_file("/etc/nginx/conf.d/flaskapp.conf")
    app.c.write_file("/etc/nginx/conf.d/flaskapp.conf", re.sub(
        r"    # The routes to the instances.*\n.*\n",
        "    # The instances that get traffic: rewritten by `systemctl reload flaskapp` (blue-green).\n", site))
    app.c.run(["rm", "-r", ROUTES])
    assert app.systemctl("reload", "nginx").returncode == 0
    assert live(app) == ["green"] and app.version() == "v2"
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    app.ship("v3")
    r = app.c.run(["reloader", "install", "/root/flaskapp.toml"], check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert app.version() == "v3" and live(app) == ["blue"] and routes(app) == {"live": "/run/flaskapp-blue.sock"}
    assert app.props("flaskapp@green.service")["ActiveState"] == "inactive"
    reference = Path(__file__).resolve().parent.parent / "units" / "blue-green" / "flaskapp.upstream.conf"
    assert app.c.read_file("/var/lib/reloader/flaskapp/upstream.conf") == reference.read_text()
    workers = nginx_workers(app)
    deploy(app, "v4")
    assert nginx_workers(app) == workers, "a deploy after the upgrade reloaded nginx"
    report = app.stop_load(load)
    assert_no_failed_request(report)  # the upgrade's nginx reloads close client keep-alives, once


def test_stopping_the_app_stops_every_instance(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    deploy(app, "v2")
    assert app.systemctl("stop", "flaskapp").returncode == 0
    for colour in ("blue", "green"):
        assert app.props(f"flaskapp@{colour}.service")["ActiveState"] == "inactive"
    assert app.systemctl("start", "flaskapp").returncode == 0
    assert live(app) == ["green"] and app.version() == "v2", "a restart keeps the live colour and its release"


def test_a_deploy_that_cannot_reach_the_bus_says_so_in_the_unit_status(container) -> None:
    app = install(container, BLUE_GREEN, reload="bake_seconds = 1")
    app.c.write_file("/etc/systemd/system/flaskapp.service.d/no-bus.conf",
                     "[Service]\nEnvironment=DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent\n")
    app.systemctl("daemon-reload")
    app.ship("v2")
    assert app.reload().returncode != 0
    props = app.props()
    assert "reload refused: cannot connect to the systemd system bus" in props["StatusText"], props
    assert props["ActiveState"] == "active" and app.version() == "v1" and live(app) == ["blue"]
    app.c.run(["rm", "/etc/systemd/system/flaskapp.service.d/no-bus.conf"])
    app.systemctl("daemon-reload")
    deploy(app, "v3")
    assert live(app) == ["green"]


def test_rolling_deploys_under_load_never_reload_nginx(container) -> None:
    started = time.monotonic()
    app = install(container, ROLLING)
    assert routes(app) == {i: f"/run/flaskapp-{i}.sock" for i in ("1", "2", "3")}
    workers = nginx_workers(app)
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    for n in range(2, DEPLOYS + 2):
        st = deploy(app, f"v{n}")
        assert st["live"] == ["1", "2", "3"]
        assert {i["release"] for i in st["instances"]} == {str(n)}
        assert all(i["state"] == "active/running" and i["workers"] == 2 for i in st["instances"]), st
        assert routes(app) == {i: f"/run/flaskapp-{i}.sock" for i in ("1", "2", "3")}
    report = app.stop_load(load)
    assert nginx_workers(app) == workers, "a deploy reloaded nginx"
    assert_no_client_saw_a_close(report)
    print(f"rolling: {report['summary']}; nginx workers {workers} before and after; "
          f"{time.monotonic() - started:.0f} s")


def test_rolling_stops_at_a_failing_instance_and_restores_it(container) -> None:
    app = install(container, ROLLING)
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    app.ship(code=BROKEN["import error"][0])
    r = app.reload()
    assert r.returncode != 0 and "ModuleNotFoundError" in app.props()["StatusText"]
    app.ship("v3", extra=ONLY_IN_PRODUCTION)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0
    assert "instance 1" in props["StatusText"] and "restored release 1" in props["StatusText"], props
    st = status(app)
    assert {i["release"] for i in st["instances"]} == {"1"}, st
    assert all(i["state"] == "active/running" for i in st["instances"]), st
    assert routes(app) == {i: f"/run/flaskapp-{i}.sock" for i in ("1", "2", "3")}
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
