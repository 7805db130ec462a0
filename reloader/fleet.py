"""Blue/green and rolling deploys over several instances (``NAME@INSTANCE.service``) behind nginx.

The controller unit ``NAME.service`` runs these as root: ``ExecStart=`` brings the instances up,
``ExecReload=`` deploys. The same guarantees as the single-master engine (reloader.swap): a pre-flight
before anything is touched, every instance health-checked *on its own socket* before it gets traffic,
and a failure puts things back as they were.

Traffic is switched without reloading nginx (a reload closes every idle client keep-alive connection):
nginx's upstream names *routes*, stable socket paths under ``STATE_DIR/NAME/routes/`` that are symlinks
to an instance's socket. Re-pointing one is a rename(2): connect() resolves the path at every new
connection, so new connections follow at once, while requests in flight and nginx's idle upstream
keep-alive connections stay on the old instance until it drains (a keep-alive connection it closes is
retried by nginx on a new one, ``proxy_next_upstream error``). The routes *are* the routing state:
which colour is live is read from them, never from a file that could disagree.

    blue-green: pre-flight → start idle colour on the new release → ready + health on its socket
                → switch the live route → bake (rollback = switch back) → retire the old colour
    rolling:    pre-flight → for each instance: drain (its route → another instance)
                → replace it (restart on the new release, ready + health) → restore its route.
                A failure restores that instance's old release.

With the traffic analysis ([analysis], reloader.traffic; on by default) nginx's upstream also names a
weighted ``canary`` route. It points at a serving instance, except while a deploy judges a new one: then
the new instance serves canary / (serving + canary) of the requests (the weights of AppConfig.canary_weights)
beside the old ones, in the same seconds, and is compared with them:

    blue-green: … ready + health → canary route → the new colour: bake = judge it against the live colour
                → passed: switch the live route (and the canary) → retire the old colour
                → regression: the canary route back, stop the new colour (the live route never moved)
    rolling:    the first instance, replaced, is judged through the canary route (its own route still points
                at a peer) against the instances on the old release; a regression restarts it on its old
                release. The others then roll as before: they run the release just judged.

What was deployed goes into the same records as the single-master strategies (reloader.releases): the
release live after a switch or a completed roll, the one it replaced (previous), and a refused release
with its reason (a deploy refused, or rolled back during the bake). `reloader releases`, `status` and
`rollback NAME RELEASE` read them; the instances' own symlinks stay what they boot.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import proc, releases, traffic
from .bus import Systemd
from .config import AppConfig
from .engine import (
    WARNING,
    Notifier,
    Preflight,
    Refused,
    exclusive,
    health,
    ready_workers,
    reason,
    release_of,
)
from .errors import Failed
from .proc import ProcessTable
from .render import upstream

NGINX = "nginx.service"


class ServingBut(Failed):
    """The deploy's switch happened and the new release serves (and is recorded live); a later step failed."""


class Fleet:
    """The instances of one app, the routes nginx reaches them through, and the records. Each step
    reports through STATUS=; the strategies below are made of these steps."""

    def __init__(self, app: AppConfig, sd: Systemd, n: Notifier, since_ns: int = 0, *,
                 processes: ProcessTable = proc, health: Callable[..., tuple[int, str]] = health,
                 checker: type[Preflight] = Preflight) -> None:
        """The collaborators after * are the real ones by default; the host tests (tests/fakes.py) pass a
        simulated process table, health check and pre-flight (*sd* is a fake bus there)."""
        self.app, self.sd, self.n = app, sd, n
        self.proc, self.health, self.checker = processes, health, checker
        #: Blue-green: the colour this deploy switched to and baked (from then on there is no going back).
        self.switched = ""
        self.state_path = Path(app.fleet_state_path)
        #: When this operation took the lock: a rollback request older than that was meant for another.
        self.since_ns = since_ns
        #: The deploy's traffic analysis (reloader.traffic), once a canary was judged.
        self.analysis: traffic.Analysis | None = None
        #: The serving instances' request counters when the deploy started (the old side's baseline).
        self.baseline: dict[int, traffic.Stats] = {}
        #: The refusal the analysis raised: it is told with what still serves.
        self.verdict_error: Exception | None = None

    # --- routes: what nginx sends traffic to ----------------------------------------------------------
    def routed(self, slot: str) -> str:
        """The instance *slot*'s route points at ("" when it points nowhere known)."""
        try:
            target = os.readlink(self.app.route(slot))
        except OSError:
            return ""
        return next((i for i in self.app.instance_names if self.app.instance_socket(i) == target), "")

    def point(self, slot: str, instance: str) -> None:
        """Re-point the route *slot* at *instance*'s socket, atomically (rename(2) over the old link)."""
        link = Path(self.app.route(slot))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.parent.chmod(0o755)  # nginx's workers resolve the links
        tmp = link.with_name(f".{link.name}.new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.app.instance_socket(instance))
        os.replace(tmp, link)

    def live(self) -> list[str]:
        """The instances a route points at, in order; before the first routes exist, what the
        pre-route layout's upstream include named, else blue (blue-green) or every instance."""
        routed = {self.routed(slot) for slot in self.app.route_slots} - {""}
        if not routed:
            routed = set(_legacy_upstream(self.app)) or set(self.initial())
        return [i for i in self.app.instance_names if i in routed]

    def initial(self) -> tuple[str, ...]:
        return self.app.instance_names[:1] if self.app.strategy.one_live_instance else self.app.instance_names

    def state(self) -> dict:
        """What `reloader status` shows: the live instances (from the routes) and the generation."""
        try:
            generation = int(json.loads(self.state_path.read_text()).get("generation", 1))
        except (OSError, ValueError, AttributeError):
            generation = 1
        return {"live": self.live(), "generation": generation}

    def save_generation(self, generation: int) -> None:
        _write(self.state_path, json.dumps({"generation": generation}, indent=2) + "\n")

    def ensure_upstream(self) -> None:
        """nginx's upstream names the routes. An older reloader named the instances' sockets there and
        rewrote it (with an nginx reload) at every deploy: point the routes at what that file routed to,
        then replace it and reload nginx once. Later deploys find it as rendered and never reload nginx."""
        path = Path(self.app.upstream_path)
        want = upstream(self.app)
        try:
            old = path.read_text()
        except FileNotFoundError:
            old = None
        if old == want:
            return
        live = self.live()
        for slot in self.app.route_slots:
            if not self.routed(slot):
                self.point(slot, slot if slot in live else live[0])
        if self.app.canary_route and not self.routed("canary"):
            self.point("canary", live[0])
        self.n.status(f"pointing nginx's upstream at the routes in {os.path.dirname(self.app.route('live'))} "
                      "(once, after an upgrade or a change of instances)")
        _write(path, want)
        try:
            self.reload_nginx()
        except Refused:
            if old is not None:
                _write(path, old)
            raise

    def reload_nginx(self) -> None:
        if not self.sd.state(NGINX).running:
            return  # nginx reads the file when it starts
        result = self.sd.reload_unit(NGINX, timeout=120)
        if result != "done":
            raise Refused(f"nginx reload failed (job {result}); see journalctl -u nginx")

    # --- releases ---------------------------------------------------------------------------------------
    def pinned(self, instance: str) -> str:
        """The release directory *instance* runs (or will run when started)."""
        try:
            return os.readlink(self.app.instance_link(instance))
        except OSError:
            return ""

    def pin(self, instance: str, release_dir: str) -> None:
        link = Path(self.app.instance_link(instance))
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{instance}.new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(release_dir)
        os.replace(tmp, link)

    def target(self) -> str:
        """The release being deployed: where the configured working directory points now."""
        return os.path.realpath(self.app.working_directory)

    def record_live(self, release_dir: str) -> None:
        releases.record_live(self.app, releases.Release(release_dir, releases.resolve_virtualenv(self.app)))

    def seed_records(self) -> None:
        """No records yet (first start, or an app installed before reloader kept them): what the live
        instances are pinned to is live."""
        pinned = self.pinned(self.live()[0])
        if pinned and releases.read(self.app).live is None:
            self.record_live(pinned)

    # --- instances ---------------------------------------------------------------------------------------
    def start(self, instance: str, *, restart: bool = False) -> None:
        """(Re)start *instance* on its pinned release and wait until it is ready on its own socket."""
        unit = self.app.instance_unit(instance)
        self.n.status(f"{'restarting' if restart else 'starting'} {unit} on release "
                      f"{os.path.basename(self.pinned(instance))}")
        timeout = self.app.ready_timeout + self.app.graceful_timeout + 30
        self.sd.start_unit(f"{self.app.name}@{instance}.socket", timeout=60)
        result = (self.sd.restart_unit if restart else self.sd.start_unit)(unit, timeout=timeout)
        if result != "done":
            raise Refused(f"{unit} failed to start (job {result}); see journalctl -u {unit}")
        self.wait_ready(instance)

    def stop(self, instance: str) -> None:
        unit = self.app.instance_unit(instance)
        self.n.status(f"stopping {unit} gracefully (in-flight requests finish)")
        self.sd.stop_unit(unit, timeout=self.app.graceful_timeout + 30)

    def running(self, instance: str) -> bool:
        return self.sd.state(self.app.instance_unit(instance)).running

    def wait_ready(self, instance: str) -> None:
        """Every worker has loaded the app, and the health path answers on the instance's own socket."""
        unit = self.app.instance_unit(instance)
        ready_dir = Path(self.app.instance_ready_dir(instance))
        want = self.app.workers

        def ready() -> bool:
            st = self.sd.state(unit)
            if st.active_state != "active":
                raise Refused(f"{unit} is {st.active_state} while booting; see journalctl -u {unit}")
            return len(ready_workers(ready_dir, st.main_pid, self.proc)) >= want

        if not self.proc.wait_for(ready, self.app.ready_timeout, interval=0.1, tick=self.n.extend):
            raise Refused(f"{unit}: not all {want} workers loaded the app within ready_timeout")
        self.check_health(instance)

    def check_health(self, instance: str, rounds: int = 3) -> None:
        socket = self.app.instance_socket(instance)
        for _ in range(rounds):
            status, error = self.health(self.app, socket_path=socket)
            if not self.app.health_ok(status):
                raise Refused(f"{self.app.instance_unit(instance)}: {self.app.health_path} on {socket} "
                              f"{'answered ' + str(status) if status else 'failed: ' + error}")

    def drained(self, instance: str) -> None:
        """Wait until *instance* has accepted every connection made to it before its route moved away.

        Its listening socket (held by systemd) queues connections first come, first served: once a health
        request sent now is answered, every connection queued before it was accepted, so a graceful stop
        finishes them (one still queued at the stop would stay in the socket and start the instance again).
        """
        time.sleep(0.05)  # a connect() that resolved the route just before the rename is queued by now
        deadline = time.monotonic() + self.app.graceful_timeout
        while time.monotonic() < deadline:
            status, _ = self.health(self.app, socket_path=self.app.instance_socket(instance))
            if status or not self.running(instance):
                return
            self.n.extend()
            time.sleep(0.2)

    # --- `reloader rollback` while a deploy runs -------------------------------------------------------
    def rollback_requested(self) -> bool:
        """`reloader rollback` asked this deploy to switch back (a request from before this deploy took
        the lock was meant for an earlier one, whose rollback command removes it when that one ends)."""
        try:
            requested = Path(self.app.rollback_request).stat().st_mtime_ns >= self.since_ns
        except FileNotFoundError:
            return False
        if requested:
            Path(self.app.rollback_request).unlink(missing_ok=True)
        return requested

    # --- `reloader rollback` after a deploy --------------------------------------------------------------
    def rollback(self) -> str:
        """Blue-green: switch back to the other colour's release (starting it again if it was stopped)."""
        if not self.app.strategy.instant_rollback:
            raise Refused("rollback switches colours: only for strategy = \"blue-green\"")
        bg = BlueGreen(self)
        live, other = bg.colours()
        if not self.pinned(other):
            raise Refused(f"there is no previous release to roll back to ({other} never ran)")
        self.start(other, restart=self.running(other))
        bg.switch(live, other)
        self.record_live(self.pinned(other))
        bg.retire(live)
        return self.describe()

    # --- controller ExecStart= ----------------------------------------------------------------------------
    def bring_up(self) -> str:
        """Start the live instances on their pinned releases and point their routes at them (after a
        reboot, a controller restart, or an interrupted deploy that left a route elsewhere)."""
        live = self.live()
        for instance in live if self.app.strategy.one_live_instance else self.app.instance_names:
            if not self.pinned(instance):
                self.pin(instance, self.target())
            self.start(instance)
        for slot in self.app.route_slots:
            self.point(slot, live[0] if slot == "live" else slot)
        if self.app.canary_route:
            self.point("canary", live[0])
        self.ensure_upstream()
        self.seed_records()
        return self.describe()

    def describe(self) -> str:
        state = self.state()
        pins = ", ".join(f"{i}={os.path.basename(self.pinned(i)) or '-'}" for i in state["live"])
        return (f"serving generation {state['generation']} on {', '.join(state['live'])} "
                f"(releases {pins}, {self.app.workers} workers each)")

    # --- controller ExecReload= --------------------------------------------------------------------------
    def deploy(self) -> str:
        target = self.target()
        self.seed_records()
        self.ensure_upstream()  # not the release's fault if this fails: not recorded as refused
        if self.app.canary_route:  # the old side's requests count from here (see traffic.Analysis.measure)
            self.baseline = traffic.read_sources([self.source(i) for i in self.live() if self.running(i)])
        try:
            self.checker(self.app, self.n, as_app_user=os.geteuid() == 0).result()
            (BlueGreen(self) if self.app.strategy.one_live_instance else Rolling(self)).run()
        except Exception as e:  # a bus error or an OSError is a refused deploy too: recorded, then reported
            if self.switched and self.routed("live") == self.switched:  # baked: the new release serves
                self.record_live(target)
                raise ServingBut(f"release {os.path.basename(target)} serves on {self.switched}, but: "
                                 f"{reason(e)}") from e
            releases.record_refused(self.app, target, reason(e))
            if e is self.verdict_error:  # worded as strategy "generation" words it
                raise type(e)(f"{e}; still serving {self.serving()}") from None
            raise
        self.record_live(target)
        self.save_generation(self.state()["generation"] + 1)
        outcome = self.analysis.outcome if self.analysis else ""
        return self.describe() + (f"; {outcome}" if outcome else "")

    def serving(self) -> str:
        """What serves now, for a refusal: ``release 6 (blue)``, ``release 6 (instances 1, 2, 3)``."""
        live = self.live()
        pins = sorted({os.path.basename(self.pinned(i)) or "-" for i in live})
        where = live[0] if self.app.strategy.one_live_instance else f"instances {', '.join(live)}"
        return f"release {', '.join(pins)} ({where})"

    # --- the canary route and the traffic analysis ([analysis], reloader.traffic) ---------------------------
    def source(self, instance: str) -> traffic.Source:
        """Where *instance*'s workers publish their request counters: its ready directory and master."""
        return Path(self.app.instance_ready_dir(instance)), self.sd.state(self.app.instance_unit(instance)).main_pid

    def judge(self, new: str, old: list[str], who: str) -> None:
        """The bake of *new*, which the canary route points at: its requests against the *old* instances'
        on the same traffic in the same seconds (reloader.traffic.Analysis), with its health checked and
        `reloader rollback` heard. Returns once it passed (or too little traffic proceeds); raises a
        refusal otherwise. At least bake_seconds, at most [analysis] timeout."""
        app = self.app
        serving, canary = app.canary_weights
        total = serving * len(app.route_slots) + canary
        unit = app.instance_unit(new)
        main_pid = self.sd.state(unit).main_pid
        analysis = self.analysis = traffic.Analysis(
            app, os.path.basename(self.target()), [self.source(i) for i in old],
            [(Path(app.instance_ready_dir(new)), main_pid)], canary=canary, workers=serving, say=self.n.status,
            baseline=self.baseline, expected_share=canary / total, who=f"{who} (weight {canary} of {total})",
            old_name=f"the old release's instance{'s' if len(old) > 1 else ''} {', '.join(old)}")
        self.n.status(f"canary open: {new} serves {canary} of every {total} requests beside {', '.join(old)}; "
                      f"baking: comparing their requests for at least {app.bake_seconds:g} s and "
                      f"{app.analysis.min_requests} requests (at most {analysis.limit:g} s; reloader rollback "
                      f"{app.name} refuses)")
        checked = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= checked:  # the instance and its health every 0.2 s, as the bake without the analysis
                    checked = now + 0.2
                    if self.rollback_requested():
                        raise Refused("rolled back on operator request (reloader rollback)")
                    st = self.sd.state(unit)
                    if not st.running or st.main_pid != main_pid:
                        raise Refused(f"{unit} stopped or restarted during the bake")
                    self.check_health(new, rounds=1)
                    self.n.extend()
                try:
                    if analysis.look():
                        return
                except Refused as e:
                    self.verdict_error = e
                    raise
                # The canary publishes every FLEET_LOOK_SECONDS: a bad one is refused a few requests
                # after it became significant (reading a few small files costs next to nothing).
                time.sleep(traffic.FLEET_LOOK_SECONDS)
        finally:
            if analysis.verdict:
                self.n.log(analysis.outcome)
                try:
                    releases.record_analysis(app, analysis.record())
                except OSError as e:  # the verdict stands; only the listing misses it
                    self.n.log(f"cannot record the traffic comparison in {app.state_dir}: {e.strerror}", WARNING)


class BlueGreen:
    """Two colours, one route (``live``) nginx sends all traffic through."""

    def __init__(self, fleet: Fleet) -> None:
        self.f = fleet

    def run(self) -> None:
        live, idle = self.colours()
        judged = self.f.app.canary_route
        if judged and self.f.routed("canary") != live:  # a deploy killed while judging left it on the idle one
            self.f.point("canary", live)
        switching = False
        try:
            self.start_idle(idle)
            if self.f.rollback_requested():
                raise Refused("rolled back on operator request (reloader rollback) before the switch")
            switching = True
            if judged:  # the bake is the canary's, beside the live colour; then the switch
                self.f.point("canary", idle)
                self.bake(idle)
                self.switch(live, idle)
            else:
                self.switch(live, idle)
                self.bake(idle)
        except Exception as e:  # not only Refused: whatever failed, the old colour serves again
            if switching:
                self.roll_back(live, idle, e)
            else:  # it never got traffic: just stop it (draining would knock on its socket and start it)
                undo(self.f, f"stopping {idle}", lambda: self.f.stop(idle))
            raise
        self.f.switched = idle
        self.retire(live)

    def colours(self) -> tuple[str, str]:
        """(the colour the live route points at, the other one)."""
        live = self.f.live()[0]
        return live, next(c for c in self.f.app.instance_names if c != live)

    def start_idle(self, idle: str) -> None:
        self.f.pin(idle, self.f.target())
        try:
            self.f.start(idle, restart=self.f.running(idle))
        except Exception as e:
            undo(self.f, "stopping the idle colour", lambda: self.f.stop(idle))
            raise e from None

    def switch(self, old: str, new: str) -> None:
        self.f.n.status(f"switching the live route from {old} to {new} (no nginx reload)")
        self.f.point("live", new)
        if self.f.app.canary_route:
            self.f.point("canary", new)

    def bake(self, instance: str) -> None:
        """Watch the newly live colour; an operator's `reloader rollback` during the bake switches back.
        With the analysis: judge *instance*, which the canary route points at, against the live colour."""
        app = self.f.app
        if app.canary_route:
            self.f.judge(instance, [c for c in app.instance_names if c != instance], who=f"canary route to {instance}")
            return
        deadline = time.monotonic() + app.bake_seconds
        self.f.n.status(f"baking {instance} for {app.bake_seconds:g} s (reloader rollback {app.name} "
                        "switches back)")
        unit = app.instance_unit(instance)
        main_pid = self.f.sd.state(unit).main_pid
        while time.monotonic() < deadline:
            if self.f.rollback_requested():
                raise Refused("rolled back on operator request (reloader rollback)")
            st = self.f.sd.state(unit)
            if not st.running or st.main_pid != main_pid:
                raise Refused(f"{unit} stopped or restarted during the bake")
            self.f.check_health(instance, rounds=1)
            time.sleep(0.2)

    def roll_back(self, old: str, new: str, why: Exception) -> None:
        """Switch back first (a rename, it needs nothing else to work), then stop the new colour."""
        self.f.n.warn(f"rolling back to {old}: {reason(why)}")
        self.switch(new, old)
        undo(self.f, f"retiring {new}", lambda: self.retire(new))

    def retire(self, old: str) -> None:
        """Stop the colour no route points at, once it accepted what was sent to it (in-flight finish)."""
        self.f.drained(old)
        self.f.stop(old)


class Rolling:
    """K instances, one route each; an instance's route points at another one while it is replaced."""

    def __init__(self, fleet: Fleet) -> None:
        self.f = fleet

    def run(self) -> None:
        judged = not self.f.app.canary_route  # with the analysis, the first instance replaced is judged
        for instance in self.f.app.instance_names:
            try:
                peer = self.drain(instance)
            except Exception:  # its route may already point at the peer: back to the instance, unchanged
                undo(self.f, f"restoring instance {instance}'s route", lambda i=instance: self.restore(i))
                raise
            previous = self.f.pinned(instance)
            self.replace(instance)
            if not judged:
                judged = self.judge(instance, peer, previous)
            self.restore(instance)

    def drain(self, instance: str) -> str:
        """Point *instance*'s routes (its own, and the canary if it points there) at another serving
        instance and let it accept what was queued. Returns that peer."""
        peer = next((i for i in self.f.app.instance_names if i != instance and self.f.routed(i) == i
                     and self.f.running(i)), "")
        if not peer:
            raise Refused(f"no other instance serves to take instance {instance}'s traffic; "
                          f"see reloader status {self.f.app.name}")
        self.f.n.status(f"draining instance {instance} (its route now points at instance {peer})")
        self.f.point(instance, peer)
        if self.f.app.canary_route and self.f.routed("canary") in (instance, ""):
            self.f.point("canary", peer)
        if self.f.running(instance):
            self.f.drained(instance)
        return peer

    def judge(self, instance: str, peer: str, previous: str) -> bool:
        """The canary: *instance*, now on the new release while its own route still points at *peer*,
        gets the canary route and is judged against the instances still on the old release. Refused: the
        canary route goes back to *peer* and *instance* back to its *previous* release. Returns whether it
        was judged (False when no instance runs the old release any more: a later one is)."""
        f = self.f
        old = [i for i in f.app.instance_names if i != instance and f.routed(i) == i and f.running(i)
               and f.pinned(i) != f.target()]
        if not old:
            return False
        f.point("canary", instance)
        try:
            f.judge(instance, old, who=f"canary route to instance {instance}")
        except Exception as e:
            f.n.warn(f"rolling back instance {instance} to release {os.path.basename(previous)}: {reason(e)}")
            f.point("canary", peer)
            undo(f, f"restoring instance {instance}'s release", lambda: self.revert(instance, previous))
            raise
        return True

    def revert(self, instance: str, previous: str) -> None:
        """Restart *instance* on its *previous* release (its route points elsewhere meanwhile), route it back."""
        self.f.drained(instance)
        self.f.pin(instance, previous)
        self.f.start(instance, restart=True)
        self.restore(instance)

    def replace(self, instance: str) -> None:
        """Restart *instance* on the new release; if it fails there, back on its old one (its route
        stays on the peer if even that fails)."""
        previous = self.f.pinned(instance)
        self.f.pin(instance, self.f.target())
        try:
            self.f.start(instance, restart=True)
        except Exception as failure:  # not only Refused (a bus error too): the instance goes back
            if not isinstance(failure, Refused):
                self.f.n.log_unexpected(failure)
            e = Refused(reason(failure))
            self.f.n.status(f"instance {instance} failed on the new release; restoring "
                            f"{os.path.basename(previous) or 'nothing (it never ran)'}: {e}")
            if not previous:
                self.f.stop(instance)
                raise Refused(f"instance {instance}: {e} (it had no previous release; its route stays on "
                              "another instance)") from None
            self.f.pin(instance, previous)
            self.f.start(instance, restart=True)
            self.restore(instance)
            raise Refused(f"instance {instance}: {e} (restored release {os.path.basename(previous)}; "
                          f"instances before it run the new release)") from None

    def restore(self, instance: str) -> None:
        self.f.n.status(f"instance {instance} serves release {os.path.basename(self.f.pinned(instance))}; "
                        "its route points at it again")
        self.f.point(instance, instance)
        if self.f.app.canary_route and instance == self.f.app.instance_names[0]:
            self.f.point("canary", instance)  # the canary route's home between deploys


@contextmanager
def locked(app: AppConfig, n: Notifier) -> Iterator[int]:
    """One deploy or rollback of an app at a time. Yields when the lock was taken (the lock file's mtime,
    the clock a rollback request's mtime is compared with)."""
    lock = Path(app.deploy_lock)
    with exclusive(lock, app.ready_timeout, n, "deploy"):
        os.utime(lock)
        yield lock.stat().st_mtime_ns


def undo(fleet: Fleet, what: str, step: Callable[[], None]) -> None:
    """A roll-back step that must not hide the failure being rolled back: its own failure goes to the
    journal, and the roll back goes on."""
    try:
        step()
    except Exception as e:
        fleet.n.log(f"rolling back: {what} failed: {reason(e)}", WARNING)


def _legacy_upstream(app: AppConfig) -> list[str]:
    """The instances an upstream include of the pre-route layout sent traffic to (not down, not backup)."""
    try:
        lines = Path(app.upstream_path).read_text().splitlines()
    except OSError:
        return []
    sockets = {app.instance_socket(i): i for i in app.instance_names}
    out = []
    for line in lines:
        words = line.rstrip(";").split()
        if len(words) >= 2 and words[0] == "server" and not {"down", "backup"} & set(words[2:]):
            instance = sockets.get(words[1].removeprefix("unix:"))
            if instance:
                out.append(instance)
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(app: AppConfig, action: str) -> int:
    """Entry point for the controller's ExecStart= ('start'), ExecReload= ('deploy') and ExecStop= ('stop').

    The controller is Type=oneshot: systemd takes the exit status, not READY=1 (nor RELOADING=1, which
    only Type=notify-reload uses). Every failure ends as one STATUS= line and exit status 1."""
    n = Notifier(app.name)
    started = time.monotonic()
    try:
        with Systemd(timeout=60) as sd, locked(app, n) as since:
            fleet = Fleet(app, sd, n, since)
            if action == "stop":
                # PartOf= already queued the instances' stop jobs: wait for them, so that
                # `systemctl stop` returns only when every instance has drained and exited.
                for instance in app.instance_names:
                    fleet.stop(instance)
                return 0
            summary = fleet.deploy() if action == "deploy" else fleet.bring_up()
    except Exception as e:  # any failure: one STATUS= line and exit status 1 (a traceback if unexpected)
        what = {"deploy": "reload refused", "start": "start failed"}.get(action, f"{action} failed")
        what = "deployed" if isinstance(e, ServingBut) else what
        if isinstance(e, OSError) and e.filename:
            why = f"{e.strerror}: {e.filename}"
        elif isinstance(e, Refused | Failed | OSError):
            why = str(e)
        else:
            n.log_unexpected(e)
            why = reason(e)
        n.warn(f"{what}: {why}")
        n.barrier()
        return 1
    n.status(f"{summary}; release {release_of(app)} took {time.monotonic() - started:.1f} s")
    n.barrier()
    return 0
