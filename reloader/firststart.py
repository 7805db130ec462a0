"""Pre-flight an app's first start in the unit's own sandbox, before ``install`` starts it.

A reload pre-flights the release from the ``ExecReload=`` helper, which already runs as the app's user, in
its sandbox and environment. The first start has no such helper: gunicorn itself would find out that the
app cannot import, or writes next to its code (``logs/``, an SQLite file) where ``ProtectSystem=strict``
makes the release read-only, and systemd would only say "master exited while its workers were booting".

So ``install`` (and ``reloader check``) run the same pre-flight script (reloader/preflight.py) in a
transient unit (``systemd-run --wait --pipe``) with the service's user, group, working directory,
environment and every sandbox setting of templates/sandbox.j2: what is refused here is what the service
would trip over, and the refusal names the file, the line and the setting that fixes it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import uuid
from pathlib import Path

from . import causes
from .config import AppConfig
from .engine import last_json, preflight_args
from .errors import Failed
from .render import sandbox
from .run import run


def unavailable(app: AppConfig) -> str:
    """Why the sandboxed pre-flight cannot run on this host ("" when it can)."""
    if os.geteuid() != 0:
        return "not root (systemd-run starts a system unit)"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not running on this host"
    if not shutil.which("systemd-run"):
        return "systemd-run not found"
    try:
        pwd.getpwnam(app.user)
    except KeyError:
        return f"user {app.user!r} does not exist yet (install creates it)"
    if not Path(app.python).exists():
        return f"{app.python} does not exist"
    if not os.path.isdir(app.working_directory):
        return f"working_directory {app.working_directory} does not exist"
    return ""


def properties(app: AppConfig) -> list[str]:
    """The service's identity and sandbox as ``systemd-run`` properties (specifiers unescaped: transient
    units take values literally). Not reloader's records directory: the app itself never writes there."""
    props = [f"User={app.user}", f"Group={app.group}", f"WorkingDirectory={app.working_directory}"]
    if app.environment_file:
        props.append(f"EnvironmentFile={app.environment_file}")
    for line in sandbox(app).splitlines():
        line = line.strip()
        # Not RemoveIPC=: when the pre-flight's unit stops it would remove the IPC objects of the app's
        # user, which the running service (`reloader check` next to it) may be using.
        if line and not line.startswith(("#", "RemoveIPC=")) and "=" in line:
            props.append(line.replace("%%", "%"))
    return props


def command(app: AppConfig, argv: list[str], *, what: str = "pre-flight", description: str = "",
            seconds: int = 0) -> list[str]:
    """*argv* in a transient unit NAME-WHAT-XXXXXXXX with the service's identity, environment and sandbox,
    ended after *seconds* (default: the pre-flight's timeout)."""
    unit = f"{app.name}-{what}-{uuid.uuid4().hex[:8]}"
    description = description or f"pre-flight of {app.name}'s first start"
    return (["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec", f"--unit={unit}",
             f"--description=reloader: {description}",
             f"--property=RuntimeMaxSec={(seconds or app.preflight_timeout) + 10}"]
            + [f"--setenv={key}={value}" for key, value in app.environment]
            + [f"--property={p}" for p in properties(app)] + ["--", *argv])


def preflight(app: AppConfig, *, import_only: bool = False) -> str:
    """Import the release (and request its health path unless *import_only*) as the service would run it;
    returns the status it answered; :class:`Failed` names the file, line and fix."""
    release = os.path.realpath(app.working_directory)
    script = str(Path(__file__).with_name("preflight.py"))
    argv = [app.python, script, *preflight_args(app)] + (["--import-only"] if import_only else [])
    r = run(command(app, argv), check=False, timeout=app.preflight_timeout + 60,
            what="the sandboxed pre-flight (systemd-run)")
    result = last_json(r.stdout)
    what = "import" if import_only else "pre-flight"
    where = f"in {app.service}'s sandbox as {app.user}"
    if result is None:
        lines = (r.stderr or "").strip().splitlines()
        cause = causes.cause_of(lines, release) or " | ".join(line.strip() for line in lines[-3:]) \
            or f"exit status {r.returncode}"
        raise Failed(f"{app.name}: the first start's {what} {where} failed for release "
                     f"{os.path.basename(release)}: {cause}{causes.advice(cause, app, release)}")
    if not result.get("ok"):
        error = str(result.get("error"))
        raise Failed(f"{app.name}: the first start's {what} {where} refused release {os.path.basename(release)}: "
                     f"{error}{causes.advice(error, app, release)}")
    return str(result.get("status") or "")
