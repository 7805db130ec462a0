"""The apps reloader manages on this host: their configs, the manifests ``install`` writes, and the lock
an operator command holds on one app.

An app is managed when ``/etc/reloader/NAME.toml`` exists (what the units' hooks load); its manifest
``/var/lib/reloader/NAME.json`` lists exactly the files ``install`` wrote, so ``uninstall`` removes those
and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import proc
from .config import CONFIG_DIR, STATE_DIR, AppConfig, load
from .engine import try_lock
from .errors import Failed

#: The operator commands' locks (tmpfs: a lock never outlives a reboot).
LOCK_DIR = Path("/run/reloader")


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.toml"


def app_for(name: str) -> AppConfig:
    """The installed config of *name*; :class:`Failed` when reloader does not manage it."""
    path = config_path(name)
    if not path.exists():
        raise Failed(f"{name} is not managed by reloader (no {path}); install it with `reloader install`")
    return load(path)


def managed() -> list[str]:
    """The names of every app installed here, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []


def manifest_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def read_manifest(name: str) -> dict:
    """What ``install`` recorded for *name* ({} when it never completed a write)."""
    try:
        return json.loads(manifest_path(name).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise Failed(f"{manifest_path(name)}: unreadable manifest ({e})") from None


def manifests() -> dict[str, dict]:
    """Every manifest on this host, by app name."""
    return {p.stem: read_manifest(p.stem) for p in sorted(STATE_DIR.glob("*.json"))}


@contextmanager
def operator_lock(app: AppConfig, command: str, timeout: float) -> Iterator[None]:
    """One ``install``, ``deploy`` (or ``rollback`` onto a release) of *app* at a time.

    The reload engines' own locks serialize reloads; this one keeps an ``install`` from rewriting the units
    and the gunicorn config, or choosing reload versus restart, while a ``deploy`` of the same app is running
    (and the other way round). It waits up to *timeout* for the other command, saying once who holds it."""
    path = LOCK_DIR / f"{app.name}.lock"
    try:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 (closed below; the try only covers opening it)
    except PermissionError:
        raise Failed(f"{app.name}: cannot take the lock {path} (permission denied): `reloader {command}` "
                     "manages system units, run it as root (sudo)") from None
    with f:
        if not try_lock(f):
            f.seek(0)
            holder = f.read().strip() or "another process"
            print(f"{app.name}: waiting for {holder} to finish (it holds {path})", file=sys.stderr, flush=True)
            if not proc.wait_for(lambda: try_lock(f), timeout, interval=0.2):
                raise Failed(f"{app.name}: {holder} still holds {path} after {timeout:.0f} s; "
                             "try again when it has finished")
        f.seek(0)
        f.truncate()
        f.write(f"`reloader {command} {app.name}` (pid {os.getpid()})\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
