"""After a deploy, a refusal or a rollback: the record, the journal line, the metrics and the operator's hooks.

``reloader deploy`` and ``reloader rollback`` call :func:`after` once systemd's verdict is known, so every
deploy leaves the same facts in four places:

- ``releases.json`` (reloader.releases): the history (who deployed what, when, the outcome) and counters;
- the journal: one line, ``SYSLOG_IDENTIFIER=reloader``;
- Prometheus metrics in node_exporter's textfile-collector format, ``TEXTFILE_DIRECTORY/reloader_NAME.prom``
  (Debian's prometheus-node-exporter reads /var/lib/prometheus/node-exporter), written atomically and only
  when that directory exists;
- the ``[hooks]`` commands (notifications, cache purges), run as the invoking user's root with the facts
  as ``RELOADER_*`` variables. A hook that fails is reported; it never changes the deploy's outcome.

The performer is the operator behind sudo (``SUDO_USER``), else the invoking user; under systemd (a timer
or a unit running ``reloader deploy``) the unit's name is added.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import proc, releases
from .config import AppConfig


@dataclass(frozen=True)
class Outcome:
    app: str
    action: str  #: "deploy" or "rollback"
    result: str  #: "success", "refused" (the old release serves) or "failed"
    release: str  #: the release deployed (its directory's name), or the one that was refused
    previous: str  #: the release that served before
    reason: str  #: systemd's STATUS= line: why it was refused, or what serves
    duration: float
    performer: str
    time: float

    def environ(self) -> dict[str, str]:
        return {f"RELOADER_{k.upper()}": (f"{v:.2f}" if isinstance(v, float) and k == "duration" else
                                          str(int(v)) if k == "time" else str(v))
                for k, v in asdict(self).items()}


def performer() -> str:
    """Who runs this command: the sudo caller, else this process's user; plus the unit under systemd."""
    who = os.environ.get("SUDO_USER") or ""
    if not who:
        try:
            who = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            who = str(os.getuid())
    unit = _own_unit()
    return f"{who} ({unit})" if unit else who


def _own_unit() -> str:
    """The system unit this command runs in, when systemd started it (not a login session's scope)."""
    if not os.environ.get("INVOCATION_ID"):
        return ""
    for line in proc.cgroup(os.getpid()).splitlines():
        name = line.rpartition("/")[2]
        if name.endswith((".service", ".timer")):
            return name
    return ""


def after(app: AppConfig, outcome: Outcome, say=print) -> list[str]:
    """Record, log, measure, then run the hooks; returns notes for the command's report."""
    notes: list[str] = []
    records = releases.record_outcome(app, asdict(outcome))
    _journal(outcome)
    try:
        path = write_metrics(app, records)
        if path:
            notes.append(f"metrics: {path}")
    except OSError as e:
        notes.append(f"metrics not written: {e.filename or ''} {e.strerror}".strip())
    hooks = app.hooks
    if outcome.result != "success":
        commands = hooks.after_refusal
    else:
        commands = hooks.after_rollback if outcome.action == "rollback" else hooks.after_deploy
    for words in commands:
        notes.append(_run(words, outcome, hooks.timeout))
    return notes


def _journal(outcome: Outcome) -> None:
    import syslog

    text = (f"{outcome.app}: {outcome.action} of release {outcome.release} by {outcome.performer}: "
            f"{outcome.result} in {outcome.duration:.1f} s (previous {outcome.previous or '-'})"
            + (f": {outcome.reason}" if outcome.result != "success" and outcome.reason else ""))
    syslog.openlog("reloader", 0, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_INFO if outcome.result == "success" else syslog.LOG_WARNING, text)
    syslog.closelog()


def _run(words: tuple[str, ...], outcome: Outcome, timeout: int) -> str:
    line = shlex.join(words)
    env = {**os.environ, **outcome.environ()}
    try:
        r = subprocess.run(list(words), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=timeout, cwd="/")
    except OSError as e:
        return f"hook {line!r} could not start: {e.strerror}"
    except subprocess.TimeoutExpired:
        return f"hook {line!r} timed out after {timeout} s ([hooks] timeout)"
    if r.returncode != 0:
        last = ([x.strip() for x in (r.stderr or r.stdout).splitlines() if x.strip()] or ["no output"])[-1]
        return f"hook {line!r} failed with exit status {r.returncode}: {last}"
    return f"hook {line!r} ran"


# --- metrics ---------------------------------------------------------------------------------------------
def _label(value: str) -> str:
    """A label value in the text exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(app: AppConfig, records: releases.Records) -> str:
    name = _label(app.name)
    last = records.history[-1] if records.history else {}
    out = ["# HELP reloader_deploys_total Deploys and rollbacks run by reloader, by action and result.",
           "# TYPE reloader_deploys_total counter"]
    for key in sorted(records.counts):
        action, _, result = key.partition("/")
        out.append(f'reloader_deploys_total{{app="{name}",action="{_label(action)}",result="{_label(result)}"}} '
                   f"{records.counts[key]}")
    refusals = sum(n for key, n in records.counts.items() if not key.endswith("/success"))
    out += ["# HELP reloader_refusals_total Deploys and rollbacks refused or failed (the old release kept serving).",
            "# TYPE reloader_refusals_total counter", f'reloader_refusals_total{{app="{name}"}} {refusals}']
    if last:
        out += ["# HELP reloader_last_deploy_duration_seconds How long the last deploy or rollback took.",
                "# TYPE reloader_last_deploy_duration_seconds gauge",
                f'reloader_last_deploy_duration_seconds{{app="{name}"}} {float(last["duration"]):.3f}',
                "# HELP reloader_last_deploy_timestamp_seconds When the last deploy or rollback ended.",
                "# TYPE reloader_last_deploy_timestamp_seconds gauge",
                f'reloader_last_deploy_timestamp_seconds{{app="{name}"}} {float(last["time"]):.3f}',
                "# HELP reloader_last_deploy_success Whether the last deploy or rollback succeeded.",
                "# TYPE reloader_last_deploy_success gauge",
                f'reloader_last_deploy_success{{app="{name}"}} {1 if last["result"] == "success" else 0}']
    live = records.live
    if live:
        out += ["# HELP reloader_live_release_info The release serving now (value 1), and since when.",
                "# TYPE reloader_live_release_info gauge",
                f'reloader_live_release_info{{app="{name}",release="{_label(live.name)}",'
                f'previous="{_label(records.previous.name if records.previous else "")}"}} 1',
                "# HELP reloader_live_release_since_seconds When the live release went live.",
                "# TYPE reloader_live_release_since_seconds gauge",
                f'reloader_live_release_since_seconds{{app="{name}"}} {live.since:.3f}']
    return "\n".join(out) + "\n"


def write_metrics(app: AppConfig, records: releases.Records | None = None) -> str:
    """Write ``reloader_NAME.prom`` atomically into the textfile directory, if it exists; returns the path."""
    directory = app.metrics.textfile_directory
    if not directory or not os.path.isdir(directory):
        return ""
    path = Path(directory) / f"reloader_{app.name}.prom"
    releases.write_atomic(path, render_metrics(app, records or releases.read(app)), 0o644)
    return str(path)


def outcome(app: AppConfig, action: str, ok: bool, status: str, took: float, before: releases.Records,
            target: str) -> Outcome:
    """The facts of a deploy that just ended, from the records before and after it."""
    after_records = releases.read(app)
    if ok and after_records.live:
        release = after_records.live.name
    else:
        release = os.path.basename(target or releases.resolve_current(app))
    refused = not ok and os.path.realpath(target or releases.resolve_current(app)) in after_records.refused
    return Outcome(app=app.name, action=action, result="success" if ok else "refused" if refused else "failed",
                   release=release, previous=before.live.name if before.live else "", reason=status,
                   duration=round(took, 3), performer=performer(), time=time.time())
