"""Maintenance mode: nginx answers the app's requests with 503, ``Retry-After`` and a page, without an nginx
reload (which would close idle client keep-alive connections), while the app keeps running.

The nginx site checks, per request, for ``MAINTENANCE/active/on`` (an ``if (-f …)``: nginx stats it for
every request, nothing is cached), and serves ``MAINTENANCE/active/index.html`` as the 503's page from an
internal location. ``active`` is a symlink that ``on``/``off`` replace atomically (rename(2)):

    MAINTENANCE/off/index.html                         always there: the off state
    MAINTENANCE/retry-after-120.<ns>/{on,index.html}   one directory per `maintenance on`
    MAINTENANCE/active -> retry-after-120.<ns>         (or -> off)

Retry-After comes from the name of the directory ``active`` resolves to (nginx's ``$realpath_root``
through a ``map``), so it changes with the page, also without a reload. A request that saw ``on`` just
as ``off`` replaced the link gets the off directory's page, still a 503 with a Retry-After: every
request is answered either by the app or by a complete maintenance answer.

A deploy during maintenance works (it talks to the app's socket, not through nginx) and leaves it on.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import time
from pathlib import Path

from . import releases
from .config import AppConfig, ConfigError
from .errors import Failed

#: The page's size limit: it is read from disk for every request during maintenance.
MAX_PAGE = 1 << 20
RETRY_AFTER = (1, 86400)
DEFAULT_RETRY_AFTER = 300
#: What a request gets in the instant between ``off`` and nginx seeing it (the off directory).
OFF_RETRY_AFTER = 5
#: The internal location nginx serves the page from (the nginx site renders it).
LOCATION = "/.reloader-maintenance/"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Down for maintenance</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}</style>
</head><body><h1>Down for maintenance</h1><p>{message}</p></body></html>
"""
DEFAULT_MESSAGE = "We are doing some maintenance and will be back shortly."


def template_values() -> dict[str, object]:
    """What the nginx site's maintenance parts need besides the app (reloader.render passes them)."""
    return {"maintenance_location": LOCATION, "off_retry_after": OFF_RETRY_AFTER}


def state_path(app: AppConfig) -> Path:
    return Path(app.maintenance_dir) / "state.json"


def state(app: AppConfig) -> dict:
    """{"on": bool, …} as ``reloader status --json`` shows it: since when, Retry-After, where the page came from."""
    active = Path(app.maintenance_dir) / "active"
    on = (active / "on").is_file()
    try:
        recorded = json.loads(state_path(app).read_text())
    except (OSError, ValueError):
        recorded = {}
    out = {"on": on}
    if on:
        out.update({k: recorded.get(k) for k in ("since", "retry_after", "page", "message")})
    return out


def page_for(message: str | None, page: str | None) -> tuple[str, str]:
    """(the HTML, what it came from) for --message TEXT or --page FILE; ConfigError for bad input."""
    if message is not None and page is not None:
        raise ConfigError("maintenance on: give --message or --page, not both")
    if page is not None:
        try:
            data = Path(page).read_bytes()
        except OSError as e:
            raise ConfigError(f"maintenance on: --page {page}: {e.strerror}") from None
        if len(data) > MAX_PAGE:
            raise ConfigError(f"maintenance on: --page {page}: {len(data)} bytes; at most {MAX_PAGE} (1 MB)")
        try:
            return data.decode("utf-8"), os.path.abspath(page)
        except UnicodeDecodeError:
            raise ConfigError(f"maintenance on: --page {page}: not UTF-8 text") from None
    text = DEFAULT_MESSAGE if message is None else message
    if not text.strip() or len(text) > 2000:
        raise ConfigError("maintenance on: --message must be 1..2000 characters")
    return PAGE.format(message=html.escape(text).replace("\n", "<br>")), "message"


def check_retry_after(seconds: int) -> int:
    low, high = RETRY_AFTER
    if not low <= seconds <= high:
        raise ConfigError(f"maintenance on: --retry-after {seconds} is out of range; allowed {low}..{high} seconds")
    return seconds


def site_supports(app: AppConfig, site: str) -> bool:
    """The installed nginx site checks this app's maintenance flag (an install before this feature did not)."""
    try:
        return f"{app.maintenance_dir}/active/on" in Path(site).read_text(encoding="utf-8")
    except OSError:
        return False


def turn_on(app: AppConfig, html_page: str, source: str, retry_after: int, message: str | None) -> Path:
    """Write a new page directory, then point ``active`` at it (one rename): nginx answers 503 from then on."""
    root = _root(app)
    page_dir = root / f"retry-after-{retry_after}.{time.time_ns()}"
    page_dir.mkdir(mode=0o755)
    (page_dir / "index.html").write_text(html_page, encoding="utf-8")
    (page_dir / "on").write_text(f"{retry_after}\n")
    for f in page_dir.iterdir():
        f.chmod(0o644)
    _write_json(state_path(app), {"since": time.time(), "retry_after": retry_after, "page": source,
                                  "message": message})
    _point_active(root, page_dir.name)
    _prune(root, keep=page_dir.name)
    return page_dir


def turn_off(app: AppConfig) -> bool:
    """Point ``active`` at the off directory; False when maintenance was not on."""
    root = _root(app)
    was_on = (root / "active" / "on").is_file()
    _point_active(root, "off")
    state_path(app).unlink(missing_ok=True)
    return was_on


def _root(app: AppConfig) -> Path:
    """The maintenance directory with its off state in place (nginx's workers read it: 0755/0644)."""
    root = Path(app.maintenance_dir)
    if not root.parent.is_dir():
        raise Failed(f"{app.name}: {root.parent} is missing; run `reloader install {app.config_path}`")
    root.mkdir(mode=0o755, exist_ok=True)
    off = root / "off"
    if not (off / "index.html").is_file():
        off.mkdir(mode=0o755, exist_ok=True)
        (off / "index.html").write_text(PAGE.format(message=DEFAULT_MESSAGE), encoding="utf-8")
        (off / "index.html").chmod(0o644)
    if not (root / "active").is_symlink():
        _point_active(root, "off")
    return root


def _point_active(root: Path, target: str) -> None:
    releases.replace_symlink(root / "active", target, suffix=str(os.getpid()))


def _prune(root: Path, keep: str) -> None:
    """Page directories of earlier ``on``s: a request may still be reading one, so keep the last few."""
    old = sorted((d for d in root.glob("retry-after-*") if d.name != keep), key=lambda d: d.stat().st_mtime)
    for d in old[:-2]:
        shutil.rmtree(d, ignore_errors=True)


def _write_json(path: Path, value: dict) -> None:
    releases.write_atomic(path, json.dumps(value) + "\n", 0o644)


def probe(app: AppConfig) -> tuple[int, str]:
    """(status, Retry-After) of the health path through the app's nginx site, as a client sees it now."""
    import http.client

    from .probe import target_of

    host_port, _ = target_of(app.nginx.listen[0], app.nginx.server_name)
    host, _, port = host_port.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        conn.request("GET", app.health_path, headers={"Host": app.health_host, "User-Agent": "reloader-maintenance"})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Retry-After") or ""
    except OSError as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()
