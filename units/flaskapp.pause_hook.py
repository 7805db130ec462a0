"""Runs inside the app's gunicorn workers (stdlib only): holds new requests while the app is paused.

``reloader install`` copies this file next to the app's gunicorn config; the config's post_worker_init
hook wraps the worker's WSGI app with :func:`pausable`. While the pause flag (``/run/NAME/paused``,
written by ``reloader pause``) exists, a request that arrives waits in its worker, heartbeating so that
the master does not take the worker for hung, and goes on to the app as soon as the flag is gone
(``reloader resume``). Requests already in the app when the pause began finish normally. A sync worker
holding a request accepts no other connection, so the rest wait in the socket's backlog and are served
on resume the same way. Past the pause's maximum (the deadline in the flag) requests are answered 503
with Retry-After instead of waiting longer: answered, never dropped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

#: How often a held request looks at the flag (and heartbeats).
POLL = 0.05


def read_flag(path: str) -> dict | None:
    """The pause (``{"until": epoch seconds, …}``) or None when the app is not paused."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"until": 0}  # unreadable: treat as past its maximum (answer, don't hold forever)


def hold(path: str, heartbeat: Callable[[], None], sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait while paused; True when the request may go on (never paused, or resumed), False when the
    pause is past its maximum."""
    while True:
        pause = read_flag(path)
        if pause is None:
            return True
        if time.time() >= float(pause.get("until", 0)):
            return False
        heartbeat()
        sleep(POLL)


def pausable(app: Callable[..., Iterable[bytes]], worker: Any, path: str) -> Callable[..., Iterable[bytes]]:
    """*app* (a WSGI callable) with requests held while *path* exists."""
    def paused_app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if os.path.exists(path) and not hold(path, worker.notify):
            pause = read_flag(path) or {}
            start_response("503 Service Unavailable", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Retry-After", str(int(pause.get("retry_after", 5)))),
                ("Cache-Control", "no-store")])
            return [b"Service paused; please retry shortly.\n"]
        return app(environ, start_response)

    return paused_app
