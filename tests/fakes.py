"""Stand-ins for what the engines and the rendered gunicorn config touch on a real host, so their logic runs
in milliseconds in the test process (tests/test_engine_faults.py, tests/test_render.py).

- :func:`in_tmp`: an app whose runtime and state directories (ready markers, pidfiles, records, routes) are
  under a test's tmp dir.
- :func:`run_gunicorn_config`: executes a rendered gunicorn config and proves it wrote nothing outside
  a tmp dir (and puts back the environment and sys.path it changes).
- :class:`ProcessTable`, :class:`FakeNotifier`, :class:`FakeBus`, :class:`FakeSystemd`: the process table
  (reloader.proc), sd_notify and the systemd bus of the engines, scripted by the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reloader.config import AppConfig


# --- an app laid out under a tmp dir ------------------------------------------------------------------
def in_tmp(app: AppConfig, root: Path) -> AppConfig:
    """*app* with its runtime directory (/run/NAME: pidfiles, ready markers, locks, boot request) at
    ROOT/run and its state directory (/var/lib/reloader/NAME: records, routes, instance links) at ROOT/state.
    Every other derived path follows from those two."""
    run, state = str(root / "run"), str(root / "state")

    class InTmp(type(app)):  # type: ignore[misc,valid-type]
        runtime_dir = property(lambda self: run)
        state_dir = property(lambda self: state)

        def instance_runtime_dir(self, instance: str) -> str:
            return f"{run}-{instance}"

    return InTmp(**{f.name: getattr(app, f.name) for f in dataclasses.fields(app)})


# --- the rendered gunicorn config, executed without side effects ---------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: Audit events (sys.addaudithook) that change the file system: event -> (indexes of the paths in its
#: arguments, index of the dir_fd they are relative to or None).
_FS_EVENTS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "os.mkdir": ((0,), 2), "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.rename": ((0, 1), 2),
    "os.symlink": ((1,), 2), "os.link": ((1,), 3), "os.chmod": ((0,), 2), "os.chown": ((0,), 3),
    "os.truncate": ((0,), None), "os.utime": ((0,), 3), "shutil.rmtree": ((0,), 1)}
_recording: list[str] | None = None


def two_releases(root: Path) -> tuple[Path, str, str]:
    """A release tree under *root*/srv: releases 1 and 2, a virtualenv directory, ``current`` -> 2.
    Returns (srv, release 1, release 2)."""
    srv = root / "srv"
    for release in ("1", "2"):
        (srv / "releases" / release).mkdir(parents=True)
    (srv / "venv").mkdir()
    (srv / "current").symlink_to(srv / "releases" / "2")
    return srv, str(srv / "releases" / "1"), str(srv / "releases" / "2")


def _absolute(path: Any, dir_fd: Any) -> str:
    """*path* as an absolute path (shutil.rmtree, for one, removes names relative to a directory's fd)."""
    path = os.fsdecode(path)
    if os.path.isabs(path):
        return path
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    return os.path.join(base, path)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writes and not isinstance(path, int):
            _recording.append(_absolute(path, None))
    elif event in _FS_EVENTS:
        paths, fd = _FS_EVENTS[event]
        dir_fd = args[fd] if fd is not None and fd < len(args) else None
        _recording.extend(_absolute(args[i], dir_fd) for i in paths if not isinstance(args[i], int))
    elif event == "os.exec":
        _recording.append(f"exec {args[0]}")


sys.addaudithook(_audit)  # inert until writes_recorded() records


@contextmanager
def writes_recorded() -> Iterator[list[str]]:
    """Every path the code in the block creates, writes, renames, removes or chmods (and any exec)."""
    global _recording
    _recording = found = []
    try:
        yield found
    finally:
        _recording = None


@contextmanager
def confined_to(root: Path) -> Iterator[None]:
    """Fail if the block writes anywhere outside *root*; put back os.environ and sys.path as they were."""
    environ, path = dict(os.environ), list(sys.path)
    try:
        with writes_recorded() as writes:
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
    outside = [w for w in writes if os.path.commonpath([os.path.abspath(w), root]) != str(root)]
    assert not outside, f"wrote outside {root}: {outside}"


def run_gunicorn_config(source: str, root: Path) -> dict[str, Any]:
    """Execute a rendered gunicorn config as gunicorn would (its module level only), confined to *root*
    (render it from :func:`in_tmp`'s app, whose paths are there); returns its namespace."""
    code = compile(source, "gunicorn.conf.py", "exec")  # a SyntaxError fails the test
    namespace: dict[str, Any] = {}
    with confined_to(root):
        os.environ.pop("RELOADER_READY_DIR", None)  # the rendered default (under root) applies
        os.environ.pop("RELOADER_MASTER", None)
        exec(code, namespace)
    return namespace


# --- the process table: gunicorn masters and workers, simulated -------------------------------------------
FIRST_PID = 9_000_001  #: above any real pid (pid_max is at most 2**22): /proc never knows a fake one


class DBusError(Exception):
    """What pystemd raises when a call on the bus fails (a stand-in: any exception that is not Refused)."""


@dataclasses.dataclass
class Process:
    pid: int
    ppid: int
    master: bool
    state: str = "booting"  #: booting, running (a worker: ready), zombie, reaped
    pending: list[int] = dataclasses.field(default_factory=list)  #: signals not handled yet
    cgroup: str = "app.service"
    workers: int = 0  #: a master: how many workers it keeps
    gated: bool = False  #: a master: its workers wait for gate-open before they accept
    ready_at: float = 0.0  #: a worker: when it has loaded the app
    replaced: bool = False  #: a worker started by a HUP (the new code)
    marks: Path = Path("/nonexistent")  #: a master: its ready-marker directory (ready_dir/PID)
    gate_seen_at: float | None = None  #: a gated master: when its gate-open marker first existed
    heir_of: int = 0  #: a USR2 new master not promoted yet: the old master (GUNICORN_PID), 0 once promoted


class ProcessTable:
    """Gunicorn masters and workers of one app as reloader.proc sees them, driven by a fake clock.

    What it models of gunicorn (and the gunicorn config's hooks, which write the real ready markers in the
    app's ready dir under tmp): USR2 forks a child whose pre_exec forks the new master, writes its
    ready/NEW/heir-of (the old master's pid) and exits (the config's _detach): the new master is PID 1's
    child, the old one reaps the intermediate when it handles that SIGCHLD. The new master reads the
    helper's boot request, writes gunicorn.pid.2 and its master marker and boots its workers (each marks
    worker-PID once it has loaded the app, after *boot_seconds*); TTIN/TTOU add a worker / retire the
    oldest; HUP replaces the workers; TERM/QUIT stop a master and its workers; a new master promotes itself
    (pidfile, heir-of removed) once the old master is gone (reaped). With *detach* False (a failed fork in
    pre_exec, or a config from before it) the new master stays the old one's child and promotes itself
    once its parent is gone. A master handles the signals pending since it last ran in signal-number
    order, as CPython runs signal handlers; it ignores USR2 while it has a child master it has not reaped
    ("Child exists"), and reaps a dead child only when it handles that SIGCHLD. Time passes only in
    :meth:`wait_for` (and :meth:`advance`).

    Faults (attributes a test sets): *never_ready* (workers of new masters never load the app),
    *master_dies_at* (a new master exits when the clock passes that time), *usr2_ignored* (the old master
    does not fork), *on_send* (called with (pid, sig) before each signal: may raise).
    """

    def __init__(self, app: AppConfig, *, workers: int | None = None, boot_seconds: float = 0.3) -> None:
        self.app = app
        self.clock = 0.0
        self.boot_seconds = boot_seconds
        self.procs: dict[int, Process] = {}
        self.next_pid = FIRST_PID
        self.log: list[tuple[float, int, str]] = []  #: (time, pid, what): signals and exits, for assertions
        self.never_ready = False
        self.master_dies_at: float | None = None
        self.usr2_ignored = False
        self.on_send: Callable[[int, signal.Signals], None] | None = None
        self.gate_blocked = False  #: a new master's gate-open cannot be written (an OSError at the gate)
        self.detach = True  #: pre_exec's double fork: a new master is PID 1's child, not the old master's
        self.ready_dir = Path(app.ready_dir)
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.systemd = Process(pid=1, ppid=0, master=False, state="running", cgroup="init.scope")
        self.procs[1] = self.systemd
        self.main = self.start_master(parent=1, workers=workers or app.workers)
        self.advance(boot_seconds + 0.1)
        Path(app.pidfile).write_text(f"{self.main}\n")

    # --- reloader.proc's functions ------------------------------------------------------------------
    def alive(self, pid: int) -> bool:
        p = self.procs.get(pid)
        return p is not None and p.state in ("booting", "running")

    def ppid(self, pid: int) -> int:
        p = self.procs.get(pid)
        return p.ppid if p is not None and p.state != "reaped" else 0

    def children(self, pid: int) -> list[int]:
        return sorted(p.pid for p in self.procs.values() if p.ppid == pid and self.alive(p.pid))

    def same_unit(self, pid: int, other: int) -> bool:
        a, b = self.procs.get(pid), self.procs.get(other)
        return a is not None and b is not None and a.cgroup == b.cgroup

    def send(self, pid: int, sig: signal.Signals) -> bool:
        if self.on_send:
            self.on_send(pid, sig)
        self.log.append((self.clock, pid, sig.name))
        if not self.alive(pid):
            return False
        self.procs[pid].pending.append(sig)
        return True

    def wait_for(self, condition: Callable[[], bool], timeout: float, interval: float = 0.05,
                 tick: Callable[[], None] | None = None) -> bool:
        deadline = self.clock + timeout
        while True:
            if condition():
                return True
            if self.clock >= deadline:
                return False
            if tick:
                tick()
            self.advance(interval)

    # --- what tests look at ------------------------------------------------------------------------------
    def masters(self) -> list[int]:
        """The masters alive now (the unit's serving generations)."""
        return sorted(p.pid for p in self.procs.values() if p.master and self.alive(p.pid))

    def workers_of(self, master: int) -> list[int]:
        return sorted(p.pid for p in self.procs.values() if p.ppid == master and not p.master and self.alive(p.pid))

    def ready_workers_of(self, master: int) -> list[int]:
        return [w for w in self.workers_of(master) if self.procs[w].state == "running"]

    # --- the simulation -------------------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Let *seconds* pass: every process runs once (in pid order) at the end of it."""
        self.clock += seconds
        if self.master_dies_at is not None and self.clock >= self.master_dies_at:
            self.master_dies_at = None
            newest = max((p for p in self.masters() if p != self.main), default=0)
            if newest:
                self.exit(newest)
        for pid in sorted(self.procs):
            p = self.procs[pid]
            if not self.alive(pid) or pid == 1:
                continue
            if p.master:
                self.run_master(p)
            else:
                self.run_worker(p)

    def spawn(self, parent: int, *, master: bool, **fields: Any) -> Process:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        p = Process(pid=pid, ppid=parent, master=master, **fields)
        self.procs[pid] = p
        return p

    def start_master(self, parent: int, workers: int, gated: bool = False, ready_dir: Path | None = None) -> int:
        p = self.spawn(parent, master=True, workers=workers, gated=gated, state="running")
        p.marks = (ready_dir or self.ready_dir) / str(p.pid)
        p.marks.mkdir(parents=True, exist_ok=True)
        (p.marks / "master").write_text(str(p.pid))  # when_ready
        for _ in range(workers):
            self.start_worker(p)
        return p.pid

    def start_worker(self, master: Process, replaced: bool = False) -> None:
        self.spawn(master.pid, master=False, ready_at=self.clock + self.boot_seconds, replaced=replaced)

    def run_worker(self, w: Process) -> None:
        if w.pending and any(s in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT) for s in w.pending):
            self.exit(w.pid)
            return
        w.pending.clear()
        master = self.procs[w.ppid]
        if not master.master or not self.alive(master.pid):
            self.exit(w.pid)  # gunicorn's workers leave when their master is gone
            return
        new_code = w.ppid != self.main or w.replaced
        if w.state == "booting" and self.clock >= w.ready_at and not (self.never_ready and new_code):
            w.state = "running"
            (master.marks / f"worker-{w.pid}").write_text(str(w.pid))  # post_worker_init

    def run_master(self, m: Process) -> None:
        if m.heir_of and self.procs[m.heir_of].state == "reaped":  # maybe_promote_master (the config's)
            m.heir_of = 0
            (m.marks / "heir-of").unlink(missing_ok=True)
            if Path(self.app.new_pidfile).exists() and _read(self.app.new_pidfile) == m.pid:
                os.replace(self.app.new_pidfile, self.app.pidfile)
        if m.ppid != 1 and not self.alive(m.ppid):  # not detached: gunicorn promotes when its parent is gone
            m.ppid = 1
            m.cgroup = "app.service"
            if Path(self.app.new_pidfile).exists() and _read(self.app.new_pidfile) == m.pid:
                os.replace(self.app.new_pidfile, self.app.pidfile)
        if m.gated and m.gate_seen_at is None and (m.marks / "gate-open").is_file():
            m.gate_seen_at = self.clock
        pending, m.pending = sorted(m.pending), []
        for sig in pending:
            if not self.alive(m.pid):
                return
            if sig == signal.SIGCHLD:
                for child in [p for p in self.procs.values() if p.ppid == m.pid and p.state == "zombie"]:
                    child.state = "reaped"
            elif sig == signal.SIGUSR2:
                self.usr2(m)
            elif sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
                self.exit(m.pid)
            elif sig == signal.SIGTTIN:
                m.workers += 1
            elif sig == signal.SIGTTOU:
                m.workers = max(1, m.workers - 1)
                oldest = self.workers_of(m.pid)
                if len(oldest) > m.workers:
                    self.procs[oldest[0]].pending.append(signal.SIGTERM)
            elif sig == signal.SIGHUP:
                for w in self.workers_of(m.pid):
                    self.procs[w].pending.append(signal.SIGTERM)
                for _ in range(m.workers):
                    self.start_worker(m, replaced=True)
        if self.alive(m.pid):  # manage_workers
            staying = [w for w in self.workers_of(m.pid) if signal.SIGTERM not in self.procs[w].pending]
            missing = m.workers - len(staying)
            for _ in range(max(0, missing)):
                self.start_worker(m)

    def usr2(self, m: Process) -> None:
        children = [p for p in self.procs.values() if p.ppid == m.pid and p.master and p.state != "reaped"]
        if children or self.usr2_ignored:
            self.log.append((self.clock, m.pid, "USR2 ignored: child exists" if children else "USR2 ignored"))
            return
        try:
            request = json.loads(Path(self.app.boot_request).read_text())
        except (OSError, ValueError):
            request = {}
        if request.get("master") != m.pid:
            request = {}
        if self.detach:  # the intermediate of pre_exec's double fork: exited, the old master reaps it
            self.spawn(m.pid, master=True, state="zombie", cgroup=m.cgroup)
            m.pending.append(signal.SIGCHLD)
        new = self.start_master(1 if self.detach else m.pid, request.get("workers") or self.app.workers,
                                bool(request.get("gated")))
        self.procs[new].cgroup = m.cgroup
        if self.detach:
            self.procs[new].heir_of = m.pid
            (self.procs[new].marks / "heir-of").write_text(str(m.pid))
        if self.gate_blocked:
            (self.procs[new].marks / "gate-open").mkdir()  # writing the file there fails: IsADirectoryError
        Path(self.app.new_pidfile).write_text(f"{new}\n")

    def exit(self, pid: int) -> None:
        """*pid* exits: a master takes its workers along, removes its pidfile and ready markers (on_exit)."""
        p = self.procs[pid]
        if not self.alive(pid):
            return
        p.state = "zombie"
        self.log.append((self.clock, pid, "exit"))
        if p.master:
            for w in self.workers_of(pid):
                self.procs[w].state = "reaped"
            for pidfile in (self.app.pidfile, self.app.new_pidfile):
                if _read(pidfile) == pid:
                    Path(pidfile).unlink()
            shutil.rmtree(p.marks, ignore_errors=True)
        else:
            marks = self.procs[p.ppid].marks
            (marks / f"worker-{pid}").unlink(missing_ok=True)  # child_exit
            if marks.is_dir():
                (marks / f"exit-{pid}").write_text(str(pid))
        parent = self.procs.get(p.ppid)
        if parent is not None and parent.pid != 1 and self.alive(parent.pid):
            parent.pending.append(signal.SIGCHLD)
        elif parent is None or parent.pid == 1:
            p.state = "reaped"  # systemd reaps at once


def _read(path: str) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


# --- sd_notify and the bus ----------------------------------------------------------------------------------
class FakeNotifier:
    """Records what the engine tells systemd; MAINPID= moves :attr:`main_pid` as systemd would."""

    name = "app"

    def __init__(self, main_pid: int) -> None:
        self.sent: list[str] = []
        self.logged: list[tuple[int, str]] = []  #: journal lines with their syslog priority
        self.main_pid = main_pid

    def send(self, text: str) -> None:
        self.sent.append(text)
        for line in text.splitlines():
            if line.startswith("MAINPID="):
                self.main_pid = int(line.split("=", 1)[1])

    def log(self, text: str, priority: int = 5) -> None:
        self.logged.append((priority, text))

    def status(self, text: str, priority: int = 5) -> None:
        self.log(text, priority)
        self.send(f"STATUS={text}")

    def warn(self, text: str) -> None:
        self.status(text, 4)

    def log_unexpected(self, e: BaseException) -> None:
        self.log(f"traceback of {type(e).__name__}: {e}", 4)

    def barrier(self, timeout: float = 5.0) -> None:
        pass

    def extend(self) -> None:
        pass

    @property
    def statuses(self) -> list[str]:
        return [s.removeprefix("STATUS=") for s in self.sent if s.startswith("STATUS=")]


class FakePreflight:
    """The pre-flight as reloader.engine.Preflight: passes after *seconds* of the process table's clock,
    or refuses with *refusal*. Configure the class attributes per test (see :func:`preflight_that`)."""

    seconds = 0.1
    refusal = ""
    table: ProcessTable | None = None

    def __init__(self, app: AppConfig, n: Any, **_: Any) -> None:
        self.n = n
        self.started = self.table.clock if self.table else 0.0
        self.finished = self.started + self.seconds

    def done(self) -> bool:
        return self.table is None or self.table.clock >= self.finished

    def result(self) -> None:
        from reloader.engine import Refused

        if self.table:
            self.table.wait_for(self.done, self.seconds + 1)
        if self.refusal:
            raise Refused(self.refusal)

    def verdict(self) -> Any:
        from reloader.engine import Refused

        try:
            self.result()
        except Refused as e:
            return e
        return None

    def stop(self) -> None:
        pass


def preflight_that(table: ProcessTable, *, refuses: str = "", seconds: float = 0.1) -> type[FakePreflight]:
    """A pre-flight class that passes (or refuses with *refuses*) after *seconds* on *table*'s clock."""
    return type("ScriptedPreflight", (FakePreflight,), {"table": table, "refusal": refuses, "seconds": seconds})


class FakeSystemd:
    """reloader.bus.Systemd for the fleet engine: instance units whose start boots a master (and its
    workers, marking ready in the instance's ready dir) on a :class:`ProcessTable`, and stop stops it.

    Faults: *fail_start* (instance names whose start job ends "failed"), *raise_on* ({method name:
    exception}: raised by that method, e.g. a D-Bus error from ``state``), *dies_booting* (instance names
    whose unit goes inactive while booting)."""

    def __init__(self, app: AppConfig, table: ProcessTable) -> None:
        self.app, self.table = app, table
        self.mains: dict[str, int] = {}  #: unit -> its master
        self.jobs: list[tuple[str, str]] = []  #: (verb, unit), in order
        self.fail_start: set[str] = set()
        self.dies_booting: set[str] = set()
        self.raise_on: dict[str, BaseException] = {}
        self.queued: set[str] = set()  #: units with a connection waiting in their socket

    def _maybe_raise(self, method: str) -> None:
        if method in self.raise_on:
            raise self.raise_on[method]

    def _instance(self, unit: str) -> str:
        return unit.split("@", 1)[1].rsplit(".", 1)[0]

    def state(self, name: str) -> Any:
        from reloader.bus import UnitState

        self._maybe_raise("state")
        main = self.mains.get(name, 0)
        if main and not self.table.alive(main):
            del self.mains[name]
            main = 0
        if not main:
            return UnitState(name, "loaded", "inactive", "dead")
        if name.endswith(".socket"):
            return UnitState(name, "loaded", "active", "listening")
        return UnitState(name, "loaded", "active", "running", main_pid=main)

    def start_unit(self, name: str, *, timeout: float) -> str:
        self._maybe_raise("start_unit")
        self.jobs.append(("start", name))
        if name.endswith(".socket"):
            return "done"
        if self.mains.get(name) and self.table.alive(self.mains[name]):
            return "done"
        instance = self._instance(name)
        if instance in self.fail_start:
            return "failed"
        ready_dir = Path(self.app.instance_ready_dir(instance))
        self.mains[name] = self.table.start_master(1, self.app.workers, ready_dir=ready_dir)
        if instance in self.dies_booting:
            self.table.exit(self.mains[name])
        return "done"

    def restart_unit(self, name: str, *, timeout: float) -> str:
        self._maybe_raise("restart_unit")
        self.stop_unit(name, timeout=timeout)
        return self.start_unit(name, timeout=timeout)

    def stop_unit(self, name: str, *, timeout: float) -> str:
        self._maybe_raise("stop_unit")
        self.jobs.append(("stop", name))
        main = self.mains.pop(name, 0)
        if main and self.table.alive(main):
            self.table.exit(main)
        if name in self.queued:  # a connection still waits in its socket: activation starts it again
            self.queued.discard(name)
            self.start_unit(name, timeout=0)
        return "done"

    def reload_unit(self, name: str, *, timeout: float, progress: Any = None) -> str:
        self.jobs.append(("reload", name))
        return "done"

    def connect(self, socket_path: str) -> None:
        """A connection to an instance's socket: systemd's socket activation starts a stopped instance
        (as it does for nginx's requests and for the fleet's own health checks). The connection waits in
        the socket until a worker accepts it; one still there when the instance stops starts it again."""
        for instance in self.app.instance_names:
            if self.app.instance_socket(instance) == socket_path:
                unit = self.app.instance_unit(instance)
                if not self.state(unit).running:
                    self.queued.add(unit)
                    self.start_unit(unit, timeout=0)
                if self._accepting(unit):
                    self.queued.discard(unit)

    def _accepting(self, unit: str) -> bool:
        main = self.mains.get(unit, 0)
        return bool(main) and self.table.alive(main) and bool(self.table.ready_workers_of(main))

    def running(self) -> list[str]:
        """The instances whose unit runs."""
        return sorted(self._instance(u) for u, m in self.mains.items() if self.table.alive(m))
