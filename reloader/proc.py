"""Small, read-mostly views of /proc, and the one place reloader signals processes.

reloader never finds a process by name: it starts from the MainPID systemd names (``$MAINPID`` of the unit
whose hook is running, or over D-Bus) and walks parent/child links from there. What it signals is that
MainPID (an app's gunicorn master, or nginx's master from nginx.service's ``ExecReload=``), the masters
that MainPID forked (a new generation), and a parent of it only after :func:`same_unit` showed that it is
in the same cgroup, i.e. of the same unit (an old master an interrupted reload left behind).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces and parentheses, so
    it is cut at the last ")"): [0] the state, [1] the parent, [19] the start time. OSError if gone."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        stat = _stat(pid)
    except OSError:
        return False
    return stat[0] != "Z"


def ppid(pid: int) -> int:
    try:
        return int(_stat(pid)[1])
    except (OSError, IndexError, ValueError):
        return 0


def rss(pid: int) -> int:
    """Resident memory of *pid* in bytes (VmRSS, what uWSGI's reload-on-rss and ``ps`` call RSS); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def start_time(pid: int) -> int:
    """When *pid* started (clock ticks since boot): the order gunicorn gives its workers' ages."""
    try:
        return int(_stat(pid)[19])
    except (OSError, ValueError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    """Live direct children of *pid* (a scan of /proc: needs no CONFIG_PROC_CHILDREN)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and ppid(int(entry.name)) == pid and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def cgroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def same_unit(pid: int, other: int) -> bool:
    """Both processes are in the same cgroup, i.e. the same systemd unit."""
    a, b = cgroup(pid), cgroup(other)
    return bool(a) and a == b


def send(pid: int, sig: signal.Signals) -> bool:
    """Signal *pid*; False if it is already gone (most callers then wait for a condition anyway)."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
             tick: Callable[[], None] | None = None) -> bool:
    """Poll *condition* until it holds or *timeout* passes; *tick* runs between polls (e.g. notify)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        if tick:
            tick()
        time.sleep(interval)


class ProcessTable(Protocol):
    """What the reload engines use of this module. This module is the real one; the host tests of the
    engines pass a simulated process table (tests/fakes.py) with the same functions."""

    def alive(self, pid: int) -> bool: ...
    def ppid(self, pid: int) -> int: ...
    def children(self, pid: int) -> list[int]: ...
    def same_unit(self, pid: int, other: int) -> bool: ...
    def send(self, pid: int, sig: signal.Signals) -> bool: ...
    def wait_for(self, condition: Callable[[], bool], timeout: float, interval: float = 0.05,
                 tick: Callable[[], None] | None = None) -> bool: ...
