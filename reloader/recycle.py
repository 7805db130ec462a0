"""Surge-first recycling: replace the running generation's workers without a capacity dip.

gunicorn's own recycling (``max_requests``, or a worker killed for its memory) lets the worker exit first and
forks its replacement afterwards, which then imports the app: for that import (seconds for Django) the app
runs one worker short, and users see latency spikes or 502s. Here the replacement comes first:

    wait until every worker is ready → TTIN (S new workers) → wait until they have loaded the app
    → TTOU (gunicorn retires its S *oldest* workers, gracefully) → wait until those exited → repeat

so at least ``workers`` workers that have loaded the app are ready at every moment, and at most
``workers + S`` run. gunicorn cannot TTOU a chosen worker (TTOU always retires the oldest, and a worker
killed directly is simply respawned by the master, importing the app with one worker short), so a worker
over ``max_worker_memory`` is recycled together with every worker older than it: the oldest workers are
usually the largest anyway. It runs under the app's reload lock (reloader.engine.exclusive), so it never
overlaps a reload, and it works on the single master of strategies "generation" and "hup".

Each run is recorded (toolkit/recycle.json in the app's state dir) for ``reloader status``.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import proc, releases
from .config import AppConfig
from .engine import SIGNAL_GAP, Notifier, exclusive, ready_workers


class RecycleFailed(Exception):
    """The recycle stopped; the message says why and what the master runs now."""


@dataclass
class Outcome:
    """One recycle, as ``reloader status --json`` shows it."""

    trigger: str  #: "command" or "memory"
    master: int
    workers: int  #: ready workers it kept at all times
    replaced: list[int] = field(default_factory=list)  #: the PIDs that retired
    over_memory: dict[int, int] = field(default_factory=dict)  #: PID -> RSS bytes, those above the limit
    result: str = "ok"
    error: str = ""
    started: float = 0.0  #: wall clock
    seconds: float = 0.0


def over_memory(workers: list[int], limit: int) -> dict[int, int]:
    """The workers whose RSS is above *limit* bytes, with their RSS."""
    sizes = {pid: proc.rss(pid) for pid in workers}
    return {pid: size for pid, size in sizes.items() if size > limit}


def oldest_through(workers: list[int], chosen: set[int]) -> list[int]:
    """The workers (oldest first) up to the youngest of *chosen*: what TTOU retires, one by one, before
    it has retired all of *chosen*."""
    ordered = sorted(workers, key=lambda p: (proc.start_time(p), p))
    last = max((i for i, p in enumerate(ordered) if p in chosen), default=-1)
    return ordered[: last + 1]


class Recycler:
    """Replaces workers of one gunicorn master, surge first. ``say`` reports each step (the journal)."""

    def __init__(self, app: AppConfig, master: int, say: Callable[[str], None], *, surge: int) -> None:
        self.app, self.master, self.say, self.surge = app, master, say, surge
        self.ready_dir = Path(app.ready_dir)
        self._signalled = 0.0
        #: TTINs not matched by a TTOU yet: given back if the recycle stops half-way.
        self.added = 0

    def ready(self) -> set[int]:
        return ready_workers(self.ready_dir, self.master)

    def workers(self) -> list[int]:
        """The master's live worker processes (ready or still booting), oldest first."""
        children = [p for p in proc.children(self.master)
                    if not (self.ready_dir / str(p) / "master").exists()]
        return sorted(children, key=lambda p: (proc.start_time(p), p))

    def settle(self) -> int:
        """Wait until every worker the master runs has loaded the app; their count is the floor kept."""
        def settled() -> bool:
            self._check_master()
            return len(self.ready()) >= max(len(self.workers()), 1)

        if not proc.wait_for(settled, self.app.ready_timeout, interval=0.1):
            raise RecycleFailed(f"only {len(self.ready())} of the {len(self.workers())} workers of master "
                                f"{self.master} are ready after ready_timeout ({self.app.ready_timeout} s); "
                                "nothing was recycled")
        return len(self.ready())

    def replace(self, targets: list[int], floor: int) -> list[int]:
        """Retire *targets* (the oldest workers, oldest first), *surge* at a time, each batch's replacement
        ready first. Returns the PIDs that retired."""
        retired: list[int] = []
        try:
            while True:
                left = [p for p in targets if proc.alive(p) and proc.ppid(p) == self.master]
                retired = [p for p in targets if p not in left]
                if not left:
                    return retired
                batch = min(self.surge, len(left))
                self.say(f"recycle: {len(retired)} of {len(targets)} workers replaced; starting {batch} new "
                         f"(TTIN) before retiring {', '.join(map(str, left[:batch]))}")
                for _ in range(batch):
                    self._signal(signal.SIGTTIN)
                    self.added += 1
                want = floor + batch
                if not proc.wait_for(lambda want=want: self._check_master() or len(self.ready()) >= want,
                                     self.app.ready_timeout, interval=0.05):
                    raise RecycleFailed(f"the new worker(s) did not load the app within ready_timeout "
                                        f"({self.app.ready_timeout} s): {len(self.ready())} of {want} ready")
                for _ in range(batch):
                    self._signal(signal.SIGTTOU)  # gunicorn retires its oldest worker, gracefully
                    self.added -= 1
                going = left[:batch]
                if not proc.wait_for(lambda going=going: not any(proc.alive(p) for p in going),
                                     self.app.graceful_timeout + 10, interval=0.05):
                    self.say(f"recycle: worker(s) {', '.join(map(str, going))} still finishing requests after "
                             "graceful_timeout; going on")
        finally:
            if self.added > 0 and proc.alive(self.master):
                # Stopped half-way: back to the worker count it had (TTOU retires the oldest).
                self.say(f"recycle: stopped; giving back {self.added} added worker(s) (TTOU)")
                for _ in range(self.added):
                    self._signal(signal.SIGTTOU, check=False)
                self.added = 0

    def _check_master(self) -> bool:
        if not proc.alive(self.master):
            raise RecycleFailed(f"master {self.master} exited during the recycle; see journalctl -u "
                                f"{self.app.service}")
        return False

    def _signal(self, sig: signal.Signals, *, check: bool = True) -> None:
        wait = self._signalled + SIGNAL_GAP - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if not proc.send(self.master, sig) and check:
            raise RecycleFailed(f"master {self.master} exited during the recycle")
        self._signalled = time.monotonic()


def recycle(app: AppConfig, main_pid: Callable[[], int], *, surge: int = 0, memory: bool = False,
            say: Callable[[str], None] | None = None) -> Outcome:
    """Recycle every worker of the master (or, with *memory*, those above max_worker_memory and every older
    one), under the reload lock. *main_pid* names the master once the lock is held: a reload that held it
    meanwhile has replaced the master that ran when the recycle was asked for. Records and returns the
    outcome; raises nothing for a failed recycle (``outcome.result == "failed"``);
    :class:`reloader.engine.Refused` when a reload holds the lock too long."""
    say = say or (lambda text: print(f"reloader: {app.name}: {text}", file=sys.stderr, flush=True))
    surge = surge or app.recycle_surge
    outcome = Outcome(trigger="memory" if memory else "command", master=0, workers=0, started=time.time())
    began = time.monotonic()
    _lock_file(app)
    with exclusive(Path(app.reload_lock), app.ready_timeout + app.graceful_timeout, Notifier(app.name),
                   "reload (or recycle)"):
        master = outcome.master = main_pid()
        r = Recycler(app, master, say, surge=surge)
        try:
            if not proc.alive(master):
                raise RecycleFailed(f"master {master} is not running")
            outcome.workers = r.settle()
            workers = r.workers()
            if memory:
                outcome.over_memory = over_memory(workers, app.max_worker_memory_bytes)
                if not outcome.over_memory:
                    outcome.seconds = round(time.monotonic() - began, 2)
                    return outcome  # nothing to do; not recorded (the timer runs often)
                sizes = ", ".join(f"{pid} ({size / 2**20:.0f} MB)" for pid, size in outcome.over_memory.items())
                say(f"recycle: worker(s) above max_worker_memory ({app.max_worker_memory}): {sizes}")
                targets = oldest_through(workers, set(outcome.over_memory))
            else:
                targets = workers
            outcome.replaced = r.replace(targets, outcome.workers)
            say(f"recycle: done: {len(outcome.replaced)} worker(s) of master {master} replaced, never fewer "
                f"than {outcome.workers} ready")
        except RecycleFailed as e:
            outcome.result, outcome.error = "failed", str(e)
            say(f"recycle failed: {e}")
    outcome.seconds = round(time.monotonic() - began, 2)
    record(app, outcome)
    return outcome


def _lock_file(app: AppConfig) -> None:
    """The reload lock is the helper's (it runs as the app user): create it as that user's, not root's."""
    path = Path(app.reload_lock)
    if path.exists() or not path.parent.is_dir():
        return
    path.touch()
    try:
        user = pwd.getpwnam(app.user)
        os.chown(path, user.pw_uid, user.pw_gid)
    except (KeyError, PermissionError):
        pass


def record_path(app: AppConfig) -> Path:
    return Path(app.toolkit_dir) / "recycle.json"


def record(app: AppConfig, outcome: Outcome) -> None:
    releases.write_atomic(record_path(app), json.dumps(asdict(outcome)) + "\n", 0o644)


def last(app: AppConfig) -> dict | None:
    """The last recorded recycle (None if there was none)."""
    try:
        return json.loads(record_path(app).read_text())
    except (OSError, ValueError):
        return None


def status(app: AppConfig, master: int) -> dict:
    """For ``reloader status``: the limit, each worker's RSS, and the last recycle."""
    workers = [p for p in proc.children(master)
               if not (Path(app.ready_dir) / str(p) / "master").exists()] if master else []
    return {"max_worker_memory": app.max_worker_memory or None,
            "timer": app.recycle_timer if app.max_worker_memory else None,
            "worker_rss_mb": {str(p): round(proc.rss(p) / 2**20, 1) for p in workers},
            "last": last(app)}

