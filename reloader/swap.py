"""The reload engine that runs as the unit's ``ExecReload=``: one state machine per strategy, each step named.

    "generation" (the default): a gated new generation
        clean up strays → setup commands → pre-flight ∥ new generation (its workers load the app, then
        wait at the gate) → every new worker ready and the pre-flight passed → open the gate for a canary
        → bake: its requests against the old generation's ([analysis], reloader.traffic) → open the gate
        for all → hand MAINPID over → retire old generation → confirm
        (without the analysis: open the gate for all → bake → hand MAINPID over → …)
    "generation" with max_surge = S: lockstep, at most workers + S workers at any time
        … → pre-flight ∥ new generation of S gated workers → open the gate (the canary: the analysis'
        bake) → trade: TTOU old, TTIN new, until the new master has them all → (bake without the
        analysis) → hand MAINPID over → retire old → confirm
    "hup": clean up strays → setup commands → pre-flight → HUP → wait new workers → bake → confirm

Any failure before the old generation is retired rolls back: a lockstep swap first gives the old master
its full worker count back, then the new master is stopped (fast if its gate never opened: its workers
never took a request); the old one keeps serving. The helper exits non-zero and says why in ``STATUS=``
and on stderr (the journal), so ``systemctl reload`` fails and ``systemctl status`` shows it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import after_switch, drain, proc, releases, setup_commands, traffic
from .config import AppConfig
from .engine import (
    SIGNAL_GAP,
    WARNING,
    Notifier,
    Preflight,
    Refused,
    exclusive,
    health,
    monotonic_usec,
    ready_workers,
    reason,
    worker_exits,
)
from .proc import ProcessTable


class Swap:
    """One reload of one app. ``run()`` returns the exit status for systemd."""

    def __init__(self, app: AppConfig, main_pid: int, notifier: Notifier,
                 main_pid_from_bus: Callable[[], int] | None = None, *, processes: ProcessTable = proc,
                 health: Callable[[AppConfig], tuple[int, str]] = health, checker: type[Preflight] = Preflight
                 ) -> None:
        """The collaborators after * are the real ones by default; the host tests (tests/fakes.py) pass a
        simulated process table, health check and pre-flight to run every failure path in milliseconds."""
        self.app = app
        self.old = main_pid
        self.new = 0
        self.n = notifier
        self.main_pid_from_bus = main_pid_from_bus
        self.proc = processes
        self.health = health
        self.checker = checker
        #: MAINPID= named the new master (a roll back names the old one again).
        self.handed_over = False
        #: The hand-over succeeded: the new generation serves and the old one retires (no roll back).
        self.taken_over = False
        self.ready_dir = Path(app.ready_dir)
        #: The new generation's gate is open: its workers accept (and a rollback must stop it gracefully).
        self.gate_open = False
        #: gate-open written: every new worker accepts, not only the canary's tickets.
        self.whole_gate_open = False
        #: How many workers the old master runs now (lockstep lowers it with TTOU, a rollback raises it).
        self.old_workers = app.workers
        self._signalled: dict[int, float] = {}
        self.ready_at = 0.0  #: when wait_ready last saw every worker it waited for ready (monotonic)
        #: The release this reload deploys, resolved once at its start: the pre-flight's cwd, the new
        #: master's chdir and what gets recorded live, whatever ``current`` points at meanwhile.
        self.target = releases.Release(releases.resolve_current(app), releases.resolve_virtualenv(app))
        self.release_dir = self.target.release
        #: The bake's traffic analysis ([analysis]), once the canary's gate opened.
        self.analysis: traffic.Analysis | None = None
        self.baseline: dict[int, traffic.Stats] = {}  #: the old generation's request counters at the start
        #: [reload] drain_timeout: the old generation drains (the new master TERMs it later), or None.
        self.draining: drain.Draining | None = None

    # --- the protocol -------------------------------------------------------------------------------
    def run(self, *, notify_reload: bool = False) -> int:
        """*notify_reload*: the unit is Type=notify-reload (systemd >= 253), which waits for RELOADING=1.

        Under Type=notify the unit is already reloading because ExecReload= runs, and a RELOADING=1
        would make systemd 252 wait for READY=1 even after this helper died (e.g. SIGKILLed): the unit
        would hang in "reloading" until TimeoutStartSec. So it is only sent where it is required."""
        if notify_reload:
            self.n.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        started = time.monotonic()
        tried = False
        try:
            with self._lock():
                if not self.proc.alive(self.old):
                    raise Refused(f"MainPID {self.old} is not running; start the service instead")
                self.clean_up_strays()
                tried = True
                try:
                    self.setup(self.release_dir)
                    if self.app.strategy.keeps_master:
                        self.reload_by_hup()
                    else:
                        self.reload_by_gated_generation()
                finally:
                    releases.clear_boot_request(self.app)
        except Exception as e:  # not only Refused: whatever failed, the state below is told and true
            if not isinstance(e, Refused):
                self.n.log_unexpected(e)
            if self.taken_over and self.proc.alive(self.new):
                return self._serving_but(e)
            serving = self._serving()
            why = str(e) if isinstance(e, traffic.Regression) else f"release {self.release()}: {reason(e)}"
            self.n.warn(f"reload refused: {why}"
                          + (f"; still serving {serving}" if serving else ""))
            self.report_cost()
            if tried:
                try:
                    releases.record_refused(self.app, self.release_dir, reason(e))
                except OSError as err:  # the refusal itself stands; only the listing misses it
                    self.n.log(f"cannot record the refusal in {self.app.state_dir}: {err.strerror}", WARNING)
            self.n.send("READY=1")
            return 1
        generation = self._next_generation()
        master = self.new or self.old
        try:
            releases.record_live(self.app, self.target)
        except OSError as e:
            # Serving but not recorded: the next restart would boot the old live release. Say so, fail.
            self.n.warn(f"serving release {self.release()} (master {master}), but it could not be recorded "
                          f"live in {self.app.state_dir} ({e.strerror}), so a restart would not boot it; "
                          f"run `reloader install` (it creates {self.app.state_dir} for the app user)")
            self.n.send("READY=1")
            return 1
        # [setup] after_switch: the old generation has retired; a failure is reported, not rolled back.
        failed = after_switch.run(self.app, self.release_dir, self.n)
        workers = len(self._ready_workers(master))  # seen ready now, not the configured count
        cost = self.report_cost()
        verdict = f"; {self.analysis.outcome}" if self.analysis and self.analysis.outcome else ""
        self.n.status(f"serving release {self.release()}, generation {generation}, {workers} workers "
                      f"(master {master}, reload took {time.monotonic() - started:.1f} s; {cost}){verdict}"
                      + (f"; after_switch failed: {failed}" if failed else "")
                      + (f"; {self.draining}" if self.draining and self.proc.alive(self.old) else ""))
        self.n.send("READY=1")
        self.n.barrier()
        return 0

    def reload_by_gated_generation(self) -> None:
        """The new generation boots while the pre-flight runs; its workers take no request before both
        the pre-flight passed and every one of them loaded the app. With max_surge = S it starts with S
        workers and takes over the rest in lockstep: at most workers + S run, never fewer than workers serve."""
        surge = min(self.app.max_surge, self.app.workers)
        self.baseline = traffic.read_workers(self.ready_dir, self.old) if self.app.request_stats else {}
        check = self.start_preflight()
        try:
            self.spawn_new_generation(gated=True, workers=surge)
            self.wait_ready(self.new, surge or self.app.workers, check)
            if self.app.request_stats:
                self.open_canary(surge or self.app.workers, check)
                self.bake(self.new)  # judged with the canary; the others are still at the gate
            self.open_gate(self.new, check)
            if surge:
                self.trade_workers(surge)
            if not self.app.request_stats:
                self.bake(self.new)
            self.hand_over()
        except Exception as e:  # a bus error or an OSError rolls back as a refusal does
            self.undo(self.restore_old_generation,  # a no-op unless a lockstep swap retired old workers
                      self.roll_back)
            verdict = check.verdict()
            if verdict and not isinstance(e, Refused):
                self.n.log_unexpected(e)  # the pre-flight's reason goes to STATUS=; this one to the journal
            raise verdict or e from None
        self.taken_over = True
        self.retire_old_generation()
        self.confirm()

    def reload_by_hup(self) -> None:
        self.preflight()
        before = set(self.proc.children(self.old))
        exited_before = self._exits(self.old)
        self.request_boot(self.old)
        self.n.status(f"HUP to master {self.old}: replacing its {len(before)} workers")
        self.proc.send(self.old, signal.SIGHUP)
        self.wait_ready(self.old, self.app.workers, exclude=before)
        self.n.status("waiting for the old workers to finish their requests")
        if not self.proc.wait_for(lambda: not any(self.proc.alive(p) and self.proc.ppid(p) == self.old for p in before),
                                  self.app.graceful_timeout + 10, tick=self.n.extend):
            raise Refused("old workers did not exit within graceful_timeout")
        self.bake(self.old, expected_exits=before | exited_before)

    # --- steps ------------------------------------------------------------------------------------
    def clean_up_strays(self) -> None:
        """Undo what a helper killed mid-reload may have left, so this reload starts from one generation."""
        parent = _heir_of(self.ready_dir, self.old) or self.proc.ppid(self.old)
        if parent > 1 and self.proc.same_unit(parent, self.old) and _is_master(parent, self.app, self.proc):
            # Killed after the hand-over, before retiring: the old master is the one MainPID succeeds
            # (its ready/MAINPID/heir-of; its parent, for a new master started before pre_exec detached it).
            self.n.status(drain.ending(self.app, parent)
                          or f"retiring old master {parent} left by an interrupted reload")
            self.proc.send(parent, signal.SIGTERM)
            if not self.proc.wait_for(lambda: not self.proc.alive(parent), self.app.graceful_timeout + 10,
                                      tick=self.n.extend):
                raise Refused(f"old master {parent} from an interrupted reload did not exit")
            # The new master promotes itself (renames gunicorn.pid.2) on its next loop.
            self.proc.wait_for(lambda: _read_pid(self.app.pidfile) == self.old, 5)
        for child in self._successors():
            self.restore_worker_count(stray=child)
            self.n.status(f"stopping stray new master {child} left by an interrupted reload")
            self.proc.send(child, signal.SIGTERM)
            if not self.proc.wait_for(lambda c=child: self._reaped(c), self.app.graceful_timeout + 10,
                                      tick=self.n.extend):
                raise Refused(f"stray master {child} did not exit (or master {self.old} did not reap it)")
        # Let the old master reap it (it ignores USR2 while it still has a child master).
        self.proc.wait_for(lambda: not Path(self.app.new_pidfile).exists(), 3)
        if self.ready_dir.is_dir():
            for entry in self.ready_dir.iterdir():
                if entry.name.isdigit() and not self.proc.alive(int(entry.name)):
                    _rmtree(entry)

    def restore_worker_count(self, stray: int) -> None:
        """A helper killed mid-lockstep left the old master with fewer workers (its TTOUs): TTIN it back
        to ``workers`` before the stray new master, which serves the rest, is stopped."""
        workers = [p for p in self.proc.children(self.old) if p != stray and not _is_master(p, self.app, self.proc)]
        missing = self.app.workers - len(workers)
        if missing <= 0:
            return
        self.n.status(f"master {self.old} runs {len(workers)} of {self.app.workers} workers after an interrupted "
                      f"lockstep swap: adding {missing} (TTIN)")
        for _ in range(missing):
            self.signal_master(self.old, signal.SIGTTIN)
        if not self.proc.wait_for(lambda: len(self._ready_workers(self.old)) >= self.app.workers,
                                  self.app.ready_timeout, tick=self.n.extend):
            raise Refused(f"master {self.old} did not get back to {self.app.workers} workers within ready_timeout")

    def preflight(self) -> None:
        self.start_preflight().result()

    def start_preflight(self) -> Preflight:
        return self.checker(self.app, self.n, release_dir=self.release_dir, python=self._python())

    def request_boot(self, master: int, *, gated: bool = False, workers: int = 0) -> None:
        """Hand the next master (the USR2 child of *master*, or *master* itself on HUP) the resolved
        release and the unit's current environment, which systemd gave this helper."""
        try:
            releases.write_boot_request(self.app, master, self.target, dict(os.environ), gated=gated,
                                        workers=workers)
        except OSError as e:
            raise Refused(f"cannot write {releases.boot_request_path(self.app)}: {e.strerror}") from None

    def setup(self, release_dir: str) -> None:
        """The [setup] commands (e.g. migrations) in the release about to go live, before its pre-flight."""
        if not self.app.setup.commands:
            return
        try:
            setup_commands.run(self.app, release_dir, self.n.status, self.n.extend)
        except setup_commands.SetupFailed as e:
            raise Refused(str(e)) from None

    def spawn_new_generation(self, *, gated: bool = False, workers: int = 0) -> None:
        self.request_boot(self.old, gated=gated, workers=workers)
        self.n.status(f"starting a new generation next to master {self.old} (USR2"
                      + (f", {workers} workers" if workers else "") + (", gated" if gated else "") + ")")
        before = set(self.proc.children(self.old))
        heirs_before = set(_heirs(self.ready_dir, self.old))
        self.proc.send(self.old, signal.SIGUSR2)
        pidfile2 = self.app.new_pidfile
        forked: set[int] = set()

        def found() -> bool:
            pid = _read_pid(pidfile2)
            if pid and self._succeeds(pid):
                self.new = pid
                return True
            # The old master forks a child, whose pre_exec forks the new master and exits at once, after
            # writing ready/NEW/heir-of (the config's _detach). Once every process forked so far is gone
            # and there is no pidfile, the new master died starting (e.g. could not take over the
            # sockets): fail now, not at 30 s. The heirs are read after the forked children were seen
            # gone, so a new master whose intermediate exited is always among them.
            forked.update(set(self.proc.children(self.old)) - before)
            if forked and not any(self.proc.alive(p) for p in forked):
                forked.update(set(_heirs(self.ready_dir, self.old)) - heirs_before)
                if not any(self.proc.alive(p) for p in forked) and not Path(pidfile2).exists():
                    raise Refused(f"the new master exited while starting (pid {max(forked)}); "
                                  f"see journalctl -u {self.app.service}")
            return False

        if not self.proc.wait_for(found, 30, tick=self.n.extend):
            pid = _read_pid(pidfile2)
            raise Refused(f"master {self.old} did not start a new master within 30 s ("
                          + (f"{pidfile2} names {pid}, which succeeds master {_heir_of(self.ready_dir, pid)} "
                             f"and has parent {self.proc.ppid(pid)}" if pid else f"no {pidfile2}") + ")")

    def wait_ready(self, master: int, want: int, check: Preflight | None = None,
                   exclude: set[int] = frozenset(), *, no_exits: bool = False) -> None:
        """Wait until *want* workers of *master* have loaded the app (the post_worker_init hook ran) and,
        with *check*, the pre-flight running meanwhile passed (its refusal ends the wait at once).
        *no_exits*: a worker of *master* that dies is a failure (lockstep: it was serving)."""
        self.n.status(f"waiting for {want} workers of master {master} to load the app"
                      + (" (gated until the pre-flight passes)" if check else ""))
        exits_before = self._exits(master)
        self.ready_at = 0.0

        def ready() -> bool:
            if check and check.done():
                check.result()
            if not self.proc.alive(master):
                raise Refused(f"the new generation exited while booting (master {master}); "
                              f"see journalctl -u {self.app.service}")
            lost = self._exits(master) - exits_before
            if no_exits and lost:
                raise Refused(f"{len(lost)} new worker(s) died during the lockstep swap (e.g. pid {min(lost)})")
            if len(self._ready_workers(master) - exclude) < want:
                return False
            self.ready_at = self.ready_at or time.monotonic()
            return check is None or check.done()

        # Polled every 10 ms: the gate opens (the first answer of the new version) right after this.
        if not self.proc.wait_for(ready, self.app.ready_timeout, interval=0.01, tick=self.n.extend):
            got = len(self._ready_workers(master) - exclude)
            if got >= want and check:
                check.result()  # the workers are ready; the pre-flight is still running: wait for it
                return
            raise Refused(f"only {got} of {want} workers loaded the app within ready_timeout "
                          f"({self.app.ready_timeout} s)")

    def open_gate(self, master: int, check: Preflight) -> None:
        """The pre-flight passed and every new worker loaded the app: let them accept connections."""
        gate = self.ready_dir / str(master) / "gate-open"
        if self.whole_gate_open:  # the canary was the whole generation: opened before the bake
            return
        try:
            gate.write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise Refused(f"cannot open the gate of master {master} ({gate}): {e.strerror}") from None
        self.gate_open = self.whole_gate_open = True
        now = time.monotonic()
        self.n.status(f"gate open: master {master}'s workers accept connections ({now - check.started:.2f} s "
                      f"after the pre-flight and the new generation started; the pre-flight took "
                      f"{check.finished - check.started:.2f} s, the workers were ready after "
                      f"{(self.ready_at or now) - check.started:.2f} s)")

    def open_canary(self, workers: int, check: Preflight) -> None:
        """Traffic analysis: let only [analysis] canary_workers of the new generation's *workers* accept
        (their own gate tickets) while it is judged against the old one, so a regressing release serves
        about canary / (workers + canary) of the requests; all of them when that is the whole generation."""
        ready = sorted(self._ready_workers(self.new))
        canary = min(self.app.analysis.canary_workers or workers, workers, len(ready))
        if canary >= workers:
            self.open_gate(self.new, check)
        else:
            traffic.open_canary(self.ready_dir, self.new, ready[:canary])
            self.gate_open = True
            self.n.status(f"canary open: {canary} of master {self.new}'s {workers} workers accept connections "
                          f"({time.monotonic() - check.started:.2f} s after the pre-flight and the new generation "
                          "started); the others wait at the gate until the comparison passed")
        self.analysis = traffic.Analysis(self.app, self.release(), self.old, self.new, canary=canary,
                                         workers=workers, say=self.n.status, baseline=self.baseline)

    def trade_workers(self, surge: int) -> None:
        """Lockstep: retire *surge* old workers gracefully (TTOU) and start as many new ones (TTIN), wait
        until those are ready and the old ones gone, repeat until the new master runs them all. While
        the new ones boot, old + new serving >= workers (the surge covers the old ones retiring)."""
        want, new = self.app.workers, surge
        while new < want:
            batch = min(surge, want - new)
            self.n.status(f"lockstep: {new} of {want} workers on master {self.new}; retiring {batch} of "
                          f"master {self.old} (TTOU) for {batch} new (TTIN)")
            for _ in range(batch):
                self.signal_master(self.old, signal.SIGTTOU)
                self.old_workers -= 1
                self.signal_master(self.new, signal.SIGTTIN)
                new += 1
            self.wait_ready(self.new, new, no_exits=True)
            if not self.proc.wait_for(lambda: len(self._ready_workers(self.old)) <= self.old_workers,
                                      self.app.graceful_timeout + 10, tick=self.n.extend):
                self.n.log(f"old workers of master {self.old} still finishing requests after graceful_timeout; "
                           "going on", WARNING)

    def restore_old_generation(self) -> None:
        """A lockstep swap failed: give the old master its full worker count back before the new one
        goes, so capacity never drops below workers."""
        missing = self.app.workers - self.old_workers
        if missing <= 0 or not self.proc.alive(self.old):
            return
        self.n.warn(f"rolling back: restoring master {self.old} to {self.app.workers} workers (TTIN x{missing})")
        for _ in range(missing):
            self.signal_master(self.old, signal.SIGTTIN)
            self.old_workers += 1
        if not self.proc.wait_for(lambda: len(self._ready_workers(self.old)) >= self.app.workers,
                                  self.app.ready_timeout, tick=self.n.extend):
            self.n.log(f"master {self.old} has only {len(self._ready_workers(self.old))} of {self.app.workers} "
                       "workers ready after ready_timeout", WARNING)

    def bake(self, master: int, expected_exits: set[int] = frozenset()) -> None:
        """Keep watching the new workers (and the app's health) before the old generation goes.

        *expected_exits*: workers replaced on purpose (HUP) or that exited before this reload. With the
        traffic analysis it lasts until that passed (see reloader.traffic), at least bake_seconds."""
        seconds, analysis = self.app.bake_seconds, self.analysis
        if seconds <= 0 and not analysis:
            return
        if analysis:
            a = self.app.analysis
            self.n.status(f"baking: comparing the new generation's requests with the old one's for at least "
                          f"{seconds:g} s and {a.min_requests} requests (at most {analysis.limit:g} s)")
        else:
            self.n.status(f"baking the new generation for {seconds:g} s")
        deadline = time.monotonic() + seconds
        try:
            self._bake(master, expected_exits, deadline, analysis)
        finally:
            if analysis and analysis.verdict:
                self._record_analysis(analysis)

    def _bake(self, master: int, expected_exits: set[int], deadline: float,
              analysis: traffic.Analysis | None) -> None:
        look = 0.0
        while True:
            if not self.proc.alive(master):
                raise Refused(f"the new master {master} died during the bake")
            lost = self._exits(master) - expected_exits
            if lost:
                raise Refused(f"{len(lost)} new worker(s) died during the bake (e.g. pid {min(lost)})")
            status, error = self.health(self.app)
            if not self.app.health_ok(status):
                raise Refused(f"health check {self.app.health_path} through {self.app.socket} "
                              f"{'answered ' + str(status) if status else 'failed: ' + error} during the bake")
            now = time.monotonic()
            if analysis is None and now >= deadline:
                return
            if analysis and now >= look:
                look = now + traffic.LOOK_SECONDS
                if analysis.look():
                    return
            self.n.extend()
            time.sleep(0.2)

    def _record_analysis(self, analysis: traffic.Analysis) -> None:
        self.n.log(analysis.outcome)
        try:
            releases.record_analysis(self.app, analysis.record())
        except OSError as e:  # the verdict stands; only the listing misses it
            self.n.log(f"cannot record the traffic comparison in {self.app.state_dir}: {e.strerror}", WARNING)

    def hand_over(self) -> None:
        self.n.status(f"handing MainPID over to the new master {self.new}")
        self.handed_over = True
        self.n.send(f"MAINPID={self.new}")
        if self.main_pid_from_bus and not self.proc.wait_for(lambda: self.main_pid_from_bus() == self.new, 10):
            raise Refused(f"systemd did not accept MAINPID={self.new} (is NotifyAccess=exec set?)")

    def roll_back(self) -> None:
        """Stop the new master: QUIT (fast) while its gate is shut, for its workers never took a request
        (and may still be stuck importing); TERM once they accept, so their requests finish."""
        if not self.new:
            return
        how = "TERM" if self.gate_open else "QUIT: its workers never took a request"
        self.n.warn(f"rolling back: stopping new master {self.new} ({how}), master {self.old} keeps serving")
        if self.handed_over:  # systemd may have taken it (asking it over D-Bus may be what failed)
            self.n.send(f"MAINPID={self.old}")
            self.handed_over = False
        self.proc.send(self.new, signal.SIGTERM if self.gate_open else signal.SIGQUIT)
        self.proc.wait_for(lambda: self._reaped(self.new), self.app.graceful_timeout + 10, tick=self.n.extend)

    def retire_old_generation(self) -> None:
        if self.app.drain_timeout:
            try:
                self.draining = drain.begin(self.app, self.old, self.new, self.release(), self.n.extend)
            except drain.NotDrained as e:
                self.n.warn(f"drain_timeout: the old generation cannot drain: {e}; retiring it now (TERM)")
            else:
                if self.draining.connections:
                    # Not waited for: the new master TERMs the old one once they closed or at the deadline.
                    self.n.status(f"old master {self.old} stopped accepting: {self.draining}")
                    return
                self.draining = None  # nothing to drain: retire it as without drain_timeout
        self.n.status(f"retiring old master {self.old} gracefully (TERM): in-flight requests finish")
        self.proc.send(self.old, signal.SIGTERM)
        if not self.proc.wait_for(lambda: not self.proc.alive(self.old), self.app.graceful_timeout + 10,
                                  tick=self.n.extend):
            # Past graceful_timeout gunicorn kills its own workers; a master still here is wedged.
            raise Refused(f"old master {self.old} did not exit after graceful_timeout; the new generation "
                          f"{self.new} is serving")

    def confirm(self) -> None:
        if not self.proc.alive(self.new):
            raise Refused(f"the new master {self.new} died right after taking over")
        # Its parent is gone: gunicorn promotes it and renames gunicorn.pid.2 on its next loop (after a drain).
        if not self.draining:
            self.proc.wait_for(lambda: _read_pid(self.app.pidfile) == self.new, 5)
        if self.main_pid_from_bus:
            main = self.main_pid_from_bus()
            if main != self.new:
                raise Refused(f"systemd's MainPID is {main}, expected the new master {self.new}")

    def undo(self, *steps: Callable[[], None]) -> None:
        """Run every roll-back step, even when one before it failed (its failure goes to the journal)."""
        for step in steps:
            try:
                step()
            except Exception as e:
                self.n.log(f"rolling back: {step.__name__} failed: {reason(e)}", WARNING)

    def retire_again(self) -> None:
        if self.proc.alive(self.old):
            self.proc.send(self.old, signal.SIGTERM)

    def _serving_but(self, failure: Exception) -> int:
        """The hand-over succeeded, then retiring or confirming failed: the new generation serves, so
        the records say so (a restart boots it); the reload still fails and says why. An old master
        still running gets its TERM (again): whatever failed may have come before it."""
        self.undo(self.retire_again)
        try:
            releases.record_live(self.app, self.target)
        except OSError as e:
            self.n.log(f"cannot record release {self.release()} live in {self.app.state_dir}: {e.strerror}",
                       WARNING)
        self.n.warn(f"serving release {self.release()} (master {self.new}), but: {reason(failure)}")
        self.report_cost()
        self.n.send("READY=1")
        return 1

    # --- helpers ----------------------------------------------------------------------------------
    def signal_master(self, master: int, sig: signal.Signals) -> None:
        """Signal a master, at most one signal per SIGNAL_GAP each (see there)."""
        wait = self._signalled.get(master, 0.0) + SIGNAL_GAP - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if not self.proc.send(master, sig):
            raise Refused(f"master {master} exited during the swap; see journalctl -u {self.app.service}")
        self._signalled[master] = time.monotonic()

    def report_cost(self) -> str:
        """The helper's own cost for this reload (and its children's: pre-flight, setup commands), in the
        journal; returns the short form for STATUS=."""
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = f"peak RSS {me.ru_maxrss / 1024:.1f} MB, CPU {me.ru_utime + me.ru_stime:.2f} s"
        theirs = f"peak RSS {kids.ru_maxrss / 1024:.1f} MB, CPU {kids.ru_utime + kids.ru_stime:.2f} s"
        self.n.log(f"helper cost: {mine}; its children (pre-flight, setup): {theirs}")
        return f"helper {me.ru_maxrss / 1024:.0f} MB, {me.ru_utime + me.ru_stime:.2f} s CPU"

    def release(self) -> str:
        return os.path.basename(self.release_dir)

    def _python(self) -> str:
        venv = self.target.virtualenv
        return os.path.join(venv, "bin", "python3") if venv else self.app.python

    def _serving(self) -> str:
        """What the running generation serves: its master's working directory (the release it resolved)."""
        master = self.old if self.proc.alive(self.old) else 0
        if not master:
            return ""
        try:
            return f"release {os.path.basename(os.readlink(f'/proc/{master}/cwd'))} (master {master})"
        except OSError:
            return f"master {master}"

    def _reaped(self, pid: int) -> bool:
        """*pid*, a new master of the old one, is gone for good. A detached one (the config's pre_exec) is
        systemd's child, which reaps it. One still the old master's child (a failed detach, or a new
        master of a config from before that) must have been reaped by the old master: having exited is
        not enough, for until gunicorn's master has handled that SIGCHLD it ignores USR2 ("USR2 signal
        ignored. Child exists."), and when both are pending it handles the USR2 first (CPython runs
        signal handlers in signal-number order: USR2 is 12, CHLD 17), so the next reload would wait 30 s
        for a new master that never comes. A zombie's parent is still the old master; a reaped pid has
        none (or, reused, another)."""
        return not self.proc.alive(pid) and self.proc.ppid(pid) != self.old

    def _succeeds(self, pid: int) -> bool:
        """*pid* is a live new master of the old one: its ready directory says it succeeds the old master
        (written before the old master's fork exited, from the pid gunicorn gives the new master in
        GUNICORN_PID) or, not detached, it is the old master's child."""
        if not self.proc.alive(pid):
            return False
        return _heir_of(self.ready_dir, pid) == self.old or self.proc.ppid(pid) == self.old

    def _successors(self) -> list[int]:
        """Live new masters of the old one (a stray left by a helper killed mid-reload): those whose ready
        directory names the old master, in its cgroup, and masters among its children."""
        heirs = {p for p in _heirs(self.ready_dir, self.old)
                 if self.proc.alive(p) and self.proc.same_unit(p, self.old)}
        children = {p for p in self.proc.children(self.old) if _is_master(p, self.app, self.proc)}
        return sorted(heirs | children)

    def _ready_workers(self, master: int) -> set[int]:
        return ready_workers(self.ready_dir, master, self.proc)

    def _exits(self, master: int) -> set[int]:
        return worker_exits(self.ready_dir, master)

    def _next_generation(self) -> int:
        path = Path(self.app.generation_path)
        try:
            n = int(path.read_text().strip()) + 1
        except (OSError, ValueError):
            n = 2  # the generation systemd started is 1
        try:
            path.write_text(f"{n}\n")
        except OSError:
            pass
        return n

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialize reloads of one app even when the helper is run by hand next to systemd's."""
        with exclusive(Path(self.app.reload_lock), self.app.ready_timeout, self.n, "reload"):
            yield


def report_start(app: AppConfig, main_pid: int, n: Notifier) -> int:
    """``ExecStartPost=``: the master systemd started is up. Wait until its workers loaded the app; on the
    very first start (no live release recorded yet) record what it booted as live; and say in STATUS=
    (and the journal) which release serves and whether ``current`` names one that is not deployed."""
    def ready() -> bool:
        # A master whose workers cannot boot halts (and systemd restarts or fails the unit): stop waiting.
        return not proc.alive(main_pid) or len(ready_workers(Path(app.ready_dir), main_pid)) >= app.workers

    all_ready = proc.wait_for(ready, app.ready_timeout, interval=0.1)
    if not proc.alive(main_pid):
        n.warn(f"master {main_pid} exited while its workers were booting; see journalctl -u {app.service}")
        return 1
    if not all_ready:
        n.warn(f"started, but the workers of master {main_pid} did not all load the app within "
                 f"ready_timeout ({app.ready_timeout} s); see journalctl -u {app.service}")
        return 1
    booted = releases.booted(app, main_pid)
    if not booted:
        n.warn(f"master {main_pid} did not record what it booted (an old gunicorn config? run `reloader install`)")
        return 1
    records = releases.read(app)
    live = records.live
    if live is None or not os.path.isdir(live.release):
        live = releases.Release(booted["release"], booted.get("virtualenv", ""))
        try:
            records = releases.record_live(app, live)
        except OSError as e:
            n.warn(f"serving release {live.name} (master {main_pid}), but it could not be recorded live in "
                     f"{app.state_dir} ({e.strerror}); run `reloader install`")
            return 1
    note = releases.pending(app, records)
    n.status(f"serving release {os.path.basename(booted['release'])} (master {main_pid}, started)"
             + (f"; {note}" if note else ""))
    n.barrier()
    return 0


def _is_master(pid: int, app: AppConfig, processes: ProcessTable = proc) -> bool:
    """A gunicorn master of this app: it has a ready-dir entry, or is named in one of its pidfiles."""
    if (Path(app.ready_dir) / str(pid) / "master").exists():
        return True
    return pid in (_read_pid(app.pidfile), _read_pid(app.new_pidfile)) and processes.alive(pid)


def _heir_of(ready_dir: Path, pid: int) -> int:
    """The master that master *pid* succeeds (ready/PID/heir-of, see the config's _detach), or 0."""
    return _read_pid(str(ready_dir / str(pid) / "heir-of"))


def _heirs(ready_dir: Path, old: int) -> list[int]:
    """Every pid (live or not) whose ready directory says it succeeds master *old*."""
    if not ready_dir.is_dir():
        return []
    return sorted(int(e.name) for e in ready_dir.iterdir()
                  if e.name.isdigit() and _heir_of(ready_dir, int(e.name)) == old)


def _read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _rmtree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()
