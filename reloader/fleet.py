"""Blue/green and rolling deploys over several instances (``NAME@INSTANCE.service``) behind nginx.

The controller unit ``NAME.service`` runs these as root: ``ExecStart=`` brings the instances up,
``ExecReload=`` deploys. The same guarantees as the single-master engine (reloader.swap): a pre-flight
before anything is touched, every instance health-checked *on its own socket* before nginx sends it
traffic, nginx switched only through its verified reload, and a failure puts things back as they were.

    blue-green: pre-flight → start idle colour on the new release → ready + health on its socket
                → switch nginx → bake (rollback = switch back) → stop old colour
    rolling:    pre-flight → for each instance: mark it down in nginx (and the one before back up)
                → restart on the new release → ready + health;  then all up in nginx.
                A failure restores that instance's old release.

What was deployed goes into the same records as the single-master strategies (reloader.releases): the
release live after a switch or a completed roll, the one it replaced (previous), and a refused release
with its reason (a deploy refused, or rolled back during the bake). `reloader releases`, `status` and
`rollback NAME RELEASE` read them; the instances' own symlinks stay what they boot.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import proc, releases
from .bus import Systemd
from .config import AppConfig
from .engine import Notifier, Refused, exclusive, health, monotonic_usec, preflight, ready_workers, release_of
from .render import upstream

NGINX = "nginx.service"


class Fleet:
    """The instances of one app and the operations on them; each step reports through STATUS=."""

    def __init__(self, app: AppConfig, sd: Systemd, n: Notifier) -> None:
        self.app, self.sd, self.n = app, sd, n
        self.state_path = Path(app.state_dir) / "state.json"

    # --- state -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"live": list(self.app.instance_names[:1] if self.app.strategy == "blue-green"
                                 else self.app.instance_names), "generation": 1}

    def save(self, state: dict) -> None:
        _write(self.state_path, json.dumps(state, indent=2) + "\n")

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

    def seed_records(self, state: dict) -> None:
        """No records yet (first start, or an app installed before reloader kept them): what the live
        instances are pinned to is live."""
        pinned = self.pinned(state["live"][0])
        if pinned and releases.read(self.app).live is None:
            self.record_live(pinned)

    # --- instances ---------------------------------------------------------------------------------------
    def start(self, instance: str, *, restart: bool = False) -> None:
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
        ready_dir = Path(self.app.instance_runtime_dir(instance)) / "ready"
        want = self.app.workers

        def ready() -> bool:
            st = self.sd.state(unit)
            if st.active_state != "active":
                raise Refused(f"{unit} is {st.active_state} while booting; see journalctl -u {unit}")
            return len(ready_workers(ready_dir, st.main_pid)) >= want

        if not proc.wait_for(ready, self.app.ready_timeout, interval=0.1, tick=self.n.extend):
            raise Refused(f"{unit}: not all {want} workers loaded the app within ready_timeout")
        self.check_health(instance)

    def check_health(self, instance: str, rounds: int = 3) -> None:
        socket = self.app.instance_socket(instance)
        for _ in range(rounds):
            status, error = health(self.app, socket_path=socket)
            if not self.app.health_ok(status):
                raise Refused(f"{self.app.instance_unit(instance)}: {self.app.health_path} on {socket} "
                              f"{'answered ' + str(status) if status else 'failed: ' + error}")

    # --- nginx ----------------------------------------------------------------------------------------
    def route(self, live: list[str], down: tuple[str, ...] = ()) -> None:
        """Point nginx at *live* (with *down* marked down) through the verified nginx reload."""
        _write(Path(self.app.upstream_path), upstream(self.app, tuple(live), down))
        nginx = self.sd.state(NGINX)
        if not nginx.running:
            return  # nginx reads the file when it starts
        result = self.sd.reload_unit(NGINX, timeout=120)
        if result != "done":
            raise Refused(f"nginx reload failed (job {result}); see journalctl -u nginx")

    # --- controller ExecStart= ----------------------------------------------------------------------------
    def bring_up(self) -> str:
        state = self.state()
        for instance in state["live"]:
            if not self.pinned(instance):
                self.pin(instance, self.target())
            self.start(instance)
        self.route(state["live"])
        self.save(state)
        self.seed_records(state)
        return self.describe(state)

    def describe(self, state: dict) -> str:
        releases = ", ".join(f"{i}={os.path.basename(self.pinned(i)) or '-'}" for i in state["live"])
        return (f"serving generation {state.get('generation', 1)} on {', '.join(state['live'])} "
                f"(releases {releases}, {self.app.workers} workers each)")

    # --- controller ExecReload= --------------------------------------------------------------------------
    def deploy(self) -> str:
        target = self.target()
        state = self.state()
        self.seed_records(state)
        try:
            preflight(self.app, self.n, as_app_user=os.geteuid() == 0)
            if self.app.strategy == "blue-green":
                self.blue_green(state)
            else:
                self.rolling(state)
        except Refused as e:
            releases.record_refused(self.app, target, str(e))
            raise
        self.record_live(target)
        state["generation"] = state.get("generation", 1) + 1
        self.save(state)
        return self.describe(state)

    def blue_green(self, state: dict) -> None:
        live = state["live"][0]
        idle = next(c for c in self.app.instance_names if c != live)
        self.pin(idle, self.target())
        try:
            self.start(idle, restart=self.running(idle))
        except Refused:
            self.stop(idle)
            raise
        self.n.status(f"switching nginx from {live} to {idle}")
        self.route([idle])
        state["live"] = [idle]
        self.save(state)
        try:
            self.bake(idle)
        except Refused as e:
            self.n.status(f"rolling back to {live}: {e}")
            self.route([live])
            state["live"] = [live]
            self.save(state)
            self.stop(idle)
            raise
        self.stop(live)

    def bake(self, instance: str) -> None:
        """Watch the newly live colour; an operator's `reloader rollback` during the bake switches back."""
        request = Path(self.app.state_dir) / "rollback-request"
        request.unlink(missing_ok=True)
        deadline = time.monotonic() + self.app.bake_seconds
        self.n.status(f"baking {instance} for {self.app.bake_seconds:g} s (reloader rollback "
                      f"{self.app.name} switches back)")
        unit = self.app.instance_unit(instance)
        main_pid = self.sd.state(unit).main_pid
        while time.monotonic() < deadline:
            if request.exists():
                request.unlink(missing_ok=True)
                raise Refused("rolled back on operator request (reloader rollback)")
            st = self.sd.state(unit)
            if not st.running or st.main_pid != main_pid:
                raise Refused(f"{unit} stopped or restarted during the bake")
            self.check_health(instance, rounds=1)
            time.sleep(0.2)

    def rolling(self, state: dict) -> None:
        target = self.target()
        instances = list(self.app.instance_names)
        for instance in instances:
            previous = self.pinned(instance)
            self.n.status(f"draining instance {instance} (marked down in nginx)")
            self.route(instances, down=(instance,))
            self.pin(instance, target)
            try:
                self.start(instance, restart=True)
            except Refused as e:
                self.n.status(f"instance {instance} failed on the new release; restoring "
                              f"{os.path.basename(previous)}: {e}")
                self.pin(instance, previous)
                self.start(instance, restart=True)
                self.route(instances)
                raise Refused(f"instance {instance}: {e} (restored release {os.path.basename(previous)}; "
                              f"instances before it run the new release)") from None
            # No nginx reload to put it back on its own: the next instance's drain does that in the same
            # reload (K + 1 nginx reloads per deploy, not 2K; each closes idle client keep-alives).
        self.route(instances)
        state["live"] = instances

    # --- `reloader rollback` ---------------------------------------------------------------------------
    def rollback(self) -> str:
        """Blue-green: switch back to the other colour's release (starting it again if it was stopped)."""
        if self.app.strategy != "blue-green":
            raise Refused("rollback switches colours: only for strategy = \"blue-green\"")
        state = self.state()
        live = state["live"][0]
        other = next(c for c in self.app.instance_names if c != live)
        if not self.pinned(other):
            raise Refused(f"there is no previous release to roll back to ({other} never ran)")
        self.start(other, restart=self.running(other))
        self.route([other])
        state["live"] = [other]
        self.save(state)
        self.record_live(self.pinned(other))
        self.stop(live)
        return self.describe(state)


@contextmanager
def locked(app: AppConfig, n: Notifier) -> Iterator[None]:
    """One deploy or rollback of an app at a time."""
    with exclusive(Path(app.state_dir) / "lock", app.ready_timeout, n, "deploy"):
        yield


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(app: AppConfig, action: str) -> int:
    """Entry point for the controller's ExecStart= ('start'), ExecReload= ('deploy') and ExecStop= ('stop')."""
    n = Notifier(app.name)
    if action == "deploy":
        n.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
    started = time.monotonic()
    try:
        with Systemd(timeout=60) as sd, locked(app, n):
            fleet = Fleet(app, sd, n)
            if action == "stop":
                # PartOf= already queued the instances' stop jobs: wait for them, so that
                # `systemctl stop` returns only when every instance has drained and exited.
                for instance in app.instance_names:
                    fleet.stop(instance)
                return 0
            summary = fleet.deploy() if action == "deploy" else fleet.bring_up()
    except Refused as e:
        n.status(f"{'reload refused' if action == 'deploy' else 'start failed'}: {e}")
        n.send("READY=1")
        return 1
    n.status(f"{summary}; release {release_of(app)} took {time.monotonic() - started:.1f} s")
    n.send("READY=1")
    return 0
