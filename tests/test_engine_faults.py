"""Every step of every reload strategy failing, on the host in milliseconds: the engines (reloader.swap,
reloader.fleet) run for real against a simulated process table, ready markers in a tmp dir, a recording
notifier and a fake bus (tests/fakes.py).

The documented end state of a failed reload (docs/failure-paths.md): the old generation serves with all
its workers, the new one is stopped, MAINPID names the old master, READY=1 was sent, the last STATUS= says
why in one line, the exit status is 1, and the records still name the old release live (the refused one
is listed as refused). After the hand-over the new generation serves: then the records name it live.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from configbed import cfg
from fakes import DBusError, FakeNotifier, FakeSystemd, ProcessTable, in_tmp, preflight_that, two_releases

from reloader import releases, swap
from reloader.config import AppConfig, parse
from reloader.engine import Refused
from reloader.swap import Swap

WORKERS = 4


@pytest.fixture(autouse=True)
def no_signal_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated masters handle every signal (no CPython coalescing): no need to space them."""
    monkeypatch.setattr(swap, "SIGNAL_GAP", 0.0)


class Host:
    """One app with release 1 live and release 2 in ``current``, its master running on the fake table."""

    def __init__(self, root: Path, **reload: Any) -> None:
        srv = root / "srv"
        for release in ("1", "2"):
            (srv / "releases" / release).mkdir(parents=True)
        (srv / "venv").mkdir()
        (srv / "current").symlink_to(srv / "releases" / "2")
        self.app: AppConfig = in_tmp(parse(cfg(
            {"working_directory": str(srv / "current"), "virtualenv": str(srv / "venv")},
            gunicorn={"workers": WORKERS}, reload={"bake_seconds": 0, "ready_timeout": 10, **reload})), root)
        Path(self.app.runtime_dir).mkdir(parents=True)
        releases.record_live(self.app, releases.Release(str(srv / "releases" / "1"), str(srv / "venv")))
        self.records = releases.read(self.app)
        self.table = ProcessTable(self.app)
        self.old = self.table.main
        self.n = FakeNotifier(self.old)
        self.bus: Callable[[], int] = lambda: self.n.main_pid
        self.preflight = preflight_that(self.table)
        self.health: Callable[..., tuple[int, str]] = lambda app, **_: (200, "")

    def swap(self) -> Swap:
        return Swap(self.app, self.old, self.n, lambda: self.bus(), processes=self.table,  # noqa: PLW0108 (read late)
                    health=lambda app, **kw: self.health(app, **kw), checker=self.preflight)

    def run(self, engine: Swap | None = None) -> int:
        return (engine or self.swap()).run()

    # --- the documented end states -------------------------------------------------------------------
    def assert_refused(self, rc: int, why: str) -> None:
        """Refused: the old generation serves as before, nothing of the new one is left, systemd was told."""
        status = self.n.statuses[-1]
        assert rc == 1, self.n.sent
        assert status.startswith("reload refused: release 2: ") and why in status, status
        assert "\n" not in status
        assert self.n.sent[-1] == "READY=1", self.n.sent[-3:]
        assert self.n.main_pid == self.old, "MAINPID does not name the old master"
        assert self.table.masters() == [self.old], f"still running: {self.table.masters()}"
        assert len(self.table.ready_workers_of(self.old)) == WORKERS, self.table.workers_of(self.old)
        assert releases.read(self.app).live == self.records.live, "the records changed what is live"
        assert releases.read(self.app).refused.get(self.records.live.release) is None
        assert not Path(self.app.boot_request).exists()
        left = sorted(p.name for p in Path(self.app.ready_dir).iterdir())
        assert left == [str(self.old)], f"ready markers of other masters left: {left}"

    def assert_refused_and_recorded(self, rc: int, why: str) -> None:
        self.assert_refused(rc, why)
        refused = releases.read(self.app).refused
        assert any(why in r.reason for r in refused.values()), refused

    def assert_deployed(self, rc: int) -> int:
        """The new generation serves alone and is recorded live; returns its master."""
        assert rc == 0, self.n.statuses[-3:]
        (new,) = self.table.masters()
        assert new != self.old and self.n.main_pid == new
        assert len(self.table.ready_workers_of(new)) == WORKERS
        assert releases.read(self.app).live.name == "2"
        assert self.n.statuses[-1].startswith("serving release 2, generation 2")
        assert self.n.sent[-1] == "READY=1"
        return new


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def lockstep(tmp_path: Path) -> Host:
    return Host(tmp_path, max_surge=1)


@pytest.fixture
def hup(tmp_path: Path) -> Host:
    return Host(tmp_path, strategy="hup")


# --- the simulation is faithful where it matters -----------------------------------------------------------
def test_a_reload_deploys_on_the_fake_host(host: Host) -> None:
    new = host.assert_deployed(host.run())
    assert host.table.procs[new].gate_seen_at is not None


def test_a_lockstep_reload_deploys_never_running_more_than_workers_plus_surge(lockstep: Host) -> None:
    peak = [0]
    original = lockstep.table.advance

    def counting(seconds: float) -> None:
        original(seconds)
        alive = sum(len(lockstep.table.workers_of(m)) for m in lockstep.table.masters())
        peak[0] = max(peak[0], alive)

    lockstep.table.advance = counting  # type: ignore[method-assign]
    lockstep.assert_deployed(lockstep.run())
    assert peak[0] <= WORKERS + 1, peak


def test_a_hup_reload_replaces_the_workers_of_the_same_master(hup: Host) -> None:
    before = hup.table.workers_of(hup.old)
    assert hup.run() == 0, hup.n.statuses[-3:]
    assert hup.table.masters() == [hup.old] and hup.n.main_pid == hup.old
    assert set(hup.table.ready_workers_of(hup.old)).isdisjoint(before)
    assert releases.read(hup.app).live.name == "2"


# --- each step refusing ------------------------------------------------------------------------------------
def test_a_refusing_preflight_keeps_the_gate_shut_and_the_old_generation(host: Host) -> None:
    """The new workers are ready long before the pre-flight refuses: the gate must stay shut."""
    host.preflight = preflight_that(host.table, refuses="ImportError: no module named x (app.py:1)", seconds=2)
    host.assert_refused_and_recorded(host.run(), "ImportError: no module named x")
    new = max(host.table.procs)
    while not host.table.procs[new].master:
        new -= 1
    assert host.table.procs[new].gate_seen_at is None, "the gate opened before the pre-flight passed"
    assert (host.table.clock, new, "SIGQUIT") in host.table.log or any(
        pid == new and what == "SIGQUIT" for _, pid, what in host.table.log), "a gated generation is QUIT"


def test_the_old_master_ignoring_usr2_is_refused(host: Host) -> None:
    host.table.usr2_ignored = True
    host.assert_refused_and_recorded(host.run(), "did not start a new master within 30 s")


def test_workers_that_never_load_the_app_are_refused(host: Host) -> None:
    host.table.never_ready = True
    host.assert_refused_and_recorded(host.run(), "of 4 workers loaded the app within ready_timeout")


def test_a_new_master_dying_while_booting_is_refused(host: Host) -> None:
    host.table.never_ready = True
    host.table.master_dies_at = 1.0
    host.assert_refused_and_recorded(host.run(), "the new generation exited while booting")


def test_a_gate_that_cannot_be_opened_is_refused(host: Host) -> None:
    host.table.gate_blocked = True
    host.assert_refused_and_recorded(host.run(), "cannot open the gate")


def test_an_unhealthy_bake_rolls_back(tmp_path: Path) -> None:
    host = Host(tmp_path, bake_seconds=0.2)
    host.health = lambda app, **_: (500, "")
    host.assert_refused_and_recorded(host.run(), "answered 500 during the bake")


def test_a_new_master_dying_during_the_bake_rolls_back(tmp_path: Path) -> None:
    host = Host(tmp_path, bake_seconds=1)

    def health_then_die(app: AppConfig, **_: Any) -> tuple[int, str]:
        newest = max(host.table.masters())
        if newest != host.old:
            host.table.exit(newest)
        return 200, ""

    host.health = health_then_die
    host.assert_refused_and_recorded(host.run(), "died during the bake")


def test_systemd_not_taking_mainpid_rolls_back(host: Host) -> None:
    host.bus = lambda: host.old  # NotifyAccess= not letting the helper hand over
    host.assert_refused_and_recorded(host.run(), "systemd did not accept MAINPID=")


# --- lockstep: the old master gets its workers back before the new one goes ----------------------------------
def test_a_new_worker_dying_in_the_lockstep_trade_restores_the_old_master(lockstep: Host) -> None:
    table = lockstep.table
    original = table.advance
    killed: list[int] = []

    def a_new_worker_dies_once_the_trade_began(seconds: float) -> None:
        original(seconds)
        new = [m for m in table.masters() if m != lockstep.old]
        if not killed and new and table.procs[new[0]].workers >= 2 and table.ready_workers_of(new[0]):
            killed.append(table.ready_workers_of(new[0])[0])
            table.exit(killed[0])

    table.advance = a_new_worker_dies_once_the_trade_began  # type: ignore[method-assign]
    lockstep.assert_refused_and_recorded(lockstep.run(), "new worker(s) died during the lockstep swap")
    assert killed and any(what == "SIGTTIN" and pid == lockstep.old for _, pid, what in table.log), killed


def test_workers_that_never_load_in_lockstep_leave_the_old_master_whole(lockstep: Host) -> None:
    lockstep.table.never_ready = True
    lockstep.assert_refused_and_recorded(lockstep.run(), "of 1 workers loaded the app within ready_timeout")


# --- any exception, not only a refusal, at every step --------------------------------------------------------
STEPS_BEFORE_THE_HAND_OVER = ["spawn_new_generation", "wait_ready", "open_gate", "trade_workers", "bake",
                              "hand_over"]
FAILURES: dict[str, Callable[[], BaseException]] = {
    "Refused": lambda: Refused("injected refusal"),
    "OSError": lambda: OSError(errno.EIO, "injected I/O error"),
    "DBusError": lambda: DBusError("org.freedesktop.DBus.Error.NoReply: injected"),
}


def fail_after(engine: Swap, step: str, failure: BaseException) -> None:
    """Make *step* of *engine* do its work, then raise *failure* (the harder case: more to undo)."""
    real = getattr(engine, step)

    def failing(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise failure

    setattr(engine, step, failing)


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize(("surge", "step"), [
    pytest.param(surge, step, id=f"{'lockstep' if surge else 'gated'}-{step}")
    for surge in (0, 1) for step in STEPS_BEFORE_THE_HAND_OVER
    if surge or step != "trade_workers"  # the gated generation (surge 0) has no trade
])
def test_an_exception_at_any_step_before_the_hand_over_rolls_back(tmp_path: Path, surge: int, step: str,
                                                                   failure: str) -> None:
    host = Host(tmp_path, max_surge=surge, bake_seconds=0.05 if step == "bake" else 0)
    engine = host.swap()
    fail_after(engine, step, FAILURES[failure]())
    why = "injected refusal" if failure == "Refused" else f"unexpected {failure}:"
    host.assert_refused_and_recorded(host.run(engine), why)


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_bus_error_confirming_the_hand_over_rolls_back_and_names_the_old_master_again(
        host: Host, failure: str) -> None:
    """MAINPID= went out, then asking systemd whether it took it failed: the old master is named again."""
    def broken_bus() -> int:
        raise FAILURES[failure]()

    host.bus = broken_bus
    rc = host.run()
    host.assert_refused(rc, "injected")
    mainpids = [s for s in host.n.sent if s.startswith("MAINPID=")]
    assert mainpids[-1] == f"MAINPID={host.old}" and len(mainpids) == 2, mainpids


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("step", ["retire_old_generation", "confirm"])
def test_an_exception_after_the_hand_over_leaves_the_new_generation_serving_and_recorded(
        host: Host, step: str, failure: str) -> None:
    """Past the hand-over there is no going back: the records must say what serves (the new release)."""
    engine = host.swap()
    fail_after(engine, step, FAILURES[failure]())
    rc = host.run(engine)
    assert rc == 1
    (new,) = host.table.masters()
    assert new != host.old and host.n.main_pid == new
    assert releases.read(host.app).live.name == "2", "the records say the old release serves"
    status = host.n.statuses[-1]
    assert status.startswith(f"serving release 2 (master {new}), but: ") and "injected" in status, status
    assert host.n.sent[-1] == "READY=1"


def test_an_exception_before_the_old_master_got_term_still_retires_it(host: Host) -> None:
    engine = host.swap()

    def failing() -> None:
        raise OSError(errno.EIO, "injected before the TERM")

    engine.retire_old_generation = failing  # type: ignore[method-assign]
    assert host.run(engine) == 1
    host.table.wait_for(lambda: host.old not in host.table.masters(), 60)
    assert host.table.masters() != [host.old] and len(host.table.masters()) == 1, host.table.masters()
    assert releases.read(host.app).live.name == "2"


def test_a_rollback_step_failing_does_not_skip_the_next(lockstep: Host) -> None:
    """Restoring the old master's workers fails: the new master must still be stopped."""
    engine = lockstep.swap()
    fail_after(engine, "trade_workers", OSError(errno.EIO, "injected"))

    def restore_fails() -> None:
        raise DBusError("injected in the restore")

    engine.restore_old_generation = restore_fails  # type: ignore[method-assign]
    rc = lockstep.run(engine)
    assert rc == 1 and lockstep.n.sent[-1] == "READY=1"
    assert lockstep.table.masters() == [lockstep.old], "the new master was left running"
    assert lockstep.n.main_pid == lockstep.old


# --- a dead master, before anything started ---------------------------------------------------------------
def test_a_dead_main_pid_is_refused_without_touching_anything(host: Host) -> None:
    host.table.exit(host.old)
    rc = host.run()
    assert rc == 1 and "is not running; start the service instead" in host.n.statuses[-1]
    assert host.n.sent[-1] == "READY=1"
    assert releases.read(host.app) == host.records
    assert not [what for _, _, what in host.table.log if what.startswith("SIG")]


# --- hup: one master, its workers replaced ---------------------------------------------------------------------
def test_hup_with_a_refusing_preflight_sends_no_signal(hup: Host) -> None:
    hup.preflight = preflight_that(hup.table, refuses="SyntaxError (app.py:3)")
    hup.assert_refused_and_recorded(hup.run(), "SyntaxError")
    assert not [what for _, _, what in hup.table.log if what == "SIGHUP"]


@pytest.mark.parametrize("failure", list(FAILURES))
def test_hup_failing_to_signal_is_refused_with_the_master_untouched(hup: Host, failure: str) -> None:
    def broken(pid: int, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            raise FAILURES[failure]()

    hup.table.on_send = broken
    hup.assert_refused_and_recorded(hup.run(), "injected")


def test_hup_workers_that_never_load_are_refused_and_systemd_told(hup: Host) -> None:
    """HUP has no second generation to fall back to: refused, READY=1, the master and MAINPID unchanged."""
    hup.table.never_ready = True
    rc = hup.run()
    assert rc == 1 and hup.n.sent[-1] == "READY=1" and hup.n.main_pid == hup.old
    assert "of 4 workers loaded the app within ready_timeout" in hup.n.statuses[-1]
    assert releases.read(hup.app).live == hup.records.live


# --- a helper killed mid-reload: the next reload cleans up first ---------------------------------------------
def leave_a_stray_generation(host: Host) -> int:
    """What a helper SIGKILLed while the new workers boot leaves: a gated new master, child of the old."""
    releases.write_boot_request(host.app, host.old, releases.Release(str(Path(host.app.working_directory).resolve()),
                                                                     ""), dict(os.environ), gated=True)
    host.table.send(host.old, signal.SIGUSR2)
    host.table.advance(0.05)
    (stray,) = [m for m in host.table.masters() if m != host.old]
    return stray


def test_the_next_reload_stops_a_stray_generation_and_deploys(host: Host) -> None:
    """The stray exits and becomes a zombie; its parent reaps it only when it next handles signals, and
    with SIGCHLD and USR2 both pending it handles USR2 first ("Child exists", ignored). The helper must
    wait for the reap, not just for the exit (the flaky killed-helper test on a loaded host)."""
    stray = leave_a_stray_generation(host)
    new = host.assert_deployed(host.run())
    assert new != stray, "the reload adopted the stray generation the killed helper started"
    assert not [entry for entry in host.table.log if entry[2].startswith("USR2 ignored")], host.table.log
    assert host.table.procs[stray].state == "reaped"


def test_a_stray_after_an_interrupted_lockstep_swap_gets_the_old_workers_back(lockstep: Host) -> None:
    engine = lockstep.swap()
    lockstep.table.master_dies_at = None

    def killed_helper() -> None:  # the helper dies mid-trade: the TTOUs happened, nothing was undone
        raise SystemExit("SIGKILL")

    real_wait = engine.wait_ready
    calls = [0]

    def wait_then_die(*args: Any, **kwargs: Any) -> None:
        real_wait(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            killed_helper()

    engine.wait_ready = wait_then_die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        engine.run()
    assert len(lockstep.table.workers_of(lockstep.old)) < WORKERS
    (stray,) = [m for m in lockstep.table.masters() if m != lockstep.old]
    lockstep.n = FakeNotifier(lockstep.old)
    signalled = len(lockstep.table.log)
    new = lockstep.assert_deployed(lockstep.run())
    assert new != stray, "the reload adopted the stray generation the killed helper started"
    after = [(pid, what) for _, pid, what in lockstep.table.log[signalled:]]
    assert after.index((lockstep.old, "SIGTTIN")) < after.index((stray, "SIGTERM")), after


def test_a_stray_new_master_whose_parent_is_pid_1_is_found_by_its_heir_marker_and_stopped(host: Host) -> None:
    """pre_exec detaches the new master (systemd's child, so MAINPID= draws no warning): a stray one is not
    a child of the old master, and the clean-up finds it by ready/STRAY/heir-of instead."""
    stray = leave_a_stray_generation(host)
    assert host.table.ppid(stray) == 1 and stray not in host.table.children(host.old)
    assert (Path(host.app.ready_dir) / str(stray) / "heir-of").read_text() == str(host.old)
    new = host.assert_deployed(host.run())
    assert new != stray and host.table.procs[stray].state == "reaped"
    assert f"stopping stray new master {stray} left by an interrupted reload" in host.n.statuses
    assert (stray, "SIGTERM") in [(pid, what) for _, pid, what in host.table.log]


def test_a_helper_killed_after_the_hand_over_leaves_an_old_master_the_next_reload_retires(host: Host) -> None:
    """Killed between MAINPID= and retiring: MainPID is the detached new master (parent PID 1), and the
    master it succeeds, named in its ready directory, still runs; the next reload retires that first."""
    engine = host.swap()

    def killed() -> None:
        raise SystemExit("SIGKILL")

    engine.retire_old_generation = killed  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        engine.run()
    main, old = engine.new, host.old
    assert host.n.main_pid == main and host.table.ppid(main) == 1 and host.table.alive(old)
    host.old, host.n = main, FakeNotifier(main)
    new = host.assert_deployed(host.run())
    assert f"retiring old master {old} left by an interrupted reload" in host.n.statuses
    assert not host.table.alive(old) and new != main


def test_a_new_master_that_was_not_detached_is_still_found_by_its_parent(host: Host) -> None:
    """A failed fork in pre_exec (or a gunicorn config rendered before the detach) leaves the new master the
    old one's child, without a heir-of marker: the swap and the stray clean-up still find it."""
    host.table.detach = False
    stray = leave_a_stray_generation(host)
    assert host.table.ppid(stray) == host.old
    new = host.assert_deployed(host.run())
    assert host.table.ppid(new) == 1 and host.table.procs[stray].state == "reaped"


# --- blue-green and rolling (reloader.fleet) --------------------------------------------------------------------
class FleetHost:
    """An app of two colours (or three rolling instances), every instance on release 1, deploying release 2."""

    def __init__(self, root: Path, strategy: str = "blue-green", analysis: dict | None = None, **reload: Any) -> None:
        srv, self.old_release, self.new_release = two_releases(root)
        self.app = in_tmp(parse(cfg(
            {"working_directory": str(srv / "current"), "virtualenv": str(srv / "venv")},
            gunicorn={"workers": 2}, reload={"strategy": strategy, "bake_seconds": 0, "ready_timeout": 10,
                                             **reload}, analysis=analysis or {})), root)
        self.table = ProcessTable(self.app, workers=1)
        self.sd = FakeSystemd(self.app, self.table)
        self.n = FakeNotifier(0)
        self.preflight = preflight_that(self.table)
        self.health: Callable[..., tuple[int, str]] = lambda app, **_: (200, "")
        fleet = self.fleet()
        for instance in self.app.instance_names:
            fleet.pin(instance, self.old_release)
        fleet.bring_up()
        self.records = releases.read(self.app)
        assert self.records.live is not None and self.records.live.release == self.old_release

    def fleet(self) -> Any:
        from reloader.fleet import Fleet

        def health(app: AppConfig, socket_path: str = "", **kw: Any) -> tuple[int, str]:
            self.sd.connect(socket_path)  # socket activation, as a real request would
            return self.health(app, socket_path=socket_path, **kw)

        return Fleet(self.app, self.sd, self.n, processes=self.table,  # type: ignore[arg-type]
                     health=health, checker=self.preflight)

    def deploy(self) -> BaseException | None:
        try:
            self.fleet().deploy()
        except Exception as e:
            return e
        return None

    def routes(self) -> dict[str, str]:
        fleet = self.fleet()
        return {slot: fleet.routed(slot) for slot in self.app.route_slots}

    def assert_blue_still_serves(self, failure: BaseException | None, why: str) -> None:
        assert failure is not None, "the deploy did not fail"
        assert why in str(failure) or why in repr(failure), failure
        assert self.routes() == {"live": "blue"}, self.routes()
        assert self.sd.running() == ["blue"], self.sd.running()
        assert self.fleet().pinned("blue") == self.old_release
        records = releases.read(self.app)
        assert records.live == self.records.live
        assert self.new_release in records.refused, records.refused


@pytest.fixture
def blue_green(tmp_path: Path) -> FleetHost:
    return FleetHost(tmp_path)


@pytest.fixture
def rolling(tmp_path: Path) -> FleetHost:
    return FleetHost(tmp_path, "rolling")


def test_blue_green_deploys_on_the_fake_host(blue_green: FleetHost) -> None:
    assert blue_green.deploy() is None
    assert blue_green.routes() == {"live": "green"} and blue_green.sd.running() == ["green"]
    assert releases.read(blue_green.app).live.release == blue_green.new_release


def test_blue_green_with_a_refusing_preflight_starts_nothing(blue_green: FleetHost) -> None:
    blue_green.preflight = preflight_that(blue_green.table, refuses="ImportError (app.py:1)")
    blue_green.assert_blue_still_serves(blue_green.deploy(), "ImportError")
    assert ("start", "flaskapp@green.service") not in blue_green.sd.jobs


@pytest.mark.parametrize(("fault", "why"), [
    ("start job failed", "failed to start (job failed)"),
    ("died booting", "while booting"),
    ("never ready", "not all 2 workers loaded the app within ready_timeout"),
    ("unhealthy", "answered 503"),
])
def test_blue_green_refuses_an_idle_colour_that_does_not_come_up(blue_green: FleetHost, fault: str,
                                                                 why: str) -> None:
    if fault == "start job failed":
        blue_green.sd.fail_start.add("green")
    elif fault == "died booting":
        blue_green.sd.dies_booting.add("green")
    elif fault == "never ready":
        blue_green.table.never_ready = True
    else:
        blue_green.health = lambda app, socket_path="", **_: (503 if "green" in socket_path else 200, "")
    blue_green.assert_blue_still_serves(blue_green.deploy(), why)


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("step", ["start_idle", "switch", "bake"])
def test_blue_green_any_exception_before_the_retire_switches_back(tmp_path: Path, step: str,
                                                                  failure: str) -> None:
    from reloader import fleet

    host = FleetHost(tmp_path)
    real = getattr(fleet.BlueGreen, step)

    calls = [0]

    def failing(self: Any, *args: Any) -> None:  # the first call (the roll back switches back with it)
        real(self, *args)
        calls[0] += 1
        if calls[0] == 1:
            raise FAILURES[failure]()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fleet.BlueGreen, step, failing)
        host.assert_blue_still_serves(host.deploy(), "injected")


@pytest.mark.parametrize("judged", [True, False])
def test_blue_green_a_bus_error_in_the_bake_switches_back(tmp_path: Path, judged: bool) -> None:
    """The bake: with the analysis, the canary route's before the switch; without, after it."""
    host = FleetHost(tmp_path, bake_seconds=0.3, analysis={"enabled": judged})
    calls = [0]
    real_state = host.sd.state

    def baking() -> bool:
        return host.fleet().routed("canary" if judged else "live") == "green" and host.routes() == {
            "live": "blue" if judged else "green"}

    def state_then_broken(name: str) -> Any:
        calls[0] += 1
        if baking() and calls[0] > 1:
            raise DBusError("org.freedesktop.DBus.Error.NoReply: injected")
        return real_state(name)

    host.sd.state = state_then_broken  # type: ignore[method-assign]
    failure = host.deploy()
    host.sd.state = real_state  # type: ignore[method-assign]
    host.assert_blue_still_serves(failure, "injected")


def test_blue_green_failing_to_retire_the_old_colour_records_the_new_one_live(blue_green: FleetHost) -> None:
    from reloader.fleet import ServingBut

    real_stop = blue_green.sd.stop_unit

    def stop(name: str, *, timeout: float) -> str:
        if "blue" in name:
            raise DBusError("injected while stopping blue")
        return real_stop(name, timeout=timeout)

    blue_green.sd.stop_unit = stop  # type: ignore[method-assign]
    failure = blue_green.deploy()
    assert isinstance(failure, ServingBut) and "serves on green" in str(failure), failure
    assert blue_green.routes() == {"live": "green"}
    assert releases.read(blue_green.app).live.release == blue_green.new_release


def test_rolling_deploys_on_the_fake_host(rolling: FleetHost) -> None:
    assert rolling.deploy() is None
    fleet = rolling.fleet()
    assert {i: fleet.pinned(i) for i in rolling.app.instance_names} == dict.fromkeys(("1", "2", "3"),
                                                                                      rolling.new_release)
    assert rolling.routes() == {"1": "1", "2": "2", "3": "3"}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_rolling_an_exception_restarting_an_instance_restores_it(rolling: FleetHost, failure: str) -> None:
    """Instance 2 fails on the new release: it is back on release 1, every route points at its own
    instance again, and the deploy is refused and recorded (instance 1 runs the new release: documented)."""
    real = rolling.sd.restart_unit
    failed = []

    def restart(name: str, *, timeout: float) -> str:
        if "@2." in name and not failed:
            failed.append(name)
            raise FAILURES[failure]()
        return real(name, timeout=timeout)

    rolling.sd.restart_unit = restart  # type: ignore[method-assign]
    result = rolling.deploy()
    assert isinstance(result, Refused) and "instance 2: " in str(result) and "injected" in str(result), result
    fleet = rolling.fleet()
    assert fleet.pinned("2") == rolling.old_release and fleet.pinned("3") == rolling.old_release
    assert rolling.routes() == {"1": "1", "2": "2", "3": "3"}
    assert rolling.sd.running() == ["1", "2", "3"]
    assert rolling.new_release in releases.read(rolling.app).refused


@pytest.mark.parametrize("failure", list(FAILURES))
def test_rolling_an_exception_while_draining_puts_the_route_back(rolling: FleetHost, failure: str) -> None:
    from reloader import fleet

    real = fleet.Fleet.drained

    def drained(self: Any, instance: str) -> None:
        real(self, instance)
        if instance == "2":
            raise FAILURES[failure]()

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fleet.Fleet, "drained", drained)
        result = rolling.deploy()
    assert result is not None and "injected" in str(result), result
    assert rolling.routes() == {"1": "1", "2": "2", "3": "3"}
    assert rolling.fleet().pinned("2") == rolling.old_release


def test_the_controller_reports_a_bus_error_in_one_status_line(blue_green: FleetHost,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """fleet.run: a D-Bus error (not Refused, Failed or OSError) still ends as one STATUS= line, exit 1."""
    from contextlib import nullcontext

    from reloader import fleet

    Path(blue_green.app.upstream_path).unlink()  # the deploy rewrites it and asks nginx's state: that fails
    blue_green.sd.raise_on["state"] = DBusError("org.freedesktop.DBus.Error.Disconnected: injected")
    monkeypatch.setattr(fleet, "Systemd", lambda timeout: nullcontext(blue_green.sd))
    monkeypatch.setattr(fleet, "Notifier", lambda name: blue_green.n)
    assert fleet.run(blue_green.app, "deploy") == 1
    status = blue_green.n.statuses[-1]
    assert status.startswith("reload refused: unexpected DBusError: ") and "injected" in status, status
