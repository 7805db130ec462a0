"""The layer every reload engine shares: how a refusal is reported, the pre-flight, the lock, the
readiness markers the gunicorn hooks write, and the health check on a socket.

The single-master engine (reloader.swap: strategies "generation" and "hup") and the multi-instance one
(reloader.fleet: "blue-green" and "rolling") are each a small state machine on top of this module; neither
imports the other.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import proc
from .config import AppConfig
from .proc import ProcessTable
from .run import spawn

#: Between two signals to one master: CPython runs a signal's handler once however often it arrived
#: before the handler ran, so two TTINs sent back to back can add a single worker.
SIGNAL_GAP = 0.1

#: How much more time to ask systemd for whenever we are still making progress.
EXTEND_USEC = 30_000_000


class Refused(Exception):
    """The reload did not happen (or was rolled back); the old generation is serving."""


def reason(e: BaseException) -> str:
    """A failure in one line (STATUS=, the records): a refusal's own words; any other error with its type
    (a D-Bus error, an OSError, a bug), whose traceback :meth:`Notifier.log_unexpected` puts in the journal."""
    return str(e) if isinstance(e, Refused) else f"unexpected {type(e).__name__}: {e}"


#: syslog priorities of the helper's journal lines (see :class:`Notifier`).
WARNING, NOTICE = 4, 5


def stderr_is_journal() -> bool:
    """stderr is a journald stream (systemd sets JOURNAL_STREAM=DEV:INODE of it for the processes it
    starts), so a ``<N>`` line prefix sets the line's priority instead of being printed."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class Notifier:
    """sd_notify + a journal line for every state change. A no-op outside systemd.

    The lines carry a syslog priority (``<5>``, ``<4>``: journald's SyslogLevelPrefix=): journald
    rate-limits a unit per priority class (journald-rate-limit.c: one budget for emerg..crit, one each
    for err, warning, notice+info, debug), and everything else the unit prints (gunicorn's error log,
    the app's own output) is info, the access log debug (see gunicorn.conf.py.j2). So a flood of those
    never suppresses a refusal's cause (warning, a budget only reloader uses) and the helper's step
    lines (notice) compete only with the app's own info output, never with the access log."""

    def __init__(self, name: str) -> None:
        import sdnotify

        self._n = sdnotify.SystemdNotifier()
        self.name = name
        self._last_extend = 0.0
        self._prefix = stderr_is_journal()

    def send(self, text: str) -> None:
        # sdnotify encodes as latin-1 and silently drops what does not fit (e.g. "→" or a non-ASCII
        # path): hand it UTF-8 bytes dressed as latin-1 text, which is what systemd expects on the wire.
        self._n.notify(text.encode("utf-8").decode("latin-1"))

    def log(self, text: str, priority: int = NOTICE) -> None:
        """One journal line (and nothing in STATUS=)."""
        prefix = f"<{priority}>" if self._prefix else ""
        print(f"{prefix}reloader: {self.name}: {text}", file=sys.stderr, flush=True)

    def status(self, text: str, priority: int = NOTICE) -> None:
        self.log(text, priority)
        self.send(f"STATUS={text}")

    def warn(self, text: str) -> None:
        """A refusal, rollback or failure: STATUS= and a journal line at priority warning."""
        self.status(text, WARNING)

    def log_unexpected(self, e: BaseException) -> None:
        """The traceback of a failure that is not a refusal, to the journal at priority warning."""
        for line in "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip().splitlines():
            self.log(line, WARNING)

    def barrier(self, timeout: float = 5.0) -> None:
        """Wait until systemd has processed what we sent (sd_notify_barrier): a notification from a
        process that exits right away may otherwise be dropped, as systemd can no longer tell which unit
        it came from (seen with ExecStartPost=)."""
        import array
        import select
        import socket

        path = os.environ.get("NOTIFY_SOCKET", "")
        if not path:
            return
        address = "\0" + path[1:] if path.startswith("@") else path
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))],
                           0, address)
            os.close(w)
            w = -1
            poller = select.poll()
            poller.register(r, select.POLLHUP)
            poller.poll(timeout * 1000)  # systemd closes its copy of w once it got here
        except OSError:
            pass
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def extend(self) -> None:
        """Keep systemd's TimeoutStartSec from expiring while a slow step is still progressing."""
        now = time.monotonic()
        if now - self._last_extend > 5:
            self._last_extend = now
            self.send(f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000



def preflight(app: AppConfig, n: Notifier, *, as_app_user: bool = False, release_dir: str = "",
              python: str = "") -> None:
    """Import the release and request its health path in a throwaway process; raise Refused if it fails.

    Run by the ExecReload= of the app's own unit it already has the unit's user, environment and sandbox;
    *as_app_user* drops from root to the app's user first (the blue-green/rolling controller runs as root).
    *release_dir* / *python*: the release and interpreter the caller resolved (default: the configured ones).
    """
    check = Preflight(app, n, as_app_user=as_app_user, release_dir=release_dir, python=python)
    proc.wait_for(check.done, math.inf, tick=n.extend)  # done() enforces preflight_timeout
    check.result()


class Preflight:
    """The pre-flight as a process running next to other work: the gated generation boots meanwhile.

    ``done()`` polls (and enforces ``preflight_timeout``), ``result()`` waits and raises :class:`Refused`
    with the pre-flight's reason, ``stop()`` kills it when the reload is refused for another reason."""

    def __init__(self, app: AppConfig, n: Notifier, *, as_app_user: bool = False, release_dir: str = "",
                 python: str = "") -> None:
        self.app, self.n = app, n
        release_dir = release_dir or app.working_directory
        python = python or app.python
        n.status(f"pre-flight: importing {app.wsgi} from {os.path.basename(os.path.realpath(release_dir))} and "
                 f"requesting {app.health_path}")
        script = Path(__file__).with_name("preflight.py")
        drop = {"user": app.user, "group": app.group, "extra_groups": []} if as_app_user else {}
        self.finished = 0.0  #: when its process ended (monotonic)
        self.timed_out = False
        self.output = ("", "")
        try:
            # communicate() in spawn's thread: the pipes are drained whatever the app prints while we poll.
            self.child = spawn([python, str(script), *preflight_args(app)], self._communicate,
                               timeout=app.preflight_timeout, cwd=release_dir, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **drop)
        except OSError as e:
            raise Refused(f"cannot run the pre-flight with {python}: {e.strerror}") from None
        self.p = self.child.p
        self.started, self.deadline = self.child.started, self.child.deadline
        self._verdict: Refused | None | bool = False  # False: not decided yet

    def _communicate(self, p: subprocess.Popen) -> None:
        self.output = p.communicate()
        self.finished = time.monotonic()

    def done(self) -> bool:
        if self.child.draining() and self.child.overdue():
            self.timed_out = True
            self.stop()
        return not self.child.draining()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.child.kill()
        self.child.join()

    def result(self) -> None:
        """Wait for the verdict; raise Refused if the release failed it (the same one every call)."""
        proc.wait_for(self.done, math.inf, tick=self.n.extend)  # done() enforces preflight_timeout
        if self._verdict is False:
            self._verdict = self._judge()
            if self._verdict is None:
                self.n.status(f"pre-flight passed: {self.app.health_path} answered {self._status}")
        if isinstance(self._verdict, Refused):
            raise Refused(str(self._verdict))

    def verdict(self) -> Refused | None:
        """After another step failed: the pre-flight's refusal, if it refused (its reason names the app's
        file and line, which "the new generation exited while booting" does not), else None."""
        try:
            self.result()
        except Refused as e:
            return e
        return None

    def _judge(self) -> Refused | None:
        app = self.app
        if self.timed_out:
            return Refused(f"pre-flight timed out after {app.preflight_timeout} s importing {app.wsgi} "
                           "(a hanging import? raise preflight_timeout if the app is just slow)")
        out, err = self.output
        result = last_json(out)
        if result is None:
            tail = " ".join((err or "").strip().splitlines()[-1:]) or f"exit status {self.p.returncode}"
            return Refused(f"pre-flight crashed: {tail}")
        if not result.get("ok"):
            return Refused(str(result.get("error")))
        self._status = result.get("status")
        return None


def preflight_args(app: AppConfig) -> list[str]:
    """preflight.py's command line: the app, its health path, and how production will call it."""
    low, high = app.health_status
    args = [app.wsgi, app.health_path, "--host", app.health_host, "--ok", f"{low}-{high}",
            "--timeout", str(app.preflight_timeout)]
    return args + (["--asgi"] if app.asgi else [])


def release_of(app: AppConfig) -> str:
    """The release the working directory points at (the basename of its resolved path)."""
    return os.path.basename(os.path.realpath(app.working_directory))


def ready_workers(ready_dir: Path, master: int, processes: ProcessTable = proc) -> set[int]:
    """Workers of *master* that have loaded the app (marked by the post_worker_init hook) and live."""
    try:
        names = os.listdir(ready_dir / str(master))
    except OSError:
        return set()
    pids = {int(n[7:]) for n in names if n.startswith("worker-") and n[7:].isdigit()}
    return {p for p in pids if processes.alive(p) and processes.ppid(p) == master}


def worker_exits(ready_dir: Path, master: int) -> set[int]:
    """Workers of *master* that have exited (recorded by the child_exit hook)."""
    try:
        names = os.listdir(ready_dir / str(master))
    except OSError:
        return set()
    return {int(n[5:]) for n in names if n.startswith("exit-") and n[5:].isdigit()}


@contextmanager
def exclusive(path: Path, timeout: float, n: Notifier, what: str) -> Iterator[None]:
    """Hold an flock on *path*, waiting up to *timeout* (telling systemd we are still alive meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if not proc.wait_for(lambda: try_lock(f), timeout, interval=0.2, tick=n.extend):
            raise Refused(f"another {what} of this app is still running")
        yield


def try_lock(f: object) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # type: ignore[arg-type]
        return True
    except BlockingIOError:
        return False



def health(app: AppConfig, timeout: float = 5.0, socket_path: str = "") -> tuple[int, str]:
    """GET the health path through the app's socket: (HTTP status, "") or (0, why there was no answer)."""
    from .probe import UnixHTTPConnection, get_status  # http.client: not on the way to the USR2

    return get_status(UnixHTTPConnection(socket_path or app.socket, timeout), app.health_path,
                      {"Host": app.health_host, "User-Agent": "reloader-bake", "X-Forwarded-Proto": "http",
                       "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"})


def last_json(text: str | None) -> dict | None:
    """The last line of *text* that is a JSON object: the pre-flight's verdict after whatever the app printed."""
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
