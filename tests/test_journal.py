"""What a reload leaves in `journalctl -u APP`, with the app saturated and its access log on.

journald rate-limits each unit (LogRateLimitBurst= per LogRateLimitIntervalSec=) in one budget per priority
class: emerg..crit, err, warning, notice+info, debug (journald-rate-limit.c). The access log (debug) may
exhaust its own; the helper's step lines (notice) share theirs with gunicorn's and the app's output (info),
the refusal's cause (warning) has one that only reloader uses. The unit here gets a small budget (a drop-in:
50 lines per class per 5 s, which journald scales by up to 6 with the free journal space) so that the
access log of the saturated app exceeds it within seconds even on a slow machine, as 3,000 requests/s
exceed journald's default (10,000 per 30 s) in production.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
from appbed import BROKEN, App
from test_reload import assert_no_failures

both_releases = pytest.mark.parametrize("container", ["bookworm", "trixie"], indirect=True)

RATE_LIMIT = "[Service]\nLogRateLimitIntervalSec=5s\nLogRateLimitBurst=50\n"


def cursor(app: App) -> str:
    """The journal's current end, to read only what follows."""
    out = app.c.run("journalctl -n 0 --show-cursor --no-pager", check=False).stdout
    return out.strip().rpartition("-- cursor: ")[2]


def entries(app: App, after: str) -> list[dict]:
    """Every journal entry after *after* but the debug ones (the access log), as journalctl's JSON.
    Filtered here, not with journalctl's -u/-t: systemd 252's journalctl, given a cursor and several
    matches, skipped entries of a journal that rotated meanwhile (seen in this test)."""
    out = app.c.run(f"journalctl --no-pager -o json -p info --after-cursor={shlex.quote(after)}",
                    check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def of_unit(e: dict) -> bool:
    """Logged by a process of flaskapp.service, or by systemd about it (what `journalctl -u` shows)."""
    unit = "flaskapp.service"
    return e.get("_SYSTEMD_UNIT") == unit or (e.get("_PID") == "1" and e.get("UNIT") == unit)


def lines(found: list[dict], *, identifier: str = "", max_priority: int = 7) -> list[str]:
    """The messages of *found* (by *identifier*, at *max_priority* or more urgent)."""
    return [str(e.get("MESSAGE")) for e in found if (not identifier or e.get("SYSLOG_IDENTIFIER") == identifier)
            and int(e.get("PRIORITY", 6)) <= max_priority]


def wait_for_line(app: App, after: str, text: str, timeout: float = 60) -> list[dict]:
    """The entries since *after* once one of the unit's holds *text* (journald may lag a saturated app)."""
    deadline = time.monotonic() + timeout
    while True:
        found = entries(app, after)
        if any(text in str(e.get("MESSAGE")) for e in found if of_unit(e)) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@both_releases
@pytest.mark.app_config(gunicorn="access_log = true")
def test_under_saturation_a_reload_is_quiet_and_a_refusal_names_its_cause_in_the_journal(app: App) -> None:
    app.c.write_file("/etc/systemd/system/flaskapp.service.d/rate-limit.conf", RATE_LIMIT)
    app.c.run("systemctl daemon-reload && systemctl restart flaskapp")
    assert app.wait_version("v1"), app.journal()
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")

    # The access log really is over the unit's budget: journald says it dropped lines of the unit.
    start = cursor(app)
    time.sleep(6)  # one LogRateLimitIntervalSec=: journald reports the suppressed count when the next begins
    deadline = time.monotonic() + 30
    while not (suppressed := [m for m in lines(entries(app, start), identifier="systemd-journald")
                              if "messages from flaskapp.service" in m]) and time.monotonic() < deadline:
        time.sleep(1)
    assert suppressed, "the access log did not exceed the unit's journal budget: no Suppressed message"

    # A normal reload: the new master's boot is not reported to systemd as an unauthorised notification,
    # and nothing at warning or above is logged, by systemd or anyone else; in particular not systemd's
    # "Supervising process N which is not our child" (service_set_main_pid() logs it when MAINPID= names
    # a process whose parent is not the manager): the new master is systemd's child at the hand-over
    # (the config's pre_exec detaches it from the old master; docs/steady-state.md).
    before = cursor(app)
    app.ship("v2")
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal(40))
    found = wait_for_line(app, before, "Reloaded ")  # systemd's line, after its warnings
    unit = [e for e in found if of_unit(e)]
    assert any("Reloaded " in m for m in lines(unit)), lines(unit)
    assert not any("reception only permitted" in m for m in lines(found)), lines(unit)
    alien = [m for m in lines(found) if "which is not our child" in m]
    assert not alien, (alien, lines(unit))
    warnings = lines(found, max_priority=4)
    assert warnings == [], warnings
    assert any("serving release 2, generation 2" in m for m in lines(unit, identifier="reloader")), lines(unit)

    # A broken release (its workers boot, its health path fails the pre-flight): every line of the helper
    # is there, the refusal's cause included.
    before = cursor(app)
    app.ship(code=BROKEN["health path answers 500"][0])
    r = app.reload()
    status = app.props()["StatusText"]
    assert r.returncode != 0 and "reload refused" in status, status
    unit = [e for e in wait_for_line(app, before, "helper cost") if of_unit(e)]
    helper = "\n".join(lines(unit, identifier="reloader"))
    for line in ("pre-flight: importing app:app from 3", "starting a new generation", f"{status}",
                 "helper cost: peak RSS"):
        assert line in helper, (line, helper)
    # ... and the refusal (only it, and the rollback) at priority warning.
    assert lines(unit, identifier="reloader", max_priority=4) == [
        m for m in lines(unit, identifier="reloader") if m.startswith(("reloader: flaskapp: rolling back",
                                                                        f"reloader: flaskapp: {status}"))], helper
    assert f"reloader: flaskapp: {status}" in lines(unit, identifier="reloader", max_priority=4), helper
    assert_no_failures(app.stop_load(load))
