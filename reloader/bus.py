"""Everything reloader asks of systemd, over D-Bus with pystemd. The only module that imports pystemd.

pystemd (0.11 in Debian 12) has no job-wait helper, so :meth:`Systemd.run_job` subscribes to
``JobRemoved`` *before* issuing the call and then drives the bus with ``process()`` (a ``select()`` on the
fd could miss a signal that arrived while the method call was in flight). A job that
finished "done" does not prove the unit is fine: callers re-read the unit's properties afterwards.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import Failed

#: Long enough for a daemon-reload on a busy host (pystemd's sd-bus default is 25 s).
DEFAULT_BUS_TIMEOUT = 120
#: Where sd-bus reads a connection's method-call timeout (see :func:`_bus_timeout`).
BUS_TIMEOUT_VARIABLE = "SYSTEMD_BUS_TIMEOUT"
#: How much longer than a unit's TimeoutStartSec= a client waits for its job (see :func:`client_wait`).
VERDICT_SLACK = 30


def client_wait(budget: float) -> float:
    """How long a command waits for the job of a unit that may take *budget* seconds (its TimeoutStartSec=,
    AppConfig.reload_budget): longer than the unit itself, so that when the reload overruns, systemd stops it
    and the command reports systemd's verdict instead of giving up on a reload that carries on."""
    return budget + VERDICT_SLACK


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class UnitState:
    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int = 0
    status_text: str = ""
    reload_result: str = ""

    @property
    def running(self) -> bool:
        # "exited": a oneshot with RemainAfterExit= (the blue-green/rolling controller) that is up.
        return self.active_state == "active" and self.sub_state in ("running", "listening", "exited")


class Systemd:
    """One shared bus connection to the system manager (pass it to every Manager/Unit)."""

    def __init__(self, timeout: float = DEFAULT_BUS_TIMEOUT) -> None:
        try:
            from pystemd.dbuslib import DBus
            from pystemd.systemd1 import Manager
        except ImportError as e:
            raise Failed(f"pystemd is not installed ({e}); install python3-pystemd") from None
        self._bus = DBus()
        with _bus_timeout(timeout):
            try:
                self._bus.open()
            except Exception as e:
                raise Failed(f"cannot connect to the systemd system bus ({_why(e)}); is systemd PID 1 and "
                             "dbus running?") from None
            self.manager = Manager(bus=self._bus)
            self.manager.load()
        self._job_results: dict[bytes, str] = {}
        self._subscribed = False

    def _subscribe(self) -> None:
        """Match JobRemoved once per connection. pystemd keeps only a raw pointer to the callback, so it
        must be a plain function (pystemd sets attributes on it) that lives as long as the bus."""
        if self._subscribed:
            return
        results = self._job_results

        def on_job_removed(msg: Any, error: Any = None, userdata: Any = None) -> None:  # noqa: ARG001 (pystemd passes them by name)
            msg.process_reply(True)
            _id, path, _unit, result = msg.body
            results[path if isinstance(path, bytes) else str(path).encode()] = _s(result)

        self._callback = on_job_removed
        self._bus.match_signal(b"org.freedesktop.systemd1", b"/org/freedesktop/systemd1",
                               b"org.freedesktop.systemd1.Manager", b"JobRemoved", self._callback)
        try:
            self.manager.Manager.Subscribe()
        except Exception as e:
            if "AlreadySubscribed" not in str(e):
                raise
        self._subscribed = True

    def close(self) -> None:
        self._bus.close()

    def __enter__(self) -> Systemd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """systemd's major version, e.g. 252 (the Version property reads like '252.39-1~deb12u1')."""
        text = _s(self.manager.Manager.Version)
        digits = ""
        for ch in text:
            if not ch.isdigit():
                break
            digits += ch
        return int(digits or 0)

    def unit(self, name: str) -> Any:
        from pystemd.systemd1 import Unit

        unit = Unit(name.encode(), bus=self._bus)
        unit.load()
        return unit

    def state(self, name: str) -> UnitState:
        """A snapshot of *name*'s properties; a unit that does not exist has load_state 'not-found'."""
        unit = self.unit(name)
        u = unit.Unit
        service = name.endswith(".service")
        return UnitState(
            name=name,
            load_state=_s(u.LoadState),
            active_state=_s(u.ActiveState),
            sub_state=_s(u.SubState),
            main_pid=int(unit.Service.MainPID) if service else 0,
            status_text=_s(unit.Service.StatusText) if service else "",
            reload_result=_reload_result(unit) if service else "",
        )

    def main_pid(self, name: str) -> int:
        return int(self.unit(name).Service.MainPID)

    # --- jobs -------------------------------------------------------------------------------------------
    def run_job(self, start: Callable[[], Any], *, timeout: float, what: str,
                progress: Callable[[float], None] | None = None) -> str:
        """Call *start* (which enqueues a job and returns its object path) and wait for its JobRemoved.

        Returns the job's result ('done', 'failed', 'timeout', 'canceled', 'dependency', 'skipped').
        """
        self._subscribe()
        results = self._job_results
        try:
            job = start()
        except Exception as e:
            raise Failed(f"{what}: {_why(e)}") from None
        job = job if isinstance(job, bytes) else str(job).encode()
        deadline = time.monotonic() + timeout
        began = last_progress = time.monotonic()
        while job not in results:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"{what}: no result after {timeout:.0f} s (job {_s(job)} still running)")
            # Drain what has arrived, then sleep in Python: pystemd's wait() holds the GIL for its whole
            # timeout, which would starve other threads (e.g. `reloader verify`'s load generator).
            for _ in range(64):
                self._bus.process()
            if job in results:
                break
            time.sleep(min(left, 0.01))
            if progress and time.monotonic() - last_progress >= 0.2:
                last_progress = time.monotonic()
                progress(last_progress - began)
        return results[job]

    def reload_unit(self, name: str, *, timeout: float, progress: Callable[[float], None] | None = None) -> str:
        return self.run_job(lambda: self.manager.Manager.ReloadUnit(name.encode(), b"replace"),
                            timeout=timeout, what=f"reload {name}", progress=progress)

    def start_unit(self, name: str, *, timeout: float) -> str:
        return self.run_job(lambda: self.manager.Manager.StartUnit(name.encode(), b"replace"),
                            timeout=timeout, what=f"start {name}")

    def stop_unit(self, name: str, *, timeout: float) -> str:
        return self.run_job(lambda: self.manager.Manager.StopUnit(name.encode(), b"replace"),
                            timeout=timeout, what=f"stop {name}")

    def restart_unit(self, name: str, *, timeout: float) -> str:
        return self.run_job(lambda: self.manager.Manager.RestartUnit(name.encode(), b"replace"),
                            timeout=timeout, what=f"restart {name}")

    def daemon_reload(self) -> None:
        """Reload unit files. The call returns when systemd has finished reloading."""
        try:
            self.manager.Manager.Reload()
        except Exception as e:
            raise Failed(f"daemon-reload: {_why(e)}") from None

    def enable(self, names: list[str]) -> None:
        try:
            self.manager.Manager.EnableUnitFiles([n.encode() for n in names], False, True)
        except Exception as e:
            raise Failed(f"enable {' '.join(names)}: {_why(e)}") from None

    def disable(self, names: list[str]) -> None:
        try:
            self.manager.Manager.DisableUnitFiles([n.encode() for n in names], False)
        except Exception as e:
            raise Failed(f"disable {' '.join(names)}: {_why(e)}") from None


@contextmanager
def _bus_timeout(timeout: float) -> Iterator[None]:
    """*timeout* as this connection's method-call timeout, and nothing else's.

    sd-bus takes it from $SYSTEMD_BUS_TIMEOUT the first time a connection needs it (the Hello its open
    sends) and keeps it for that connection; pystemd has no setter. So the variable is set for the open and
    the first call only, then put back: another connection gets its own timeout, and the variable never
    reaches an environment this process hands on (the boot request gives a new master the helper's)."""
    before = os.environ.get(BUS_TIMEOUT_VARIABLE)
    os.environ[BUS_TIMEOUT_VARIABLE] = f"{max(1, math.ceil(timeout))}s"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BUS_TIMEOUT_VARIABLE, None)
        else:
            os.environ[BUS_TIMEOUT_VARIABLE] = before


def _reload_result(unit: Any) -> str:
    try:
        return _s(unit.Service.ReloadResult)
    except AttributeError:  # systemd < 250 has no ReloadResult
        return ""


def _why(e: Exception) -> str:
    text = str(e)
    if ("AccessDenied" in text or "Access denied" in text or "Permission denied" in text
            or "InteractiveAuthorizationRequired" in text):
        return ("permission denied: managing system units needs root (run with sudo) or a polkit rule "
                "granting org.freedesktop.systemd1.manage-units")
    if "NoSuchUnit" in text:
        return "no such unit"
    if "masked" in text.lower():
        return "the unit is masked (systemctl unmask it first)"
    return text.strip() or type(e).__name__

