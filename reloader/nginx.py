"""A verified nginx reload, run as nginx.service's ``ExecReload=`` (from reloader's drop-in).

Plain ``nginx -s reload`` returns at once, before nginx has even parsed the new config. This runs
``nginx -t`` first (a bad config leaves nginx untouched and fails the reload with nginx's own error line),
then HUPs the master and returns only when new workers are up and the old ones have left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from . import proc
from .errors import Failed

NGINX = "/usr/sbin/nginx"


def test_config(nginx: str = NGINX) -> None:
    r = subprocess.run([nginx, "-t", "-q"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if "[emerg]" in ln or "[error]" in ln or "[crit]" in ln]
        raise Failed(f"nginx -t failed, nginx left untouched: {(lines or r.stderr.splitlines() or ['?'])[0]}")


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
