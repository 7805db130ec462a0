"""What runs is what was proven: a refused release never runs, whatever happens after the reload returns.

Worker deaths (kill -9, max_requests recycling), master crashes, `systemctl restart`, `systemctl kill`,
environment changes and `reloader deploy --release` / `rollback` / `releases`, each in a real systemd
container under load through nginx. Scenarios share a container to keep the suite short.
"""

from __future__ import annotations

import json
import time

from appbed import App

BROKEN = "import nosuchmodule\n"
# A release that shows its environment, so a test can see what the serving generation got.
SHOW_ENV = ("\nfrom flask import jsonify as _j\n\n@app.get('/env')\ndef env():\n"
            "    return _j(greeting=os.environ.get('GREETING', ''), secret=os.environ.get('SECRET', ''))\n")


def wait_until(condition, timeout: float, what: str, interval: float = 0.2, app: App | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    seen = ""
    if app:  # what systemd and reloader said (gunicorn's own lines left out)
        log = app.c.run("journalctl -u flaskapp --no-pager -n 400 | grep -v 'gunicorn\\[' | tail -40", check=False)
        seen = f"; unit {app.props()}; journal:\n{log.stdout}"
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}")


def workers_of(app: App, master: int) -> list[int]:
    r = app.c.run(f"ps -o pid= --ppid {master}", check=False)
    return sorted(int(p) for p in r.stdout.split())


def records(app: App) -> dict:
    return json.loads(app.c.read_file("/var/lib/reloader/flaskapp/releases.json"))


def current(app: App) -> str:
    return app.c.run("readlink -f /srv/flaskapp/current").stdout.strip()


def serving_and_active(app: App, version: str, timeout: float = 60) -> dict:
    """The unit is active/running again and nginx answers with *version*."""
    wait_until(lambda: app.props()["SubState"] == "running", timeout, "the unit to run again")
    assert app.wait_version(version, timeout), (app.version(), app.journal(30))
    props = app.props()
    assert props["ActiveState"] == "active", props
    return props


def test_a_refused_release_never_runs_after_worker_deaths_crashes_and_restarts(container) -> None:
    app = App(container)
    # max_requests = 50: every worker is recycled (re-imports the app) many times during the test.
    config = app.variant(gunicorn="", reload="bake_seconds = 1")
    text = app.c.read_file(config).replace(
        'health_path = "/health"\n',
        'health_path = "/health"\nenvironment = { GUNICORN_CMD_ARGS = "--max-requests 50" }\n')
    app.c.write_file(config, text)
    app.install(config)
    assert app.wait_version("v1"), app.journal()
    r1 = current(app)
    assert records(app)["live"]["release"] == r1, "the first start records what it booted as live"

    app.ship("v2")
    assert app.reload().returncode == 0, app.journal(30)
    assert app.version() == "v2"
    r2 = current(app)
    assert records(app)["live"]["release"] == r2 and records(app)["previous"]["release"] == r1

    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    # Refused: current now points at a release that fails to import.
    app.ship(code=BROKEN)
    r3 = current(app)
    assert app.reload().returncode != 0
    props = app.props()
    assert "reload refused" in props["StatusText"] and "ModuleNotFoundError" in props["StatusText"], props
    assert r3 in records(app)["refused"] and records(app)["live"]["release"] == r2

    # Worker deaths: kill -9 one worker, and max_requests recycles all of them; each is respawned from
    # the master's own release (2), never from current (3).
    master = props["MainPID"]
    exits_dir = f"/run/flaskapp/ready/{master}"
    victim = workers_of(app, master)[0]
    app.c.run(["kill", "-KILL", str(victim)])
    wait_until(lambda: victim not in workers_of(app, master) and len(workers_of(app, master)) == 4, 30,
               "the killed worker to be replaced")
    recycled = wait_until(
        lambda: (n := len([e for e in app.c.run(["ls", exits_dir]).stdout.split() if e.startswith("exit-")]))
        >= 12 and n, 120, "max_requests to recycle the workers 12 times")
    props = app.props()
    assert props["MainPID"] == master and props["SubState"] == "running" and props["NRestarts"] == 0, props
    assert app.version() == "v2"
    report = app.stop_load(load)
    assert report["total"] > 0 and report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert set(report["versions"]) == {"v2"}, report["versions"]
    print(f"worker deaths: 1 kill -9 + {recycled} recycled; {report['summary']}")

    # Master crash, restart, kill of the whole unit: each boots the live release 2, never 3.
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    for how in ("kill -9 MainPID", "systemctl restart", "systemctl kill -s KILL"):
        before, restarts = app.props()["MainPID"], app.props()["NRestarts"]
        if how == "kill -9 MainPID":
            app.c.run(["kill", "-KILL", str(before)])
        elif how == "systemctl restart":
            assert app.systemctl("restart", "flaskapp").returncode == 0, app.journal(30)
        else:
            assert app.systemctl("kill", "-s", "KILL", "flaskapp").returncode == 0
        wait_until(lambda b=before: app.props()["MainPID"] not in (0, b), 60, f"a new master after {how}")
        props = serving_and_active(app, "v2")
        wait_until(lambda: "serving release" in app.props()["StatusText"], 60, "the start's STATUS=", app=app)
        status = app.props()["StatusText"]
        assert f"serving release {r2.rsplit('/', 1)[1]}" in status and "was refused" in status, (how, status)
        assert app.c.run(f"readlink /proc/{props['MainPID']}/cwd").stdout.strip() == r2, how
        if how != "systemctl restart":  # a crash is restarted once, not looped (a manual start resets the count)
            assert app.props()["NRestarts"] == restarts + 1, (how, app.props())
    report = app.stop_load(load)
    assert set(report["versions"]) == {"v2"}, report["versions"]
    assert current(app) == r3 and records(app)["live"]["release"] == r2
    journal = app.journal(200)
    assert "booting the live release 2; current -> 3 was refused" in journal, journal
    failed = sum(report["failures"].values())
    print(f"master crash + restart + kill of the unit: {failed} failed of {report['total']}; {report['summary']}")
    # Requests in flight on a SIGKILLed worker are resent by nginx to the socket, whose backlog systemd
    # holds across the restart: none is lost.
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
