"""``[setup] after_switch``: commands run once the new generation serves and the old one has retired.

The "contract" half of a two-phase schema change (expand before the switch in ``[setup] commands``:
add the new column; contract after it: drop the old one, which the old code still read). They run in the
service's ``ExecReload=`` right after the swap, like the setup commands: as the app's user, in its sandbox
and environment, in the release that now serves, within ``[setup] timeout``.

A failure is NOT a rollback: the old generation is gone and the new release keeps serving (the
expand/contract pattern makes the new code indifferent to whether the contract step ran). It is reported
in ``STATUS=`` and the journal, recorded for ``reloader status``, and makes ``reloader deploy`` exit 3;
``systemctl reload`` itself succeeds (the reload did happen), so systemd's ReloadResult stays "success" and
``reloader deploy --release`` does not put ``current`` back. Fix the command and run it by hand
(``reloader setup CONFIG --after-switch``) or with the next deploy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import releases, setup_commands
from .config import AppConfig
from .engine import Notifier

#: ``reloader deploy``'s exit status when the release went live but an after_switch command failed.
EXIT_AFTER_SWITCH_FAILED = 3


def record_path(app: AppConfig) -> Path:
    """In the records directory: written by the ExecReload= helper, as the app user."""
    return Path(app.state_dir) / "after-switch.json"


def run(app: AppConfig, release_dir: str, n: Notifier) -> str:
    """Run the after_switch commands; "" when they passed (or there are none), else the one-line failure,
    already reported. Never raises for a failing command."""
    if not app.setup.after_switch:
        return ""
    started = time.time()
    release = os.path.basename(release_dir)
    try:
        setup_commands.run(app, release_dir, n.status, n.extend, after_switch=True)
        error = ""
    except setup_commands.SetupFailed as e:
        error = str(e)
        n.status(f"after_switch failed: {error}; release {release} keeps serving (not a rollback: the old "
                 "generation has retired)")
    record(app, release_dir, error, started)
    return error


def record(app: AppConfig, release_dir: str, error: str, started: float) -> None:
    """The outcome for ``reloader status``: "" for a pass, else the one-line failure."""
    value = {"release": os.path.basename(release_dir), "result": "failed" if error else "ok", "error": error,
             "started": started, "seconds": round(time.time() - started, 2)}
    path = record_path(app)
    try:
        releases.write_atomic(path, json.dumps(value) + "\n", 0o644)
    except OSError as e:  # the outcome is in STATUS= and the journal; only `reloader status` misses it
        print(f"reloader: {app.name}: cannot record the after_switch outcome in {path}: {e.strerror}", flush=True)


def last(app: AppConfig) -> dict | None:
    try:
        return json.loads(record_path(app).read_text())
    except (OSError, ValueError):
        return None
