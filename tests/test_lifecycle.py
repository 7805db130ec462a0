"""What runs is what was proven: a refused release never runs, whatever happens after the reload returns.

Worker deaths (kill -9, max_requests recycling), master crashes, `systemctl restart`, `systemctl kill`,
environment changes and `reloader deploy --release` / `rollback` / `releases`, each in a real systemd
container under load through nginx. Scenarios share a container to keep the suite short.
"""

from __future__ import annotations

import json
import time

from appbed import IMPORT_ERROR, App

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


def busy_worker(app: App, master: int) -> int:
    """A worker of *master* in the middle of a request (sleeping in /slow), which it has not answered yet:
    SIGKILLing it must cost nothing (nginx resends the request). A worker killed while *writing* a
    response loses that response with any server, so the tests do not pick one at random."""
    def find() -> int:
        for pid in workers_of(app, master):
            if "nanosleep" in app.c.run(["cat", f"/proc/{pid}/wchan"], check=False).stdout:
                return pid
        return 0
    return wait_until(find, 30, "a worker busy with a slow request", interval=0.05)


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
    app.ship(code=IMPORT_ERROR)
    r3 = current(app)
    assert app.reload().returncode != 0
    props = app.props()
    assert "reload refused" in props["StatusText"] and "ModuleNotFoundError" in props["StatusText"], props
    assert r3 in records(app)["refused"] and records(app)["live"]["release"] == r2

    # Worker deaths: kill -9 one worker, and max_requests recycles all of them; each is respawned from
    # the master's own release (2), never from current (3).
    master = props["MainPID"]
    exits_dir = f"/run/flaskapp/ready/{master}"
    victim = busy_worker(app, master)
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
    # The access log (on by default) fills the journal: look for reloader's own lines.
    journal = app.journal_with("reloader: flaskapp:")
    assert "booting the live release 2; current -> 3 was refused" in journal, journal
    failed = sum(report["failures"].values())
    print(f"master crash + restart + kill of the unit: {failed} failed of {report['total']}; {report['summary']}")
    # Requests in flight on a SIGKILLed worker are resent by nginx to the socket, whose backlog systemd
    # holds across the restart: none is lost.
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))


def make_release(app: App, n: int, version: str, *, code: str | None = None, static: dict[str, str] | None = None,
                 extra: str = SHOW_ENV) -> str:
    """A release directory /srv/flaskapp/releases/N that `current` does not point at (yet)."""
    d = f"/srv/flaskapp/releases/{n}"
    app.c.run(["mkdir", "-p", f"{d}/static"])
    source = code if code is not None else app.c.read_file("/src/examples/flaskapp/app.py").replace(
        'VERSION = "v1"', f"VERSION = {version!r}") + extra
    app.c.write_file(f"{d}/app.py", source)
    for name, text in (static or {}).items():
        app.c.write_file(f"{d}/static/{name}", text)
    time.sleep(0.05)  # releases are ordered by directory mtime: keep them distinct
    return d


def reloader(app: App, *args: str):
    return app.c.run(["reloader", *args], check=False, timeout=300)


def test_environment_deploy_release_refusal_rollback_prune_and_static_assets(container) -> None:
    app = App(container)
    config = app.variant(reload="bake_seconds = 1\nkeep_releases = 3")
    toml = app.c.read_file(config).replace(
        'health_path = "/health"\n',
        'health_path = "/health"\nenvironment = { GREETING = "one" }\nenvironment_file = "/etc/flaskapp.env"\n')
    app.c.write_file(config, toml)
    app.c.write_file("/etc/flaskapp.env", "SECRET=s1\n")
    app.install(config, extra=SHOW_ENV, files={"static/app.css": "css-1", "static/old.css": "old-1"})
    assert app.wait_version("v1"), app.journal()
    r1 = current(app)
    assert app.get("/env").json == {"greeting": "one", "secret": "s1"}

    # The environment: a TOML change through `reloader install`, an EnvironmentFile= change through reload.
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    app.c.write_file(config, toml.replace('GREETING = "one"', 'GREETING = "two"'))
    r = reloader(app, "install", config)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert app.get("/env").json == {"greeting": "two", "secret": "s1"}, "install reported success too early"
    app.c.write_file("/etc/flaskapp.env", "SECRET=s2\n")
    assert app.reload().returncode == 0, app.journal(30)
    assert app.get("/env").json == {"greeting": "two", "secret": "s2"}
    report = app.stop_load(load)
    assert report["total"] > 0 and report["failures"] == {}, (report["summary"], report.get("first_failures"))
    print(f"environment via install and via EnvironmentFile + reload: {report['summary']}")

    # --release: deploys, refusals and bad input leave current == live.
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    r2 = make_release(app, 2, "v2", static={"app.css": "css-2"})
    r = reloader(app, "deploy", "flaskapp", "--release", r2)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert app.version() == "v2" and current(app) == r2 and records(app)["live"]["release"] == r2
    assert app.get("/static/app.css").body == "css-2"
    assert app.get("/static/old.css").status == 200, "the previous release's assets stay reachable"

    app.c.run("mkdir -p /tmp/elsewhere && touch /srv/flaskapp/releases/afile && "
              "ln -sfn loop1 /srv/flaskapp/releases/loop2 && ln -sfn loop2 /srv/flaskapp/releases/loop1")
    state = app.c.read_file("/var/lib/reloader/flaskapp/releases.json")
    for bad, why in (("/srv/flaskapp/releases/nosuch", "no such release directory"),
                     ("/srv/flaskapp/releases/afile", "not a directory"),
                     ("/tmp/elsewhere", "not a release in /srv/flaskapp/releases"),
                     ("/srv/flaskapp/releases/loop1", "symlink loop")):
        r = reloader(app, "deploy", "flaskapp", "--release", bad)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
        assert current(app) == r2 and app.c.read_file("/var/lib/reloader/flaskapp/releases.json") == state, bad
    app.c.run("rm -f /srv/flaskapp/releases/afile /srv/flaskapp/releases/loop1 /srv/flaskapp/releases/loop2")

    # A refused release with static assets: current goes back, every static URL of release 2 still answers.
    r3 = make_release(app, 3, "v3", code=IMPORT_ERROR, static={"app.css": "css-3", "new.css": "new-3"})
    r = reloader(app, "deploy", "flaskapp", "--release", r3)
    assert r.returncode == 1 and "current put back" in r.stdout, (r.stdout, r.stderr)
    assert current(app) == r2 and app.version() == "v2"
    assert (app.get("/static/app.css").status, app.get("/static/app.css").body) == (200, "css-2")
    assert app.get("/static/old.css").status == 200 and app.get("/static/new.css").status == 404
    listed = json.loads(reloader(app, "releases", "flaskapp", "--json").stdout)
    states = {row["release"]: row["state"] for row in listed["releases"]}
    assert states == {"1": "previous", "2": "live", "3": "refused"}, listed
    assert "ModuleNotFoundError" in next(row for row in listed["releases"] if row["release"] == "3")["reason"]
    status = json.loads(reloader(app, "status", "flaskapp", "--json").stdout)
    assert status["live_release"] == r2 and status["refused_release"] == "3", status
    assert "ModuleNotFoundError" in status["refused_reason"]

    # rollback: a verified reload onto the previous proven release.
    r = reloader(app, "rollback", "flaskapp")
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert app.version() == "v1" and current(app) == r1 and records(app)["live"]["release"] == r1
    r = reloader(app, "rollback", "flaskapp", "3")
    assert r.returncode == 2 and "was refused" in r.stderr, r.stderr

    # keep_releases = 3 prunes by state: the refused 3 first (deploying 4), then the oldest proven one, 2
    # (deploying 5); 1 stays, the most recent rollback target after the live 5 and the previous 4.
    for n in (4, 5):
        d = make_release(app, n, f"v{n}")
        r = reloader(app, "deploy", "flaskapp", "--release", d)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert app.version() == f"v{n}" and current(app) == d
    left = sorted(app.c.run("ls /srv/flaskapp/releases").stdout.split())
    assert left == ["1", "4", "5"], left
    report = app.stop_load(load)
    assert report["total"] > 0 and report["failures"] == {}, (report["summary"], report.get("first_failures"))
    print(f"--release deploys, refusal, rollback, prune: {report['summary']}")

    # A change a reload cannot apply (the unit's WorkingDirectory=): install says so and fails; still serving.
    app.c.run("ln -sfn /srv/flaskapp/current /srv/flaskapp/app")
    app.c.write_file(config, app.c.read_file(config).replace('"/srv/flaskapp/current"', '"/srv/flaskapp/app"'))
    r = reloader(app, "install", config)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "flaskapp.service: WorkingDirectory=" in r.stderr, r.stderr
    assert "systemctl restart flaskapp.service" in r.stderr, r.stderr
    assert app.version() == "v5"


def test_hup_strategy_keeps_its_release_and_takes_the_new_environment(container) -> None:
    app = App(container)
    config = app.variant(reload='strategy = "hup"\nbake_seconds = 1')
    toml = app.c.read_file(config).replace(
        'health_path = "/health"\n', 'health_path = "/health"\nenvironment = { GREETING = "one" }\n')
    app.c.write_file(config, toml)
    app.install(config, extra=SHOW_ENV)
    assert app.wait_version("v1"), app.journal()
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    app.ship("v2", extra=SHOW_ENV)
    assert app.reload().returncode == 0, app.journal(30)
    r2 = current(app)
    master = app.props()["MainPID"]
    # The environment reaches the HUPed master's new workers, and install waits for that.
    app.c.write_file(config, toml.replace('GREETING = "one"', 'GREETING = "two"'))
    r = reloader(app, "install", config)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert app.get("/env").json["greeting"] == "two" and app.props()["MainPID"] == master
    # Refused, then a worker dies: it comes back on release 2.
    app.ship(code=IMPORT_ERROR)
    assert app.reload().returncode != 0
    victim = busy_worker(app, master)
    app.c.run(["kill", "-KILL", str(victim)])
    wait_until(lambda: victim not in workers_of(app, master) and len(workers_of(app, master)) == 4, 30,
               "the killed worker to be replaced")
    assert app.version() == "v2" and app.props()["MainPID"] == master
    report = app.stop_load(load)
    assert report["total"] > 0 and report["failures"] == {}, (report["summary"], report.get("first_failures"))
    print(f"hup: deploy, environment, refusal, worker kill: {report['summary']}")
    # The virtualenv symlink is switched to one without Flask: refused. Then the master crashes: the
    # live release boots with its own virtualenv and the current environment, no crash loop.
    app.c.run("cp -a /opt/venv /opt/venv-broken && rm -rf /opt/venv-broken/lib/python3*/site-packages/flask && "
              "sed -i '1s|/opt/venv/|/opt/venv-broken/|' /opt/venv-broken/bin/gunicorn && "
              "ln -sfn /opt/venv-broken /srv/flaskapp/venv.new && mv -T /srv/flaskapp/venv.new /srv/flaskapp/venv")
    app.ship("v3", extra=SHOW_ENV)
    r = app.reload()
    assert r.returncode != 0 and "No module named 'flask'" in app.props()["StatusText"], app.props()
    app.c.run(["kill", "-KILL", str(master)])
    wait_until(lambda: app.props()["MainPID"] not in (0, master), 60, "a new master")
    props = serving_and_active(app, "v2")
    assert app.props()["NRestarts"] == 1, app.props()
    assert app.c.run(f"readlink /proc/{props['MainPID']}/cwd").stdout.strip() == r2
    assert "booting the live virtualenv /opt/venv" in app.journal_with("booting the live virtualenv")
    assert app.get("/env").json["greeting"] == "two"
