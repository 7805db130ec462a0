"""Prove the real-systemd test bed works before trusting any test built on it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import testbed

SITE = """\
server {
    listen 127.0.0.1:80 default_server;
    root /var/www/probe;
}
"""


def test_systemd_is_pid1(container: testbed.Container) -> None:
    assert container.run(["ps", "-p", "1", "-o", "comm="]).stdout.strip() == "systemd"
    exe = container.run(["readlink", "/proc/1/exe"]).stdout.strip()
    assert exe.endswith("/systemd"), exe


def test_system_is_running(container: testbed.Container) -> None:
    state = container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")


def test_dbus_via_pystemd(container: testbed.Container) -> None:
    out = container.run(
        [
            "python3",
            "-c",
            "from pystemd.systemd1 import Manager; m=Manager(); m.load(); print(m.Manager.Version)",
        ]
    ).stdout.strip()
    # pystemd returns bytes; accept both renderings.
    assert out.lstrip("b'\"").startswith("252"), out


def test_nginx_serves(container: testbed.Container) -> None:
    container.write_file("/var/www/probe/index.html", "hello from the bed\n")
    container.write_file("/etc/nginx/sites-enabled/probe", SITE)
    container.run(["systemctl", "restart", "nginx"])
    code = container.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1/"]).stdout
    assert code == "200"
    assert container.run(["curl", "-s", "http://127.0.0.1/"]).stdout == "hello from the bed\n"


def test_gunicorn_version(container: testbed.Container) -> None:
    out = container.run(["/opt/venv/bin/gunicorn", "--version"]).stdout
    assert "27.0.1" in out, out


def test_write_read_and_src_bind(container: testbed.Container) -> None:
    container.write_file("/tmp/x/probe.txt", "abc", mode=0o600)
    assert container.read_file("/tmp/x/probe.txt") == "abc"
    assert container.run("stat -c %a /tmp/x/probe.txt").stdout.strip() == "600"
    assert container.run(["test", "-f", "/src/tests/testbed.py"], check=False).returncode == 0


def test_boots_are_isolated(testbed_image: Path) -> None:
    with testbed.boot() as first:
        first.write_file("/etc/leak-probe", "x")
        assert first.run(["test", "-e", "/etc/leak-probe"], check=False).returncode == 0
    with testbed.boot() as second:
        assert second.run(["test", "-e", "/etc/leak-probe"], check=False).returncode == 1
    assert not (testbed_image / "etc/leak-probe").exists()


def test_stop_leaves_nothing_behind(testbed_image: Path) -> None:
    c = testbed.boot()
    proc = c._proc
    assert proc is not None
    pid1, tmpdir = c.pid1, c.tmpdir
    c.stop()
    c.stop()  # idempotent
    assert proc.poll() is not None
    assert not Path(f"/proc/{pid1}").exists()
    assert str(tmpdir) not in Path("/proc/mounts").read_text()
    assert not tmpdir.exists()
    assert all(not cg.exists() for cg in c.cgroups)


def test_trixie_has_newer_systemd(trixie_container: testbed.Container) -> None:
    first = trixie_container.run(["systemctl", "--version"]).stdout.splitlines()[0]
    assert int(first.split()[1]) >= 253, first
    state = trixie_container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")


def test_stop_with_background_process(testbed_image: Path) -> None:
    """A still-running popen() must not hang poweroff (nsenter/SIGSTOP trap)."""
    c = testbed.boot()
    bg = c.popen(["sleep", "300"])
    time.sleep(0.3)
    t0 = time.monotonic()
    c.stop()
    assert time.monotonic() - t0 < 10
    assert bg.poll() is not None
    assert c._proc is not None and c._proc.poll() is not None
    assert not c.tmpdir.exists()


def test_popen_output(container: testbed.Container) -> None:
    p = container.popen("sleep 0.2; echo bg-done", stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    assert out == "bg-done\n"
