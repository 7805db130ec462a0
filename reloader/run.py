"""Every short-lived command reloader runs goes through :func:`run` (useradd, journalctl, ``nginx -t``,
``systemd-analyze verify``, the virtualenv check), as in mkosi: it logs the command (``reloader -v``) and
turns a failure into one :class:`~reloader.errors.Failed` line that names the command and its last words.

Two long-running children are not commands in this sense and keep their own ``Popen``: the pre-flight
(reloader.engine: killed as a process group at its deadline, extending systemd's timeout meanwhile) and the
setup commands (reloader.setup_commands: every output line streamed to the journal as it comes).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

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
