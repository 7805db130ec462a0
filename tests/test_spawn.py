"""reloader.run.spawn, the one start of the long-running children (the pre-flight, the setup commands):
their output drained whatever they print, a deadline, and a kill that takes their whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reloader.proc import wait_for
from reloader.run import spawn


def collect(into: list[str]):
    def drain(p: subprocess.Popen) -> None:
        into.extend(p.communicate()[0].splitlines())
    return drain


def test_the_output_is_drained_and_the_child_runs_in_its_own_session():
    lines: list[str] = []
    # More than a pipe's buffer: a child nobody reads from would block on it.
    code = "import os; print(os.getsid(0)); print('x' * 200_000); print('end')"
    child = spawn([sys.executable, "-c", code], collect(lines), timeout=60, stdout=subprocess.PIPE, text=True)
    assert wait_for(lambda: not child.draining(), 30)
    child.join()
    assert child.p.returncode == 0 and lines[-1] == "end"
    assert int(lines[0]) == child.p.pid != os.getsid(0)  # its own session: its pid is the session's id
    assert not child.overdue()


def test_kill_takes_the_whole_group_at_the_deadline():
    lines: list[str] = []
    # The child starts a grandchild that would outlive it; both hold the output pipe open.
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(300)']); print(g.pid, flush=True); time.sleep(300)")
    child = spawn([sys.executable, "-c", code], collect(lines), deadline=time.monotonic() + 0.5,
                  stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(child.overdue, 30)
        assert child.draining(), "the child runs until it is killed"
        child.kill()
        child.join(30)
        assert not child.draining() and child.p.wait(30) == -9
        grandchild = int(lines[0])
        assert wait_for(lambda: gone(grandchild), 30), f"grandchild {grandchild} survived the kill"
    finally:  # whatever failed: nothing of this test keeps running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.p.pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    """Dead: no longer in /proc, or a zombie its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_timeout_or_a_deadline_not_both():
    with pytest.raises(ValueError):
        spawn(["true"], collect([]), timeout=1, deadline=time.monotonic() + 1)
    with pytest.raises(ValueError):
        spawn(["true"], collect([]))
