"""Long-lived connections across a deploy: ``[reload] drain_timeout`` (stdlib only at module level).

A plain TERM to the retiring master cuts WebSockets at once: uvicorn's ``Server.shutdown`` closes its
listeners, then calls ``shutdown()`` on every connection (close code 1012 to a WebSocket) before it waits
for them; gunicorn SIGKILLs what is left after ``graceful_timeout``. With ``drain_timeout`` set the retiring
generation instead stops taking connections and keeps its open ones until they end or the drain times out,
and only then gets its TERM (so its WebSockets get 1012 at the end, not at the deploy):

    helper (ExecReload=, after MAINPID went to the new master)
        writes ``drain`` in the old master's ready directory (deadline, new master, release)
        waits until every old worker stopped accepting and the new master watches the drain, else TERMs
        the old master at once, as without drain_timeout (and says why)
        returns: ``systemctl reload`` does not wait for the drain
    each old worker (:func:`in_worker`, from the gunicorn config's post_worker_init)
        counts its open connections (ASGI calls in progress: requests and WebSockets)
        on ``drain``: stops accepting (removes its listeners from its event loop; the listening socket
        itself is shared with the new generation and stays open), then writes ``draining-PID`` each second
    the new master (:func:`in_master`, from when_ready; it is MainPID, which NotifyAccess=exec lets
    notify once the helper is gone)
        sends ``STATUS=`` with the connections still draining while they change
        TERMs the old master when they reach 0 or at the deadline; gunicorn's graceful_timeout still
        bounds that final shutdown

The helper's side (:func:`begin`, :func:`state`) imports reloader lazily; ``reloader install`` copies this
file next to the gunicorn config, which loads it with runpy in the masters and workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from .config import AppConfig

#: The flag the helper writes in the retiring master's ready directory.
FLAG = "drain"
#: The new master's acknowledgement that it watches the drain.
WATCHED = "drain-watch"
#: How often the in-gunicorn threads look at their files.
POLL = 0.5
#: How long the helper waits for every old worker and the new master to take the drain up.
ACK_TIMEOUT = 15.0


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _workers(old_dir: str) -> list[int]:
    """The old master's live workers that loaded the app (their ``worker-PID`` ready markers)."""
    try:
        names = os.listdir(old_dir)
    except OSError:
        return []
    pids = [int(n[len("worker-"):]) for n in names if n.startswith("worker-") and n[len("worker-"):].isdigit()]
    return sorted(p for p in pids if _alive(p))


def count(old_dir: str) -> tuple[int, list[int], list[str]]:
    """(open connections, workers not reporting yet, their errors) of a draining generation."""
    total, silent, errors = 0, [], []
    for pid in _workers(old_dir):
        report = _read(os.path.join(old_dir, f"draining-{pid}"))
        if report is None:
            silent.append(pid)
        elif report.get("error"):
            errors.append(f"worker {pid}: {report['error']}")
        else:
            total += int(report.get("open", 0))
    return total, silent, errors


# --- in each worker of a generation (gunicorn's post_worker_init) ---------------------------------------
class _WorkerDrain:
    def __init__(self, worker: Any, ready_dir: str) -> None:
        self.worker = worker
        self.dir = os.path.join(ready_dir, str(worker.ppid))
        self.open = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def wrap(self, app: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> Any:
            if self.loop is None:
                import asyncio  # here, in the worker: the helper imports this module too and needs none of it

                self.loop = asyncio.get_running_loop()
            if scope.get("type") == "lifespan":
                return await app(scope, receive, send)
            self.open += 1  # only ever touched from the event loop's thread
            try:
                return await app(scope, receive, send)
            finally:
                self.open -= 1
        return counted

    def _stop_accepting(self) -> str:
        """In the event loop: take the listeners out of it (what asyncio's Server.close does, minus closing
        the socket). "" once done; else why not (yet)."""
        loop = self.loop
        if loop is None:
            return "its event loop was never seen (no lifespan or request call yet)"
        done = threading.Event()
        result: list[str] = []

        def stop() -> None:
            try:
                removed = [loop.remove_reader(s.fileno()) for s in self.worker.sockets]
                result.append("" if removed and all(removed) else "its listeners are not in its event loop")
            except Exception as e:  # told to the helper, which then retires the generation at once
                result.append(f"cannot stop accepting: {e}")
            done.set()

        loop.call_soon_threadsafe(stop)
        if not done.wait(5):
            return "its event loop did not answer within 5 s"
        return result[0]

    def watch(self) -> None:
        flag = os.path.join(self.dir, FLAG)
        mine = os.path.join(self.dir, f"draining-{os.getpid()}")
        ppid = self.worker.ppid
        while not os.path.exists(flag):
            if os.getppid() != ppid:
                return
            time.sleep(POLL)
        # A worker respawned during the drain gets here before its server listens: retry a while.
        deadline = time.monotonic() + 10
        while True:
            error = self._stop_accepting()
            if not error or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if error:
            _write(mine, {"error": error})
            return
        print(f"reloader: worker {os.getpid()} stopped accepting; draining {self.open} connection(s)",
              file=sys.stderr, flush=True)
        while os.getppid() == ppid:
            _write(mine, {"open": self.open, "at": time.time()})
            time.sleep(POLL)


def in_worker(worker: Any, ready_dir: str) -> None:
    """Count the worker's ASGI connections and stop accepting when its generation is told to drain."""
    drain = _WorkerDrain(worker, ready_dir)
    worker.wsgi = drain.wrap(worker.wsgi)
    threading.Thread(target=drain.watch, name="reloader-drain", daemon=True).start()


# --- in the next master (gunicorn's when_ready) -----------------------------------------------------------
def _notify(path: str, text: str) -> None:
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(text.encode(), address)
    except OSError as e:
        print(f"reloader: cannot notify systemd: {e}", file=sys.stderr, flush=True)


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def watch_old_generation(me: int, old: int, old_dir: str, sleep: Callable[[float], None] = time.sleep) -> None:
    """Runs in the new master: once the helper asks for a drain of *old* (our parent), report it in
    STATUS= and TERM *old* when its connections are closed or at the deadline."""
    flag = os.path.join(old_dir, FLAG)
    while not os.path.exists(flag):
        if not _alive(old):  # the old master went without a drain
            return
        sleep(POLL)
    request = _read(flag) or {}
    deadline = float(request.get("deadline", 0))
    notify, release = str(request.get("notify_socket", "")), request.get("release", "?")
    _write(os.path.join(old_dir, WATCHED), {"master": me})
    said = ""
    n, errors = 0, []
    while _alive(old):
        n, silent, errors = count(old_dir)
        if (n == 0 and not silent) or errors or time.time() >= deadline:
            break
        text = (f"serving release {release} (master {me}); draining {n} connection(s) of the old generation "
                f"(master {old}) until {_clock(deadline)} at the latest")
        if text != said:
            _notify(notify, f"STATUS={text}")
            said = text
        sleep(POLL)
    else:
        return  # the old master is gone already (a stop, or a reload ended the drain)
    why = (f"a worker failed to drain ({'; '.join(errors)})" if errors else "its connections closed" if n == 0 else
           f"drain_timeout reached with {n} connection(s) open: they get close code 1012")
    print(f"reloader: retiring old master {old} (TERM): {why}", file=sys.stderr, flush=True)
    os.kill(old, signal.SIGTERM)
    status = (f"STATUS=serving release {release} (master {me}); old generation (master {old}) retired after its "
              f"drain: {why}")
    _notify(notify, status)
    # Once more when it is gone: a helper finishing its reload right now may have overwritten the first.
    while _alive(old):
        sleep(0.2)
    _notify(notify, status)


def in_master(server: Any, ready_dir: str) -> None:
    """A master started by a reload watches the drain of the retiring master of this app: the one gunicorn
    names in GUNICORN_PID (server.master_pid until its promotion). It is not our parent: the config's
    pre_exec detached us (a parent is still looked at for a new master that was not detached)."""
    old = server.master_pid or os.getppid()
    old_dir = os.path.join(ready_dir, str(old))
    if getattr(server, "_reloader_drain", False) or not os.path.exists(os.path.join(old_dir, "master")):
        return
    server._reloader_drain = True
    threading.Thread(target=watch_old_generation, args=(os.getpid(), old, old_dir), name="reloader-drain",
                     daemon=True).start()


# --- the helper's side -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draining:
    old: int
    connections: int
    deadline: float

    def __str__(self) -> str:
        return (f"draining {self.connections} connection(s) of the old generation (master {self.old}) until "
                f"{_clock(self.deadline)} at the latest")


class NotDrained(Exception):
    """The old generation cannot drain (why); the helper retires it at once instead."""


def begin(app: AppConfig, old: int, new: int, release: str, tick: Callable[[], None]) -> Draining:
    """Ask the old generation to drain and wait until it took the request up: every worker stopped
    accepting and the new master watches it. Raises NotDrained (the flag removed) otherwise."""
    old_dir = os.path.join(app.ready_dir, str(old))
    flag = os.path.join(old_dir, FLAG)
    deadline = time.time() + app.drain_timeout
    try:
        _write(flag, {"deadline": deadline, "timeout": app.drain_timeout, "old": old, "new": new,
                      "release": release, "notify_socket": os.environ.get("NOTIFY_SOCKET", "")})
    except OSError as e:
        raise NotDrained(f"cannot write {flag}: {e.strerror}") from None
    until = time.monotonic() + ACK_TIMEOUT
    while True:
        n, silent, errors = count(old_dir)
        watched = os.path.exists(os.path.join(old_dir, WATCHED))
        if errors or (not silent and watched) or time.monotonic() > until:
            break
        tick()
        time.sleep(0.1)
    if errors or silent or not watched:
        try:
            os.unlink(flag)
        except OSError:
            pass
        why = "; ".join(errors) if errors else (
            f"worker(s) {', '.join(map(str, silent))} did not take the drain up within {ACK_TIMEOUT:g} s (was the "
            "running generation started before drain_timeout was installed?)" if silent else
            f"the new master {new} did not take the drain up within {ACK_TIMEOUT:g} s")
        raise NotDrained(why)
    return Draining(old, n, deadline)


def ending(app: AppConfig, old: int) -> str:
    """What the next reload says when it finds *old* still draining (it TERMs it first); "" if not draining."""
    if not os.path.exists(os.path.join(app.ready_dir, str(old), FLAG)):
        return ""
    return (f"ending the drain of old master {old} first (TERM: its WebSockets get 1012), so that at most two "
            "generations run")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def state(app: AppConfig) -> dict | None:
    """``reloader status --json``'s "drain": the generation draining now, or None."""
    try:
        names = os.listdir(app.ready_dir)
    except OSError:
        return None
    for name in sorted(names):
        old_dir = os.path.join(app.ready_dir, name)
        request = _read(os.path.join(old_dir, FLAG))
        if not name.isdigit() or request is None or not _alive(int(name)):
            continue
        n, silent, errors = count(old_dir)
        workers = _workers(old_dir)
        return {"old_master": int(name), "new_master": request.get("new"), "connections": n,
                "workers": len(workers), "not_reporting": silent, "errors": errors,
                "deadline": request.get("deadline"), "drain_timeout": request.get("timeout"),
                "memory_bytes": sum(_rss(p) for p in [int(name), *workers])}
    return None
