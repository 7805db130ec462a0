"""The operator commands (install, deploy/reload, status, uninstall) against a real systemd in a container.

Why: these are what an operator types. Each test asserts what the operator (or a monitor) can observe
afterwards -- exit codes, files on disk, unit properties over D-Bus, HTTP answers through nginx, PIDs --
never only the command's own words. Waits poll a condition against a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable

import appbed
import pytest
import testbed

EXAMPLE = appbed.EXAMPLE
MANIFEST = "/var/lib/reloader/flaskapp.json"
DROPIN = "/etc/systemd/system/nginx.service.d/reloader.conf"
SERVICE, SOCKET = "flaskapp.service", "flaskapp.socket"
#: Run a test on Debian 12 (systemd 252, nginx 1.22, Python 3.11) and Debian 13 (257, 1.26, 3.13).
both_releases = pytest.mark.parametrize("container", ["bookworm", "trixie"], indirect=True)

API_CONFIG = """\
[app]
name = "api"
working_directory = "/srv/api/current"
virtualenv = "/opt/venv"
wsgi = "app:app"

[gunicorn]
workers = 2

[nginx]
listen = "8080"
server_name = "api.example"
"""


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def reloader(
    c: testbed.Container, *args: str, user: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the reloader command inside (as root, or as *user* via runuser); never raises on exit status."""
    cmd = ["reloader", *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return c.run(cmd, check=False, timeout=timeout)


def out(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def children(c: testbed.Container, pid: int) -> list[int]:
    """Live children of *pid* inside the container (read from /proc via ps --ppid)."""
    r = c.run(["ps", "--no-headers", "-o", "pid=,stat=", "--ppid", str(pid)], check=False)
    return [int(line.split()[0]) for line in r.stdout.splitlines() if line.split()[1:2] != ["Z"]]


def alive(c: testbed.Container, pid: int) -> bool:
    return c.run(["test", "-d", f"/proc/{pid}"], check=False).returncode == 0


def exists(c: testbed.Container, path: str) -> bool:
    return c.run(["test", "-e", path], check=False).returncode == 0


def fingerprint(c: testbed.Container, paths: list[str]) -> str:
    """mtime (ns), size, owner, mode and content hash of every path that exists, to prove "nothing changed"."""
    script = 'for p; do [ -e "$p" ] && stat -c "%n %.9Y %s %U:%G %a" "$p" && sha256sum "$p"; done; true'
    return c.run(["sh", "-c", script, "sh", *paths]).stdout


def api_ship(c: testbed.Container, n: int, version: str) -> None:
    """Release *n* of the second app (a copy of the example app reporting *version*)."""
    d = f"/srv/api/releases/{n}"
    source = c.read_file(appbed.APP_SRC).replace('VERSION = "v1"', f"VERSION = {version!r}")
    c.write_file(f"{d}/app.py", source)
    c.run(f"ln -sfn {d} /srv/api/current.new && mv -T /srv/api/current.new /srv/api/current")


def api_version(c: testbed.Container) -> str:
    r = c.run("curl -s -m 10 -H 'Host: api.example' -w '\\n%{http_code}' http://127.0.0.1:8080/", check=False)
    body, _, code = r.stdout.rpartition("\n")
    return json.loads(body)["version"] if code == "200" else f"<{code}>"


def main_pid(app: appbed.App, unit: str = SERVICE) -> int:
    return int(app.props(unit)["MainPID"])


# --------------------------------------------------------------------------------------------------------
# install (+ status, reinstall no-op)
# --------------------------------------------------------------------------------------------------------


@both_releases
def test_install_units_files_manifest_user_and_status(app: appbed.App) -> None:
    c = app.c
    svc, sock, nginx = app.props(SERVICE), app.props(SOCKET), app.props("nginx.service")
    assert (svc["LoadState"], svc["ActiveState"], svc["SubState"]) == ("loaded", "active", "running"), svc
    # A listening socket whose service holds it reads "running" (it is "listening" only while no service runs).
    assert (sock["ActiveState"], sock["SubState"]) == ("active", "running"), sock
    assert c.run(["ss", "-xlnH", "src", "/run/flaskapp.sock"]).stdout.strip(), "nothing listens on the socket"
    assert nginx["ActiveState"] == "active", nginx
    pid = int(svc["MainPID"])
    assert pid > 0 and alive(c, pid)
    for unit in (SERVICE, SOCKET):
        assert c.run(["systemctl", "is-enabled", unit], check=False).stdout.strip() == "enabled", unit

    reply = app.get("/health")
    assert reply.status == 200 and reply.json == {"status": "ok", "version": "v1"}, reply
    assert app.get("/").json["release"] == "1"

    # Every file written is recorded in the manifest with its hash, root-owned and 0644.
    manifest = json.loads(c.read_file(MANIFEST))
    assert manifest["name"] == "flaskapp" and manifest["config"] == "/etc/reloader/flaskapp.toml"
    assert manifest["units"] == [SERVICE, SOCKET]
    expected = {
        "/etc/reloader/flaskapp.toml",
        "/etc/reloader/flaskapp.gunicorn.conf.py",
        "/etc/reloader/flaskapp.pause_hook.py",  # loaded by each worker (reloader pause)
        f"/etc/systemd/system/{SERVICE}",
        f"/etc/systemd/system/{SOCKET}",
        "/etc/nginx/conf.d/flaskapp.conf",
        DROPIN,
    }
    assert set(manifest["files"]) == expected
    for path, digest in manifest["files"].items():
        st = c.run(["stat", "-c", "%U:%G %a %F", path]).stdout.strip()
        assert st == "root:root 644 regular file", f"{path}: {st}"
        assert c.run(["sha256sum", path]).stdout.split()[0] == digest, f"{path} differs from the manifest"
    assert c.run(["stat", "-c", "%U:%G %a", MANIFEST]).stdout.strip() == "root:root 644"
    assert c.read_file("/etc/reloader/flaskapp.toml") == c.read_file(EXAMPLE)

    # The service user exists, is a system user without a login shell, and runs the app.
    pw = c.run(["getent", "passwd", "flaskapp"], check=False).stdout.strip().split(":")
    assert pw[0] == "flaskapp" and pw[6] == "/usr/sbin/nologin" and int(pw[2]) < 1000, pw
    assert c.run(["ps", "-o", "user=", "-p", str(pid)]).stdout.strip() == "flaskapp"

    # status NAME --json agrees with D-Bus and /proc.
    r = reloader(c, "status", "flaskapp", "--json")
    assert r.returncode == 0, out(r)
    st = json.loads(r.stdout)
    assert st["name"] == "flaskapp"
    assert st["service"] == "active/running" and st["socket"] == "active/running", st
    assert st["main_pid"] == pid
    assert st["workers"] == 4 == len(children(c, pid)), st
    assert st["release"] == "1" and st["strategy"] == "generation", st
    # status without NAME lists every managed app (here: one).
    r = reloader(c, "status")
    assert r.returncode == 0, out(r)
    assert re.search(
        rf"^flaskapp: active/running \(socket active/running\), MainPID {pid}, 4 workers, "
        r"release 1",
        r.stdout,
        re.M,
    ), out(r)
    r = reloader(c, "status", "--json")
    assert [row["name"] for row in json.loads(r.stdout)] == ["flaskapp"], out(r)

    # Re-running install with the same config is a no-op: nothing rewritten, nothing restarted.
    paths = sorted(manifest["files"]) + [MANIFEST]
    before = fingerprint(c, paths)
    r = reloader(c, "install", EXAMPLE)
    assert r.returncode == 0, out(r)
    assert "already installed and running; nothing changed" in r.stdout, out(r)
    assert fingerprint(c, paths) == before
    assert main_pid(app) == pid and alive(c, pid)


def test_install_changed_config_dry_run_then_apply_without_downtime(app: appbed.App) -> None:
    c = app.c
    pid = main_pid(app)
    assert len(children(c, pid)) == 4
    changed = c.read_file(EXAMPLE).replace("workers = 4", "workers = 3")
    assert changed != c.read_file(EXAMPLE)
    c.write_file("/root/flaskapp.toml", changed)
    manifest = json.loads(c.read_file(MANIFEST))
    paths = sorted(manifest["files"]) + [MANIFEST]
    before = fingerprint(c, paths)

    # --dry-run: shows the diff, writes nothing, touches no process.
    r = reloader(c, "install", "--dry-run", "/root/flaskapp.toml")
    assert r.returncode == 0, out(r)
    assert "-workers = 4" in r.stdout and "+workers = 3" in r.stdout, out(r)
    # The toml, the gunicorn config and the nginx site (it lists the socket once per worker + 1).
    assert "flaskapp: 3 file(s) would change" in r.stdout, out(r)
    assert "-    server unix:/run/flaskapp.sock max_fails=0;" in r.stdout, out(r)
    assert fingerprint(c, paths) == before, "--dry-run changed files"
    assert main_pid(app) == pid and len(children(c, pid)) == 4

    # --dry-run of an app that is not installed: lists new files, creates nothing (not even the user).
    c.write_file("/root/api.toml", API_CONFIG)
    r = reloader(c, "install", "--dry-run", "/root/api.toml")
    assert r.returncode == 0, out(r)
    assert "+ new file /etc/reloader/api.toml" in r.stdout and "6 file(s) would change" in r.stdout, out(r)
    assert c.run(["getent", "passwd", "api"], check=False).returncode == 2, "--dry-run created the user"
    for path in (
        "/etc/reloader/api.toml",
        "/etc/reloader/api.pause_hook.py",
        "/etc/systemd/system/api.service",
        "/etc/nginx/conf.d/api.conf",
        "/var/lib/reloader/api.json",
    ):
        assert not exists(c, path), f"--dry-run wrote {path}"

    # Apply under load: diff shown, service reloaded (not restarted), 3 workers, no failed request.
    load = app.start_load()
    r = reloader(c, "install", "/root/flaskapp.toml")
    report = app.stop_load(load)
    assert r.returncode == 0, out(r)
    assert "-workers = 4" in r.stdout and "+workers = 3" in r.stdout, out(r)
    assert "flaskapp: reloading the running service" in r.stdout, out(r)
    assert "/health answers 200 through nginx" in r.stdout, out(r)
    assert "workers = 3" in c.read_file("/etc/reloader/flaskapp.gunicorn.conf.py")
    assert c.read_file("/etc/reloader/flaskapp.toml") == changed
    new = main_pid(app)
    assert app.props()["ActiveState"] == "active"
    wait_for(lambda: len(children(c, new)) == 3, 30, f"3 workers under MainPID {new}")
    assert not alive(c, pid) or pid == new
    assert report["total"] > 0 and report["failed"] == 0, report["failures"]
    # The manifest follows the new content.
    manifest = json.loads(c.read_file(MANIFEST))
    assert (
        manifest["files"]["/etc/reloader/flaskapp.gunicorn.conf.py"]
        == c.run(["sha256sum", "/etc/reloader/flaskapp.gunicorn.conf.py"]).stdout.split()[0]
    )

    # And now that config is the installed one: a further install is a no-op.
    r = reloader(c, "install", "/root/flaskapp.toml")
    assert r.returncode == 0 and "nothing changed" in r.stdout, out(r)
    assert main_pid(app) == new


# --------------------------------------------------------------------------------------------------------
# deploy / reload
# --------------------------------------------------------------------------------------------------------


def test_deploy_reload_alias_and_json(app: appbed.App) -> None:
    c = app.c
    old = main_pid(app)
    app.ship("v2")
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 0, out(r) + app.journal()
    new = main_pid(app)
    assert new != old and not alive(c, old)
    assert re.search(
        r"^flaskapp: deploy success in [\d.]+ s \(job done, reload result success, active/running\)", r.stdout, re.M
    ), out(r)
    assert f"MainPID {old} -> {new}" in r.stdout, out(r)
    assert "serving release 2" in r.stdout, out(r)
    assert app.version() == "v2"
    assert app.get("/").json["release"] == "2"
    props = app.props()
    assert (props["ActiveState"], props["SubState"], props["ReloadResult"]) == ("active", "running", "success")
    assert len(children(c, new)) == 4

    # `reload` is an alias; --json is one parseable object.
    app.ship("v3")
    r = reloader(c, "reload", "flaskapp", "--json")
    assert r.returncode == 0, out(r)
    report = json.loads(r.stdout)
    newer = main_pid(app)
    assert report["result"] == "success" and report["job"] == "done", report
    assert report["unit"] == SERVICE and report["reload_result"] == "success"
    assert (report["active_state"], report["sub_state"]) == ("active", "running")
    assert report["old_main_pid"] == new and report["new_main_pid"] == newer != new, report
    assert report["seconds"] > 0 and "serving release 3" in report["status"], report
    assert app.version() == "v3"
    st = json.loads(reloader(c, "status", "flaskapp", "--json").stdout)
    assert st["release"] == "3" and st["main_pid"] == newer and st["reload_result"] == "success", st


def test_deploy_broken_release_keeps_old_generation(app: appbed.App) -> None:
    c = app.c
    pid = main_pid(app)
    workers = children(c, pid)
    app.ship(code=appbed.IMPORT_ERROR)
    r = reloader(c, "deploy", "flaskapp", "--json")
    assert r.returncode == 1, out(r)
    report = json.loads(r.stdout)
    assert report["result"] == "failed", report
    assert report["old_main_pid"] == report["new_main_pid"] == pid, report
    assert "ModuleNotFoundError" in report["status"] and "nosuchmodule" in report["status"], report
    assert report["status"].startswith("reload refused:"), report
    props = app.props()
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert int(props["MainPID"]) == pid and props["ReloadResult"] != "success", props
    assert "ModuleNotFoundError" in props["StatusText"], props
    assert children(c, pid) == workers, "the old generation's workers were touched"
    assert app.version() == "v1"
    # The human-readable form says the same.
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 1, out(r)
    assert "deploy failed" in r.stdout and f"MainPID {pid} -> {pid}" in r.stdout, out(r)
    assert "ModuleNotFoundError" in r.stdout, out(r)
    assert main_pid(app) == pid and app.version() == "v1"
    # status reports the failed reload but the service as healthy (exit 0: it is serving).
    r = reloader(c, "status", "flaskapp", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["service"] == "active/running" and st["reload_result"] != "success", st


# --------------------------------------------------------------------------------------------------------
# two apps side by side, then uninstall
# --------------------------------------------------------------------------------------------------------


@both_releases
def test_two_apps_isolated_then_uninstall(app: appbed.App) -> None:
    c = app.c
    c.write_file("/root/api.toml", API_CONFIG)
    api_ship(c, 1, "api-v1")
    r = reloader(c, "install", "/root/api.toml")
    assert r.returncode == 0, out(r) + c.run("journalctl -u api --no-pager -n 40", check=False).stdout
    assert api_version(c) == "api-v1" and app.version() == "v1"
    api = appbed.App(c, name="api")
    api_pid, flask_pid = main_pid(api, "api.service"), main_pid(app)
    assert len(children(c, api_pid)) == 2
    assert c.run(["getent", "passwd", "api"], check=False).returncode == 0
    api_manifest = json.loads(c.read_file("/var/lib/reloader/api.json"))
    flask_manifest = json.loads(c.read_file(MANIFEST))
    assert DROPIN in api_manifest["files"] and DROPIN in flask_manifest["files"]

    r = reloader(c, "status")
    assert r.returncode == 0, out(r)
    names = [line.split(":")[0] for line in r.stdout.splitlines() if not line.startswith(" ")]
    assert names == ["api", "flaskapp"], out(r)
    assert f"MainPID {api_pid}, 2 workers" in r.stdout and f"MainPID {flask_pid}, 4 workers" in r.stdout

    # Deploying one app never touches the other.
    app.ship("v2")
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 0, out(r)
    assert app.version() == "v2" and api_version(c) == "api-v1"
    assert main_pid(api, "api.service") == api_pid
    flask_pid = main_pid(app)
    api_ship(c, 2, "api-v2")
    r = reloader(c, "deploy", "api")
    assert r.returncode == 0, out(r)
    assert api_version(c) == "api-v2" and app.version() == "v2"
    assert main_pid(app) == flask_pid
    api_pid = main_pid(api, "api.service")

    # Uninstall flaskapp (after a deploy: MainPID is the handed-over master) while a request is in flight:
    # the service stops gracefully, its units and files go; the shared nginx drop-in stays for api.
    slow = c.popen(
        "curl -s -o /dev/null -w '%{http_code}' -H 'Host: flaskapp.example' 'http://127.0.0.1/slow?s=2'",
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: (
            any(c.run(["ss", "-xH", "state", "connected", "src", "/run/flaskapp.sock"]).stdout.split())
            or slow.poll() is not None
        ),
        10,
        "the slow request to reach gunicorn",
    )
    r = reloader(c, "uninstall", "flaskapp")
    in_flight = slow.communicate(timeout=60)[0]
    assert r.returncode == 0, out(r)
    assert "flaskapp: uninstalled" in r.stdout
    # KillMode=control-group: systemd waits for the handed-over master to finish the request.
    assert in_flight == "200", f"the in-flight request got {in_flight!r}, not 200: stop was not graceful"
    for unit in (SERVICE, SOCKET):
        p = app.props(unit)
        assert (p["LoadState"], p["ActiveState"]) == ("not-found", "inactive"), f"{unit} after uninstall: {p}"
    assert not alive(c, flask_pid)
    for path in flask_manifest["files"]:
        if path != DROPIN:
            assert not exists(c, path), f"uninstall left {path}"
    assert not exists(c, MANIFEST)
    assert exists(c, DROPIN), "the nginx drop-in was removed while api still uses it"
    assert c.run("ls -A /etc/reloader").stdout.split() == ["api.gunicorn.conf.py", "api.pause_hook.py", "api.toml"]
    assert c.run("find /etc/systemd/system -name 'flaskapp.*'").stdout == ""
    assert c.run("ls -A /etc/nginx/conf.d").stdout.split() == ["api.conf"]
    assert app.props("nginx.service")["ActiveState"] == "active"
    assert app.get("/").status != 200 or "version" not in app.get("/").body
    assert api_version(c) == "api-v2" and main_pid(api, "api.service") == api_pid
    r = reloader(c, "status")
    assert r.returncode == 0 and r.stdout.startswith("api:") and "flaskapp" not in r.stdout, out(r)
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 1 and "not managed by reloader" in r.stderr, out(r)

    # Uninstall the last app: the drop-in goes too, nginx keeps running (back to its own ExecReload=).
    r = reloader(c, "uninstall", "api")
    assert r.returncode == 0, out(r)
    for unit in ("api.service", "api.socket"):
        assert app.props(unit)["LoadState"] == "not-found", unit
    for path in api_manifest["files"]:
        assert not exists(c, path), f"uninstall left {path}"
    assert not exists(c, "/etc/systemd/system/nginx.service.d")
    assert c.run("find /etc/reloader /var/lib/reloader -type f").stdout == ""
    assert c.run("find /etc/systemd/system -name 'api.*'").stdout == ""
    assert c.run("ls -A /etc/nginx/conf.d").stdout == ""
    assert app.props("nginx.service")["ActiveState"] == "active"
    drop_ins = c.run(["systemctl", "show", "-p", "DropInPaths", "--value", "nginx.service"]).stdout.strip()
    assert "reloader" not in drop_ins, drop_ins
    assert api_version(c) == "<000>"
    assert c.run(["systemctl", "reload", "nginx"], check=False).returncode == 0
    r = reloader(c, "status")
    assert r.returncode == 0 and "no apps managed by reloader" in r.stdout, out(r)
    r = reloader(c, "uninstall", "api")
    assert r.returncode == 1 and "not managed by reloader" in r.stderr, out(r)


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------


def test_errors_unknown_nonroot_bad_config_masked(app: appbed.App) -> None:
    c = app.c
    pid = main_pid(app)

    r = reloader(c, "deploy", "nosuch")
    assert r.returncode == 1, out(r)
    assert "nosuch is not managed by reloader" in r.stderr and "reloader install" in r.stderr, out(r)
    r = reloader(c, "status", "nosuch")
    assert r.returncode == 1 and "not managed by reloader" in r.stderr, out(r)

    # Not root: install/uninstall refuse up front (deploy as non-root: at the end of this test).
    app.ship("v2")
    r = reloader(c, "uninstall", "flaskapp", user="nobody")
    assert r.returncode == 1 and "root" in r.stderr, out(r)
    assert exists(c, MANIFEST) and app.props()["ActiveState"] == "active"
    r = reloader(c, "install", EXAMPLE, user="nobody")
    assert r.returncode == 1 and "root" in r.stderr, out(r)

    # A bad config: exit 2, exactly one line naming the key, nothing written, no user created.
    for body, key in (("workers = 0", "workers"), ("worker = 3", "worker")):
        c.write_file(
            "/root/bad.toml",
            '[app]\nname = "badapp"\nworking_directory = "/srv/flaskapp/current"\n'
            f'virtualenv = "/opt/venv"\nwsgi = "app:app"\n[gunicorn]\n{body}\n',
        )
        r = reloader(c, "install", "/root/bad.toml")
        assert r.returncode == 2, out(r)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"[gunicorn] {key}:" in lines[0] and "/root/bad.toml" in lines[0], out(r)
        assert r.stdout == "", out(r)
    assert "did you mean 'workers'?" in r.stderr, out(r)
    assert c.run("ls -A /etc/reloader /var/lib/reloader").stdout.split() == [
        "/etc/reloader:",
        "flaskapp.gunicorn.conf.py",
        "flaskapp.pause_hook.py",
        "flaskapp.toml",
        "/var/lib/reloader:",
        "flaskapp",  # the example's records of its releases (/var/lib/reloader/flaskapp)
        "flaskapp.json",
    ]
    assert c.run("find /etc/systemd/system /etc/nginx -name 'badapp*'").stdout == ""
    assert c.run(["getent", "passwd", "badapp"], check=False).returncode == 2

    # `systemctl mask --runtime` cannot mask a unit whose file is in /etc/systemd/system (/run/systemd/system
    # ranks below /etc), and a persistent `systemctl mask` refuses to replace the installed file: the unit
    # stays loaded and deployable. Pin that down, then mask it for real with a runtime symlink that does
    # outrank /etc (/run/systemd/system.control, the directory of `systemctl set-property --runtime`).
    c.run(["systemctl", "mask", "--runtime", SERVICE])
    c.run(["systemctl", "daemon-reload"])
    assert app.props()["LoadState"] == "loaded"
    r = c.run(["systemctl", "mask", SERVICE], check=False)
    assert r.returncode != 0 and "already exists" in r.stderr, out(r)
    c.run(["systemctl", "unmask", "--runtime", SERVICE])
    c.run(
        "mkdir -p /run/systemd/system.control && ln -s /dev/null /run/systemd/system.control/flaskapp.service"
        " && systemctl daemon-reload"
    )
    props = app.props()
    assert (props["LoadState"], props["ActiveState"]) == ("masked", "active"), props
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 1, out(r)
    assert f"{SERVICE} is masked; `systemctl unmask {SERVICE}` first" in r.stderr, out(r)
    assert main_pid(app) == pid and app.props()["ActiveState"] == "active" and app.version() == "v1"
    r = reloader(c, "status", "flaskapp", "--json")
    assert json.loads(r.stdout)["load_state"] == "masked", out(r)
    c.run("rm /run/systemd/system.control/flaskapp.service && systemctl daemon-reload")
    assert app.props()["LoadState"] == "loaded"
    # Not root: deploy is refused by systemd; the message must say what to do, nothing is reloaded.
    r = reloader(c, "deploy", "flaskapp", user="nobody")
    assert r.returncode == 1, out(r)
    assert "Traceback" not in r.stderr and re.search(r"permission", r.stderr, re.I), out(r)
    assert main_pid(app) == pid and app.version() == "v1"
    assert re.search(r"\broot\b|sudo|polkit", r.stderr), out(r)

    # Unmasked and as root, the same deploy goes through.
    r = reloader(c, "deploy", "flaskapp")
    assert r.returncode == 0, out(r)
    assert app.version() == "v2"


def test_install_refuses_a_first_start_that_cannot_import_and_quotes_a_failed_start(
        container: testbed.Container) -> None:
    """The first start is pre-flighted in the unit's sandbox: an import error is refused with its file and
    line before anything is written. An app that fails only under gunicorn passes that pre-flight; then
    install quotes the app's own exception from the journal, not systemd's bookkeeping."""
    a = appbed.App(container)
    c = container
    r = a.install(code="import time\ntime.sleep(1.5)\n" + appbed.IMPORT_ERROR, check=False)
    assert r.returncode == 1, out(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ModuleNotFoundError: No module named 'nosuchmodule' (app.py:3)" in lines[0], out(r)
    assert "sandbox" in lines[0], out(r)
    assert not exists(c, "/etc/systemd/system/flaskapp.service") and not exists(c, MANIFEST), "nothing written"
    assert a.get("/health", timeout=3).status != 200

    # Fails only once gunicorn imports it: the start fails, and install names the app's exception and line.
    a.ship("v1", extra="\nimport sys\nif 'gunicorn' in sys.modules:\n    raise RuntimeError('only under gunicorn')\n")
    r = reloader(c, "install", EXAMPLE, timeout=300)
    assert r.returncode == 1, out(r)
    lines = r.stderr.strip().splitlines()
    assert lines and "RuntimeError: only under gunicorn (app.py:" in lines[-1], out(r)
    assert "journalctl -u flaskapp.service" in lines[-1] and "Failed with result" not in r.stderr, out(r)
    # The files are installed (so the operator can fix the release and retry); nothing serves.
    assert exists(c, "/etc/systemd/system/flaskapp.service") and exists(c, MANIFEST)
    assert a.get("/health", timeout=3).status != 200
    # Fix the release and install again: it now starts and serves.
    a.ship("v2")
    c.run(["systemctl", "reset-failed", SERVICE], check=False)
    r = reloader(c, "install", EXAMPLE, timeout=300)
    assert r.returncode == 0, out(r) + a.journal()
    assert "pre-flight of the first start in flaskapp.service's sandbox: /health answered 200" in r.stdout, out(r)
    assert a.wait_version("v2", 30), a.journal()
    props = a.props()
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props


def test_check_verifies_units_and_nginx_site_on_the_target_host(app) -> None:
    """With the app's venv and the helper installed, every rendered unit verifies and nginx -t passes."""
    for example in ("flaskapp", "flaskapp-blue-green", "flaskapp-rolling"):
        r = app.c.run(["reloader", "check", f"/src/examples/{example}.toml"], check=False)
        assert r.returncode == 0, (example, r.stdout, r.stderr)
        assert "ok" in r.stdout and "not found" not in r.stderr, (example, r.stderr)
    app.c.write_file("/root/bad.toml", "[app]\nname = 'x'\nworking_directory = 'rel'\n")
    r = app.c.run(["reloader", "check", "/root/bad.toml"], check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_deploy_reports_no_bus_and_a_job_timeout_clearly(app) -> None:
    r = app.c.run(["reloader", "deploy", "flaskapp"], env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"},
                  check=False)
    assert r.returncode == 1 and "cannot connect to the systemd system bus" in r.stderr, r.stderr
    app.ship("v2", extra="\nimport time\ntime.sleep(6)\n")
    r = app.c.run(["reloader", "deploy", "flaskapp", "--timeout", "2"], check=False, timeout=120)
    assert r.returncode == 1 and "no result after 2 s" in r.stderr, r.stderr
    # The reload itself goes on and finishes; the unit is fine afterwards.
    assert app.wait_version("v2", timeout=60)
