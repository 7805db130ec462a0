"""``reloader pause NAME [--max S]`` / ``reloader resume NAME``: hold new requests instead of failing them,
e.g. for the seconds of a database failover (kamal-proxy's pause, for gunicorn behind nginx).

The flag file ``/run/NAME/paused`` (JSON: since, until, retry_after) is what the workers look at: the
gunicorn config wraps each worker's WSGI app with reloader.pause_hook, which holds a request while the
flag exists and answers 503 with Retry-After once the pause is past its maximum. The flag lives in the
app's runtime directory, so a restart of the service ends a pause.

The maximum is bounded by nginx's proxy_read_timeout (nginx would answer 504 to a request held longer)
and a deploy is refused while paused (its bake's health checks would be held as well).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import releases
from .config import AppConfig, ConfigError
from .errors import Failed

#: Seconds between the pause's maximum and nginx's proxy_read_timeout: the 503 must reach nginx first.
MARGIN = 5
#: Retry-After of the 503 past the maximum.
RETRY_AFTER = 5


def max_allowed(app: AppConfig) -> int:
    return max(1, app.nginx.proxy_read_timeout - MARGIN)


def check(app: AppConfig, seconds: int | None) -> int:
    """The pause's maximum (default: 30 s or less); ConfigError naming the bound for bad input."""
    if not app.pausable:
        why = "an ASGI worker class" if app.asgi else f"strategy {app.strategy.value!r}"
        raise ConfigError(f"pause: not supported for {app.name} ({why}); it works with WSGI workers of a "
                          "single master (strategies \"generation\" and \"hup\")")
    high = max_allowed(app)
    if seconds is None:
        return min(30, high)
    if not 1 <= seconds <= high:
        raise ConfigError(f"pause: --max {seconds} is out of range; allowed 1..{high} seconds ([nginx] "
                          f"proxy_read_timeout = {app.nginx.proxy_read_timeout} minus {MARGIN}: nginx would "
                          "answer 504 to a request held longer)")
    return seconds


def ready_for(app: AppConfig, main_pid: int) -> None:
    """The running generation booted with the pause hook: its gunicorn config is installed, and the master
    started after that config was written. Failed otherwise: a pause it would ignore is never reported on."""
    config = Path(app.gunicorn_config_path)
    try:
        hooked = app.pause_flag in config.read_text(encoding="utf-8") and Path(app.pause_hook_path).is_file()
    except OSError:
        hooked = False
    if not hooked:
        raise Failed(f"{app.name}: the installed gunicorn config has no pause hook (installed by an older "
                     f"reloader?); run `reloader install {app.config_path}` first")
    try:
        booted = os.stat(app.boot_record(main_pid)).st_mtime
    except OSError:
        booted = 0.0
    if booted < config.stat().st_mtime:
        raise Failed(f"{app.name}: master {main_pid} started before its gunicorn config got the pause hook; "
                     f"`systemctl reload {app.service}` first")


def state(app: AppConfig) -> dict:
    """{"paused": bool, …}: since, until, and whether it is past its maximum (answering 503)."""
    try:
        flag = json.loads(Path(app.pause_flag).read_text())
    except FileNotFoundError:
        return {"paused": False}
    except (OSError, ValueError):
        flag = {}
    until = float(flag.get("until", 0))
    return {"paused": True, "since": flag.get("since"), "until": until, "max": flag.get("max"),
            "past_max": time.time() >= until}


def pause(app: AppConfig, seconds: int) -> dict:
    """Write the flag (atomically, readable by the app's workers); returns it."""
    now = time.time()
    flag = {"since": now, "until": now + seconds, "max": seconds, "retry_after": RETRY_AFTER}
    path = Path(app.pause_flag)
    if not path.parent.is_dir():
        raise Failed(f"{app.name}: {path.parent} is missing; is {app.service} running?")
    releases.write_atomic(path, json.dumps(flag) + "\n", 0o644)
    return flag


def resume(app: AppConfig) -> dict:
    """Remove the flag: held requests go on at once. Returns the pause's state as it was."""
    was = state(app)
    Path(app.pause_flag).unlink(missing_ok=True)
    return was
