"""Find why a process failed in what it printed, and say what fixes it.

A failed setup command or first start leaves the cause in the process's own output (a Python traceback's
last line and the app's frame above it), not in systemd's bookkeeping ("Failed with result 'exit-code'",
"Consumed 1.789s CPU time"). :class:`TracebackWatcher` reads output line by line and keeps the last
exception with the file and line of the innermost frame in the app's own code; :func:`unit_output` reads
what a unit's processes (only them) wrote to the journal since a given time; :func:`advice` turns the
sandbox's typical refusals (a read-only file system where the app writes next to its code) into the
setting that fixes them.
"""

from __future__ import annotations

import os
import re

from . import proc
from .config import AppConfig
from .run import run

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
#: A traceback's last line: "ModuleNotFoundError: No module named 'x'", "OSError: [Errno 30] …".
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Failed|Exit|Warning|Interrupt)):")
#: Prefixes the lines carry in reloader's and gunicorn's output.
_PREFIX = re.compile(r"^(setup: |\[[^]]*\] \[\d+\] \[[A-Z]+\] )")
_LIBRARY = ("site-packages", "dist-packages", "/usr/lib/python")


class TracebackWatcher:
    """Fed a process's output line by line; :meth:`cause` is its last exception, with the app's file:line."""

    def __init__(self, root: str = "") -> None:
        self.root = root.rstrip("/")
        self._frames: list[tuple[str, str]] = []
        self._cause = ""

    def feed(self, line: str) -> None:
        line = _PREFIX.sub("", line.rstrip())
        if line.startswith("Traceback (most recent call last)"):
            self._frames = []
            return
        frame = _FRAME.search(line)
        if frame and line.lstrip().startswith("File "):
            self._frames.append((frame.group(1), frame.group(2)))
            return
        if _EXCEPTION.match(line):
            text = " ".join(line.split())
            where = self._where()
            self._cause = f"{text} ({where})" if where and where not in text else text
            self._frames = []

    def _where(self) -> str:
        own = [f for f in self._frames if not any(lib in f[0] for lib in _LIBRARY)]
        if not (own or self._frames):
            return ""
        name, line = (own or self._frames)[-1]
        if self.root and name.startswith(self.root + "/"):
            name = os.path.relpath(name, self.root)
        return f"{name}:{line}"

    def cause(self) -> str:
        return self._cause


def cause_of(lines: list[str], root: str = "") -> str:
    watcher = TracebackWatcher(root)
    for line in lines:
        watcher.feed(line)
    return watcher.cause()


def unit_output(unit: str, since: float, *, wait: float = 3.0, until: str = "") -> list[str]:
    """What *unit*'s own processes wrote to the journal since *since* (epoch seconds): never systemd's
    lines about the unit (those come from PID 1, in init.scope). journald takes the lines from the
    process's stream asynchronously: wait up to *wait* seconds for a line containing *until* (or for
    any line, without it)."""
    lines: list[str] = []

    def enough() -> bool:
        r = run(["journalctl", f"_SYSTEMD_UNIT={unit}", f"--since=@{since:.0f}", "-o", "cat", "--no-pager",
                 "-n", "200"], check=False, timeout=30)
        lines[:] = [line for line in r.stdout.splitlines() if line.strip()]
        return any(until in line for line in lines) if until else bool(lines)

    try:
        proc.wait_for(enough, wait, interval=0.2)
    except Exception:  # noqa: BLE001 - no journalctl: the caller falls back to "see journalctl"
        return []
    return lines


def summarize(lines: list[str], app: AppConfig, root: str = "") -> str:
    """One line for an error message: reloader's own failure line if the process printed one (it already
    quotes the failing command's output), else the last exception with file:line, else the last lines."""
    own = [line for line in lines if line.startswith(f"reloader: {app.name}: ") and " failed" in line]
    if own:
        return own[-1][len("reloader: "):]
    cause = cause_of(lines, root)
    if cause:
        return cause
    return " | ".join(" ".join(line.split()) for line in lines[-3:])[-400:]


_WRITE_REFUSED = re.compile(r"\[Errno (30|13)\] (Read-only file system|Permission denied): '([^']+)'")


def advice(error: str, app: AppConfig, release_dir: str = "") -> str:
    """The setting that fixes a refusal the unit's sandbox causes, as a sentence to append ("" if none)."""
    m = _WRITE_REFUSED.search(error)
    if m:
        path = m.group(3)
        if not os.path.isabs(path) and release_dir:
            path = os.path.join(release_dir, path)
        logs = "log" in os.path.basename(path.rstrip("/")).lower()
        return (f"; the app writes {path}, but in its sandbox (ProtectSystem=strict) it may write only "
                f"/tmp, its state/cache/logs directories and read_write_paths: keep data under "
                f"$STATE_DIRECTORY ([app] state_directory = \"{app.name}\", e.g. DATABASE_URL="
                f"sqlite:////var/lib/{app.name}/app.db in [app] environment)"
                + (", log to stdout for the journal (e.g. LOG_TO_STDOUT = \"1\" in [app] environment) or "
                   f"to $LOGS_DIRECTORY ([app] logs_directory = \"{app.name}\")" if logs else "")
                + ", or add an existing directory to [app] read_write_paths; build steps that write into "
                "the release belong in [build] commands")
    if "ModuleNotFoundError" in error or "No module named" in error:
        return ("; install the app's requirements into its virtualenv "
                + (f"({app.virtualenv}/bin/pip install -r requirements.txt)" if app.virtualenv else "")
                ).rstrip(" ")
    return ""
