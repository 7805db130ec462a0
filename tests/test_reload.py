"""`systemctl reload flaskapp` in a real systemd: loses no request, refuses broken releases, tells the truth.

Every test runs the example app behind nginx in a booted container, with a load generator inside it that
counts every response and connection error (reloader/loadgen.py).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from appbed import BROKEN, BROKEN_PREFLIGHT_TIMEOUT, EXAMPLE, IMPORT_ERROR, App

RELOADS = 20
TRIXIE_RELOADS = 5  # the same guarantee on Debian 13, with a CI-sized batch

#: Run a test on Debian 12 (systemd 252, nginx 1.22, Python 3.11) and Debian 13 (257, 1.26, 3.13).
both_releases = pytest.mark.parametrize("container", ["bookworm", "trixie"], indirect=True)


def assert_no_failures(report: dict) -> None:
    assert report["total"] > 0, report["summary"]
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["keepalive_retries"] == 0, report["summary"]
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]


def reload_to(app: App, version: str) -> tuple[int, dict]:
    """Ship *version*, reload, and check what systemd and the app say afterwards."""
    before = app.props()["MainPID"]
    app.ship(version)
    r = app.reload()
    after = app.props()
    assert r.returncode == 0, (r.stderr, after, app.journal(30))
    assert app.version() == version, "reload returned before the new release was serving"
    assert after["ActiveState"] == "active" and after["SubState"] == "running", after
    assert after["ReloadResult"] == "success", after
    return before, after


@pytest.mark.parametrize(("container", "reloads"), [
    pytest.param("bookworm", RELOADS, id="default"),
    pytest.param("bookworm", RELOADS, id="preload_app", marks=pytest.mark.app_config(gunicorn="preload_app = true")),
    pytest.param("trixie", TRIXIE_RELOADS, id="trixie"),
], indirect=["container"])
def test_twenty_reloads_under_load_lose_no_request(app: App, reloads: int) -> None:
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
    pids = [app.props()["MainPID"]]
    for n in range(2, reloads + 2):
        _, after = reload_to(app, f"v{n}")
        assert after["MainPID"] != pids[-1], "the default strategy starts a new master every reload"
        assert app.c.read_file("/run/flaskapp/gunicorn.pid").strip() == str(after["MainPID"])
        # STATUS= reports the workers it saw ready: the same number as the ready worker processes here.
        status, ready = after["StatusText"], app.ready_workers(after["MainPID"])
        reported = re.search(r"(\d+) workers", status)
        assert f"generation {n}" in status and reported, after
        assert int(reported[1]) == len(ready) > 0, (status, ready)
        pids.append(after["MainPID"])
    report = app.stop_load(load)
    assert_no_failures(report)
    assert set(report["versions"]) == {f"v{n}" for n in range(1, reloads + 2)}
    assert app.masters() == [pids[-1]], "exactly one generation is left running"


@pytest.mark.app_config(reload='strategy = "hup"')
def test_hup_strategy_reloads_in_place_under_load(app: App) -> None:
    master = app.props()["MainPID"]
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    for n in range(2, 7):
        _, after = reload_to(app, f"v{n}")
        assert after["MainPID"] == master, "HUP keeps the master"
    report = app.stop_load(load)
    assert_no_failures(report)


@both_releases
@pytest.mark.app_config(reload=BROKEN_PREFLIGHT_TIMEOUT)
def test_broken_releases_are_refused_while_the_old_one_serves(app: App) -> None:
    master = app.props()["MainPID"]
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    for kind, (code, reason) in BROKEN.items():
        app.ship(code=code)
        r = app.reload()
        props = app.props()
        assert r.returncode != 0, f"{kind}: reload must fail"
        assert props["ActiveState"] == "active" and props["SubState"] == "running", (kind, props)
        assert props["MainPID"] == master, f"{kind}: the running master was touched"
        assert reason in props["StatusText"], (kind, props["StatusText"])
        status = app.systemctl("status", "flaskapp", "--no-pager").stdout
        assert "reload refused" in status and reason in status, (kind, status)
        assert app.version() == "v1", kind
    report = app.stop_load(load)
    assert_no_failures(report)
    assert set(report["versions"]) == {"v1"}
    # The next good release still deploys.
    reload_to(app, "v9")


def test_a_release_that_fails_only_under_gunicorn_is_rolled_back(app: App) -> None:
    """Passes the pre-flight, but its workers fail to boot: the new generation is stopped, the old stays."""
    master = app.props()["MainPID"]
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    extra = "\nimport sys\nif 'gunicorn' in ' '.join(sys.argv):\n    raise RuntimeError('only in production')\n"
    app.ship("v2", extra=extra)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0
    assert props["MainPID"] == master and props["SubState"] == "running", props
    assert "reload refused" in props["StatusText"] and "exited while booting" in props["StatusText"], props
    report = app.stop_load(load)
    assert_no_failures(report)
    assert set(report["versions"]) == {"v1"}
    assert app.masters() == [master]


def test_workers_that_die_during_the_bake_are_rolled_back(app: App) -> None:
    """Workers that boot and then die (here: 0.5 s after loading) fail the bake; the old generation stays.

    No load here: a worker that dies mid-request kills that request whatever the deploy tool does.
    """
    master = app.props()["MainPID"]
    extra = ("\nimport os, sys, threading\nif 'gunicorn' in ' '.join(sys.argv):\n"
             "    threading.Timer(0.5, os._exit, [1]).start()\n")
    app.ship("v2", extra=extra)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0
    assert props["MainPID"] == master and props["SubState"] == "running", props
    assert "reload refused" in props["StatusText"] and "died during the bake" in props["StatusText"], props
    assert app.version() == "v1"
    assert app.masters() == [master]


def test_slow_but_valid_import_succeeds(app: App) -> None:
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    app.ship("v2", extra="\nimport time\ntime.sleep(20)\n")
    started = time.monotonic()
    r = app.reload()
    took = time.monotonic() - started
    assert r.returncode == 0, (r.stderr, app.journal(30))
    assert took >= 20, "the pre-flight and the new workers both really imported the slow app"
    assert app.version() == "v2"
    assert_no_failures(app.stop_load(load))


@both_releases
def test_helper_killed_mid_reload_leaves_a_serving_unit_whose_next_reload_succeeds(app: App) -> None:
    master = app.props()["MainPID"]
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    app.ship("v2", extra="\nimport time\ntime.sleep(4)\n")
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until the new master exists (USR2 sent, workers importing), then SIGKILL the helper.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if app.c.run("test -s /run/flaskapp/gunicorn.pid.2", check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the new master never appeared: " + app.journal_without_access_log(40))
    helper = app.props()["ControlPID"]
    assert helper > 0
    app.c.run(["kill", "-KILL", str(helper)])
    assert reload.wait(timeout=60) != 0
    props = app.props()
    assert props["ActiveState"] == "active" and props["MainPID"] == master, props
    assert props["ReloadResult"] == "signal", props
    assert app.version() == "v1"
    # The next reload cleans up the stray generation and deploys.
    app.ship("v3")
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal_without_access_log(60))
    assert app.version() == "v3"
    assert app.masters() == [app.props()["MainPID"]]
    assert_no_failures(app.stop_load(load))


#: A setup command that waits while the release holds a file ``hold``: keeps a reload under its lock
#: (setup commands run first, before the pre-flight and any new generation) as long as the test needs,
#: and costs nothing to a release without the file.
HOLD_WHILE_FILE = """commands = ["sh -c 'while [ -e hold ]; do sleep 0.1; done'"]"""
LOCK_WAIT = 10  # ready_timeout: how long a second reload waits for the lock before it refuses


@pytest.mark.app_config(reload=f"ready_timeout = {LOCK_WAIT}", setup=HOLD_WHILE_FILE)
def test_a_manual_exec_reload_waits_for_the_running_reload_then_refuses(app: App) -> None:
    """systemd never runs two ExecReload= of one unit at once, but an operator can run the helper by hand
    next to `systemctl reload` (`MAINPID=... reloader exec-reload CONFIG`). The reload lock
    (runtime_dir/reload.lock) makes the second one wait up to ready_timeout and then refuse, without
    touching a process: at no time do two new generations exist, and the first reload deploys."""
    master = app.props()["MainPID"]
    release = app.ship("v2", files={"hold": ""})
    hold = f"/srv/flaskapp/releases/{release}/hold"
    watch = app.start_master_watch()
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while "setup: running" not in app.props()["StatusText"]:  # past the lock, held by the setup command
        assert reload.poll() is None and time.monotonic() < deadline, (reload.poll(), app.props(), app.journal(20))
        time.sleep(0.2)

    started = time.monotonic()
    manual = app.c.popen(["reloader", "exec-reload", "/etc/reloader/flaskapp.toml"], env={"MAINPID": str(master)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = manual.communicate(timeout=LOCK_WAIT + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the manual exec-reload neither waited for the lock nor refused within {LOCK_WAIT + 30} s: "
                    "it ran next to the reload systemd started")
    waited = time.monotonic() - started
    assert reload.poll() is None, "the first reload ended before the manual one gave up: no contention shown"
    assert manual.returncode == 1, (manual.returncode, err)
    first = err.strip().splitlines()[0] if err.strip() else ""
    assert "reload refused" in first and "another reload of this app is still running" in first, err
    for step in ("setup: running", "pre-flight: importing", "starting a new generation", "stopping stray",
                 "retiring old master", "rolling back"):  # the STATUS= lines of the steps of a reload
        assert step not in err, f"the manual exec-reload did something before refusing ({step!r}): {err}"
    assert waited >= LOCK_WAIT, f"refused after {waited:.1f} s: it did not wait ready_timeout for the lock"

    released = time.monotonic()
    app.c.run(["rm", hold])
    _, err = reload.communicate(timeout=180)
    props = app.props()
    assert reload.returncode == 0, (err, props, app.journal(30))
    assert props["ReloadResult"] == "success" and props["MainPID"] != master, props
    assert app.version() == "v2"
    assert app.masters() == [props["MainPID"]]
    seen = app.stop_master_watch(watch)
    assert all(masters == [master] for at, masters in seen if at < released), seen
    assert max(len(masters) for _, masters in seen) <= 2, seen
    new = {pid for _, masters in seen for pid in masters} - {master}
    assert new == {props["MainPID"]}, f"new generations seen: {sorted(new)} ({seen})"
    print(f"manual exec-reload refused after {waited:.1f} s; masters seen: {seen}")


def test_notify_reload_is_refused_on_systemd_252(container) -> None:
    app = App(container)
    r = app.install(EXAMPLE, "--notify-reload", check=False)
    assert r.returncode == 1 and "needs systemd 253 or newer" in r.stderr, r.stderr
    assert app.c.run("test -e /etc/systemd/system/flaskapp.service", check=False).returncode != 0


@both_releases
def test_restart_and_stop_drain_in_flight_requests(app: App) -> None:
    """With the socket held by systemd, even `systemctl restart` refuses no connection."""
    # A restart promises that no connection is refused (they wait in the socket's backlog), not how long
    # they wait: on a loaded host gunicorn's boot can keep a request waiting past the default 10 s.
    load = app.start_load(concurrency=4, long=2, long_path="/slow?s=2", timeout=60)
    time.sleep(1)  # let the long requests get in flight before the restart
    r = app.systemctl("restart", "flaskapp")
    assert r.returncode == 0, r.stderr
    assert app.wait_version("v1")
    report = app.stop_load(load)
    assert_no_failures(report)
    # stop: an in-flight request finishes with 200 before the master exits.
    slow = app.c.popen("curl -s -o /dev/null -w '%{http_code}' -H 'Host: flaskapp.example' "
                       "'http://127.0.0.1/slow?s=3'", stdout=subprocess.PIPE)
    time.sleep(1)
    assert app.systemctl("stop", "flaskapp").returncode == 0
    out, _ = slow.communicate(timeout=30)
    assert out.decode().strip() == "200"


@both_releases
def test_nginx_reload_is_verified_and_refuses_a_bad_config(app: App) -> None:
    nginx = app.props("nginx.service")
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    for _ in range(5):
        r = app.systemctl("reload", "nginx")
        assert r.returncode == 0, r.stderr
    assert "new workers serving" in app.c.run("journalctl -u nginx --no-pager", check=False).stdout
    app.c.write_file("/etc/nginx/conf.d/broken.conf", "server { listen 81; bogus_directive on; }\n")
    r = app.systemctl("reload", "nginx")
    assert r.returncode != 0
    journal = app.c.run("journalctl -u nginx --no-pager -n 20", check=False).stdout
    assert "nginx left untouched" in journal and "bogus_directive" in journal, journal
    after = app.props("nginx.service")
    assert after["ActiveState"] == "active" and after["MainPID"] == nginx["MainPID"], after
    report = app.stop_load(load)
    assert report["failures"] == {}, report["summary"]
    assert report["total"] > 0


def test_a_virtualenv_switched_by_symlink_is_picked_up(app: App) -> None:
    """gunicorn re-execs its resolved interpreter; the generated pre_exec hook execs the configured path."""
    app.c.run("cp -a /opt/venv /opt/venv2 && "
              "echo 'NAME = \"venv2\"' > $(ls -d /opt/venv2/lib/python3*/site-packages)/venv_marker.py")
    marker = ("\ntry:\n    import venv_marker\n    VERSION = VERSION + '-' + venv_marker.NAME\n"
              "except ImportError:\n    pass\n")
    app.ship("v2", extra=marker)
    assert app.reload().returncode == 0
    assert app.version() == "v2", "the old venv is still in use"
    app.c.run("ln -sfn /opt/venv2 /srv/flaskapp/venv.new && mv -T /srv/flaskapp/venv.new /srv/flaskapp/venv")
    app.ship("v3", extra=marker)
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal(20))
    assert app.version() == "v3-venv2"


@pytest.mark.parametrize("container", ["trixie"], indirect=True)
@pytest.mark.app_config(flags=("--notify-reload",))
def test_type_notify_reload_on_systemd_257(app: App) -> None:
    """On systemd >= 253 `reloader install --notify-reload` renders Type=notify-reload; reloads keep every
    guarantee."""
    unit = app.c.read_file("/etc/systemd/system/flaskapp.service")
    assert "Type=notify-reload" in unit and "ReloadSignal=SIGWINCH" in unit
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    for n in (2, 3, 4):
        before, after = reload_to(app, f"v{n}")
        assert after["MainPID"] != before
    app.ship(code=IMPORT_ERROR)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0 and props["SubState"] == "running", props
    assert "ModuleNotFoundError" in props["StatusText"]
    assert app.version() == "v4"
    assert_no_failures(app.stop_load(load))
    assert "changed on disk" not in r.stderr
    # The way back: `reloader install` without the flag renders Type=notify again (its reload deploys
    # what `current` points at), and reloads go on.
    app.ship("v5")
    r = app.c.run(["reloader", "install", EXAMPLE], check=False, timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert app.c.run(["systemctl", "show", "-P", "Type", "flaskapp"]).stdout.strip() == "notify"
    assert "--notify-reload" not in app.c.read_file("/etc/systemd/system/flaskapp.service")
    assert app.version() == "v5"
    reload_to(app, "v6")


def test_a_reload_after_a_manual_hup_still_works(app: App) -> None:
    """An operator's `kill -HUP` frees fd 3 in the master; the USR2 hand-off of the sockets must not care.

    A manual HUP replaces the workers but keeps the master's own (live) release: only a reload deploys."""
    serving = "v1"
    for hups in (1, 2):
        app.ship(f"v{hups + 1}")
        master = app.props()["MainPID"]

        def workers(master: int = master) -> set[str]:
            return set(app.c.run(f"ps -o pid= --ppid {master}").stdout.split())

        for _ in range(hups):
            # One HUP at a time, each once the previous one's workers are up: a TERM that reaches a worker
            # gunicorn has only just forked (before it installs its own handlers) is lost, so HUPs in quick
            # succession can leave an extra worker behind (gunicorn's race, not reloader's).
            before = workers()
            assert app.systemctl("kill", "--kill-who=main", "-s", "HUP", "flaskapp").returncode == 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (before & workers() or len(workers()) != 4):
                time.sleep(0.2)
            assert not before & workers() and len(workers()) == 4, ("HUP replaced the workers", before, workers())
        assert app.version() == serving, "a manual HUP must not deploy an unverified release"
        app.ship(f"v{hups + 10}")
        r = app.reload()
        assert r.returncode == 0, (r.stderr, app.journal(30))
        assert app.version() == f"v{hups + 10}"
        serving = f"v{hups + 10}"
