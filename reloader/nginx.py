"""A verified nginx reload, run as nginx.service's ``ExecReload=`` (from reloader's drop-in).

Plain ``nginx -s reload`` returns at once, before nginx has even parsed the new config. This runs
``nginx -t`` first (a bad config leaves nginx untouched and fails the reload with nginx's own error line),
then HUPs the master and returns only when new workers are up and the old ones have left.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

from . import proc
from .errors import Failed
from .run import run

NGINX = "/usr/sbin/nginx"


def problems(conf: str = "", nginx: str = NGINX) -> list[str]:
    """``nginx -t`` of the running configuration (or of the main config file *conf*): what is wrong with it,
    one line each, nginx's own words; empty when it passes. The only place nginx -t's output is read."""
    r = run([nginx, "-t", "-q", *(["-c", conf] if conf else [])], check=False, what="nginx -t")
    if r.returncode == 0:
        return []
    lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
    return [ln for ln in lines if "[emerg]" in ln or "[error]" in ln or "[crit]" in ln] or lines or [
        f"exit status {r.returncode}"]


def test_config(nginx: str = NGINX) -> None:
    """The running configuration passes ``nginx -t``, or :class:`Failed` with nginx's first complaint."""
    found = problems(nginx=nginx)
    if found:
        raise Failed(f"nginx -t failed, nginx left untouched: {found[0]}")


def test_site(site: Path) -> list[str]:
    """``nginx -t`` a minimal main config that includes only *site*, so other sites can't mask errors
    (``reloader check`` on a host whose nginx may not even have the app's site)."""
    conf = site.parent / "nginx-test.conf"
    conf.write_text(
        "pid " + str(site.parent / "nginx.pid") + ";\n"
        "error_log stderr;\n"
        "events {}\n"
        "http {\n"
        "  include /etc/nginx/mime.types;\n"
        f"  include {site};\n"
        "}\n"
    )
    return problems(str(conf), shutil.which("nginx") or NGINX)


def reload(master: int, *, timeout: float = 60, nginx: str = NGINX) -> tuple[int, int]:
    """Test, HUP *master*, and wait for the worker generation to turn over. Returns (old, new) counts."""
    if not proc.alive(master):
        raise Failed(f"nginx master {master} is not running")
    test_config(nginx)
    old = set(proc.children(master))
    proc.send(master, signal.SIGHUP)

    def new_workers() -> set[int]:
        return set(proc.children(master)) - old

    # nginx starts as many workers as before unless worker_processes changed: wait for at least one
    # new worker and for every old one to exit (they finish their in-flight requests first).
    if not proc.wait_for(lambda: bool(new_workers()), timeout):
        raise Failed(f"nginx master {master} started no new workers within {timeout:.0f} s "
                     "(see journalctl -u nginx)")
    if not proc.wait_for(lambda: not any(proc.alive(p) and proc.ppid(p) == master for p in old), timeout):
        left = [p for p in old if proc.alive(p)]
        raise Failed(f"old nginx workers {left} still running after {timeout:.0f} s (long requests?)")
    return len(old), len(new_workers())


def main_pid_from_env() -> int:
    try:
        return int(os.environ.get("MAINPID", "0"))
    except ValueError:
        return 0


def exec_reload() -> int:
    master = main_pid_from_env() or _pid_from_file("/run/nginx.pid")
    old, new = reload(master)
    print(f"reloader: nginx reloaded: {old} old workers retired, {new} new workers serving", file=sys.stderr)
    return 0


def _pid_from_file(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        raise Failed(f"nginx is not running (no MAINPID and no {path})") from None
