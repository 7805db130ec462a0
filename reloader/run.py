"""Every short-lived command reloader runs goes through :func:`run` (useradd, journalctl, ``nginx -t``,
``systemd-analyze verify``, the virtualenv check), as in mkosi: it logs the command (``reloader -v``) and
turns a failure into one :class:`~reloader.errors.Failed` line that names the command and its last words.

Two long-running children are not commands in this sense: the pre-flight (reloader.engine: polled while the
new generation boots, extending systemd's timeout meanwhile) and the setup commands (reloader.setup_commands:
every output line streamed to the journal as it comes). Both start through :func:`spawn`: their own session,
their output drained by a thread whatever they print, a deadline, and killed as a process group.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import Failed

log = logging.getLogger("reloader")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float | None = None, cwd: str | None = None,
        what: str = "") -> subprocess.CompletedProcess[str]:
    """Run *cmd* to completion, capturing its output as text.

    A command that cannot start or overruns *timeout* is always :class:`Failed`; one that exits non-zero
    only with *check* (without it the caller reads the exit status and the output itself, e.g. to list
    every problem ``nginx -t`` found). *what* names the command in the error (default: its first word)."""
    line = shlex.join(cmd)
    log.debug("+ %s", line)
    what = what or cmd[0]
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout, cwd=cwd,
                           check=False)
    except OSError as e:
        raise Failed(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise Failed(f"{what}: {line} did not finish within {timeout:g} s") from None
    if check and r.returncode != 0:
        raise Failed(f"{what} failed (exit status {r.returncode}): {last_line(r.stderr or r.stdout) or line}")
    return r


def last_line(text: str) -> str:
    """The last non-empty line of a command's output: usually the one that says why."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Spawned:
    """A long-running child started by :func:`spawn`. ``p`` is its ``Popen``; ``started`` (after it started)
    and ``deadline`` are monotonic times."""

    def __init__(self, p: subprocess.Popen, drain: Callable[[subprocess.Popen], None], deadline: float | None,
                 timeout: float | None) -> None:
        self.p = p
        self.started = time.monotonic()
        self.deadline = deadline if deadline is not None else self.started + (timeout or 0.0)
        self._reader = threading.Thread(target=drain, args=(p,), daemon=True)
        self._reader.start()

    def draining(self) -> bool:
        """Its output is still open (the child, or one it left behind, still runs)."""
        return self._reader.is_alive()

    def overdue(self) -> bool:
        return time.monotonic() >= self.deadline

    def kill(self) -> None:
        """SIGKILL its process group (everything it started in its session), or, without the right to (no
        CAP_KILL over a child running as another user), at least the process itself."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except PermissionError:
            self.p.kill()
        except ProcessLookupError:
            pass

    def join(self, timeout: float | None = None) -> None:
        """Wait until its output was drained (at most *timeout* seconds)."""
        self._reader.join(timeout)


def spawn(cmd: Sequence[str], drain: Callable[[subprocess.Popen], None], *, timeout: float | None = None,
          deadline: float | None = None, **popen: Any) -> Spawned:
    """Start *cmd* in a session of its own and *drain* its pipes in a thread (``drain(p)`` reads them until
    they close), within *timeout* seconds from its start or by the monotonic *deadline*. The caller polls
    (``draining()``, ``overdue()``) and decides: ``kill()`` ends the whole group. *popen*: ``Popen``'s own
    arguments (cwd, env, the pipes, text, user, …). An ``OSError`` (cannot start) is the caller's to word."""
    if (timeout is None) == (deadline is None):
        raise ValueError("spawn: give a timeout or a deadline")
    p = subprocess.Popen(list(cmd), start_new_session=True, **popen)
    return Spawned(p, drain, deadline, timeout)
