"""Run an app's ``[setup]`` commands (migrations, collectstatic, …) against the release being deployed.

Called in two places, both already running as the app's user, in its sandbox and environment: the
service's ``ExecReload=`` (just before the pre-flight, so a failing migration refuses the deploy while the
old generation serves untouched) and the ``NAME-setup.service`` oneshot that ``reloader install`` starts
before the first start. The release directory is an explicit argument: the caller decides which release
it deploys, this module only runs commands in it.
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

from .causes import TracebackWatcher
from .config import AppConfig
from .run import spawn

#: Output lines kept for the one-line failure (STATUS= and the error); the journal gets all of them.
TAIL_LINES = 3


class SetupFailed(Exception):
    """A setup command failed or timed out; the message names it and ends with its output's tail."""


def environment(app: AppConfig) -> dict[str, str]:
    """The caller's environment (the unit's) with the app's virtualenv first on PATH, as if activated."""
    env = dict(os.environ)
    env["PATH"] = f"{app.bin_dir}:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"
    if app.virtualenv:
        env["VIRTUAL_ENV"] = app.virtualenv
    return env


def by_hand(app: AppConfig, config: str, release_dir: str, *, after_switch: bool) -> int:
    """``reloader setup CONFIG`` typed by an operator: the commands must run as the service runs them, as
    the app's user in its sandbox and environment (``[app] environment``, ``environment_file``), not as
    root with the operator's environment (a migration would reach another database, or leave root-owned
    files). As root they run in a transient unit with the service's identity and sandbox
    (reloader.firststart), which runs this command again inside; already as the app's user they run here.
    The after_switch outcome is recorded for ``reloader status`` either way. Returns the exit status;
    raises :class:`SetupFailed` for a command that failed here."""
    from . import after_switch as contract
    from . import firststart

    started, error = time.time(), "not finished"
    try:
        if os.geteuid() != 0 or app.user == "root":
            run(app, release_dir, lambda text: print(f"reloader: {app.name}: {text}", file=sys.stderr, flush=True),
                after_switch=after_switch)
            error = ""
            return 0
        if why := firststart.unavailable(app):
            raise SetupFailed(f"cannot run the commands as {app.user} in {app.service}'s sandbox: {why}")
        argv = [app.helper, "setup", os.path.abspath(config), "--release", release_dir]
        argv += ["--after-switch"] if after_switch else []
        cmd = firststart.command(app, argv, what="setup", seconds=app.setup.timeout + 30,
                                 description=f"{app.name}'s setup commands, run by hand")
        last = ""
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr or ():
                sys.stderr.write(line)
                last = line.strip() or last
        error = (last or f"exit status {proc.returncode}") if proc.returncode else ""
        return proc.returncode
    except SetupFailed as e:
        error = str(e)
        raise
    finally:
        if after_switch:
            contract.record(app, release_dir, error, started)


def run(app: AppConfig, release_dir: str, status: Callable[[str], None],
        tick: Callable[[], None] = lambda: None, *, after_switch: bool = False) -> None:
    """Run every command in *release_dir*, in order, within ``[setup] timeout`` in total.

    *status* reports progress (STATUS= and the journal); *tick* is called about once a second while a
    command runs (to extend systemd's timeout). Raises :class:`SetupFailed` at the first failure.
    *after_switch*: the ``[setup] after_switch`` commands instead (reloader.after_switch)."""
    deadline = time.monotonic() + app.setup.timeout
    env = environment(app)
    what = "after_switch" if after_switch else "setup"
    for words in app.setup.after_switch if after_switch else app.setup.commands:
        line = shlex.join(words)
        status(f"{what}: running {line} in {release_dir}")
        tail = _run_one(words, line, release_dir, env, deadline, app.setup.timeout, tick, what)
        status(f"{what}: {line} done" + (f" ({tail})" if tail else ""))


def _run_one(words: tuple[str, ...], line: str, cwd: str, env: dict[str, str], deadline: float, budget: int,
             tick: Callable[[], None], what: str = "setup") -> str:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    # The last exception with the app's file:line: a CLI that cannot import the app (flask's "Error: No
    # such command 'db'") names only its own usage in the last lines.
    watcher = TracebackWatcher(cwd)
    exception = [""]

    def pump(p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for out in p.stdout:
            out = out.rstrip()
            print(f"{what}: {out}", file=sys.stderr, flush=True)  # the journal gets every line
            if out.strip():
                tail.append(" ".join(out.split()))
                watcher.feed(out)
                exception[0] = watcher.cause()

    try:
        child = spawn(words, pump, deadline=deadline, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as e:
        raise SetupFailed(f"{what} command {line!r} could not start: {e.strerror} ({words[0]})") from None
    p = child.p
    while True:
        try:
            p.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if child.overdue():
                child.kill()
                p.wait()
                child.join(5)
                raise SetupFailed(f"{what} command {line!r} timed out ([setup] timeout = {budget} s)"
                                  + _tail(tail, exception[0])) from None
            tick()
    child.join(5)
    if p.returncode != 0:
        raise SetupFailed(f"{what} command {line!r} failed with exit status {p.returncode}"
                          + _tail(tail, exception[0]))
    return " | ".join(tail)[-200:]


def _tail(lines: collections.deque[str], exception: str) -> str:
    """The last lines, led by the last Python exception with the app's file:line (a CLI that prints its
    usage after a traceback, like flask's, would otherwise hide the cause), which is never cut off."""
    if not exception:
        text = " | ".join(lines)
        return f": {text[-400:]}" if text else ""
    rest = " | ".join(line for line in lines if not exception.startswith(line))
    return f": {exception}" + (f" | {rest}"[:max(0, 400 - len(exception))] if rest else "")
