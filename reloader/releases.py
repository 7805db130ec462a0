"""Which release an app runs: the *live* one (proven by a reload), the previous one, and those refused.

A master must only ever run a release that passed the pre-flight and the swap. ``current`` is the
operator's pointer to what should run next; it is *not* proof. So reloader keeps its own records, per app,
in the unit's ``StateDirectory=`` (``/var/lib/reloader/NAME``, writable by the app user, so the
``ExecReload=`` helper can record what it proved):

    releases.json   {"live": ENTRY, "previous": ENTRY | null, "refused": {DIR: {"reason": str, "time": float}},
                     "proven": [DIR, ...], "analysis": the last deploy's traffic comparison (reloader.traffic)}
                    ENTRY = {"release": DIR, "virtualenv": DIR, "since": float}   (resolved paths)
    live, previous  symlinks to those release directories (nginx serves static files through them)

The generated gunicorn config (templates/gunicorn.conf.py.j2) reads ``live`` itself: it runs in the app's
virtualenv, where reloader cannot be imported. That file layout is therefore an interface; change both
together.

The hand-over to the *next* master of a reload is a separate, short-lived file in the runtime directory
(:func:`write_boot_request`): the release and environment the helper resolved for the master it is about to
signal, which the config's ``pre_exec`` (USR2) or the config itself (HUP) applies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import AppConfig

#: systemd's per-process variables: a new master keeps the ones the old master was started with
#: (its journal stream, socket hand-over, notify socket), not those of the ExecReload= process.
PER_PROCESS_ENV = ("MAINPID", "SYSTEMD_EXEC_PID", "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID",
                   "LISTEN_FDNAMES", "NOTIFY_SOCKET", "MANAGERPID", "WATCHDOG_PID", "WATCHDOG_USEC",
                   "GUNICORN_PID", "GUNICORN_FD")


#: In a release directory while ``reloader deploy --from`` builds it (reloader.build): not a release yet,
#: so neither listed nor pruned.
BUILDING = ".reloader-building"


class BadRelease(Exception):
    """A release given by the operator cannot be deployed; the message is the one line to print."""


@dataclass(frozen=True)
class Release:
    release: str  #: the resolved release directory
    virtualenv: str = ""  #: the resolved virtualenv ("" when the app names its gunicorn script)
    since: float = 0.0

    @property
    def name(self) -> str:
        return os.path.basename(self.release)


@dataclass(frozen=True)
class Refusal:
    reason: str
    time: float


@dataclass(frozen=True)
class Records:
    live: Release | None = None
    previous: Release | None = None
    refused: dict[str, Refusal] = field(default_factory=dict)
    #: Every release that was ever live (passed a reload or the first start): what rollback may name.
    proven: tuple[str, ...] = ()
    #: The last deploy's traffic comparison (reloader.traffic.Analysis.record), {} before the first.
    analysis: dict = field(default_factory=dict)
    #: The last deploys and rollbacks reloader's commands ran (reloader.hooks): who, what, the outcome.
    history: tuple[dict, ...] = ()
    #: Deploys by "ACTION/RESULT" since the app was installed (the Prometheus counters).
    counts: dict[str, int] = field(default_factory=dict)


# --- reading --------------------------------------------------------------------------------------------
def records_path(app: AppConfig) -> Path:
    return Path(app.records_path)


def read(app: AppConfig) -> Records:
    """The app's records; empty ones before its first start (or when the file is unreadable)."""
    try:
        data = json.loads(records_path(app).read_text())
    except (OSError, ValueError):
        return Records()

    def entry(value: object) -> Release | None:
        if isinstance(value, dict) and isinstance(value.get("release"), str):
            return Release(value["release"], str(value.get("virtualenv") or ""), float(value.get("since") or 0))
        return None

    refused = {d: Refusal(str(r.get("reason", "")), float(r.get("time", 0)))
               for d, r in (data.get("refused") or {}).items() if isinstance(r, dict)}
    proven = tuple(p for p in data.get("proven") or () if isinstance(p, str))
    analysis = data.get("analysis") if isinstance(data.get("analysis"), dict) else {}
    history = tuple(h for h in data.get("history") or () if isinstance(h, dict))
    counts = {k: int(v) for k, v in (data.get("counts") or {}).items() if isinstance(v, int)}
    return Records(entry(data.get("live")), entry(data.get("previous")), refused, proven, analysis, history, counts)


def resolve_current(app: AppConfig) -> str:
    """The release ``current`` (the configured working directory) points at now, resolved."""
    return os.path.realpath(app.working_directory)


def resolve_virtualenv(app: AppConfig) -> str:
    return os.path.realpath(app.virtualenv) if app.virtualenv else ""


def releases_root(app: AppConfig) -> str:
    """Where release directories live: the configured root, else the directory holding the live release
    (or, before the first one, the one ``current`` points at)."""
    if app.releases_root:
        return os.path.realpath(app.releases_root)
    live = read(app).live
    return os.path.dirname(live.release if live else resolve_current(app))


def pending(app: AppConfig, records: Records | None = None) -> str:
    """Why ``current`` is not what a (re)start boots, or "" when it is: the policy's one-line notice."""
    records = records or read(app)
    current = resolve_current(app)
    if records.live is None or records.live.release == current:
        return ""
    why = "was refused: " + records.refused[current].reason if current in records.refused else "is not deployed"
    return (f"current → {os.path.basename(current)} {why}; serving the live release {records.live.name} "
            f"(run `systemctl reload {app.name}` to deploy it)")


# --- recording ------------------------------------------------------------------------------------------
def record_live(app: AppConfig, release: Release) -> Records:
    """*release* passed the pre-flight and the swap: it is live; the one it replaced becomes previous."""
    old = read(app)
    if old.live and old.live.release == release.release:
        previous = old.previous
    else:
        previous = old.live
    refused = {d: r for d, r in old.refused.items() if d != release.release}
    proven = tuple(p for p in old.proven if p != release.release) + (release.release,)
    new = Records(Release(release.release, release.virtualenv, release.since or time.time()), previous, refused,
                  proven, old.analysis, old.history, old.counts)
    _save(app, new)
    return new


def record_refused(app: AppConfig, release_dir: str, reason: str) -> Records:
    old = read(app)
    refused = dict(old.refused)
    refused[release_dir] = Refusal(reason, time.time())
    new = replace(old, refused=refused)
    _save(app, new)
    return new


def record_analysis(app: AppConfig, analysis: dict) -> Records:
    """The traffic comparison of the deploy running now (it replaces the last one)."""
    new = replace(read(app), analysis=analysis)
    _save(app, new)
    return new


def _save(app: AppConfig, records: Records) -> None:
    state = Path(app.state_dir)
    data = {"live": asdict(records.live) if records.live else None,
            "previous": asdict(records.previous) if records.previous else None,
            "refused": {d: asdict(r) for d, r in records.refused.items()}, "proven": list(records.proven),
            "analysis": records.analysis, "history": list(records.history), "counts": records.counts}
    write_atomic(records_path(app), json.dumps(data, indent=2) + "\n", 0o644)
    for name, entry in (("live", records.live), ("previous", records.previous)):
        link = state / name
        if entry is None:
            link.unlink(missing_ok=True)
            continue
        replace_symlink(link, entry.release)


def record_outcome(app: AppConfig, outcome: dict, keep: int = 100) -> Records:
    """Append a deploy's or rollback's outcome (reloader.hooks) to the history, count it by action/result."""
    old = read(app)
    counts = dict(old.counts)
    key = f"{outcome['action']}/{outcome['result']}"
    counts[key] = counts.get(key, 0) + 1
    new = replace(old, history=(old.history + (outcome,))[-keep:], counts=counts)
    _save(app, new)
    return new


def write_atomic(path: Path, content: str, mode: int) -> None:
    """Write *path* via a temp file in the same directory, so a reader sees the old or the new file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_symlink(link: Path, target: str, suffix: str = "new") -> None:
    """Point *link* at *target* atomically: a new link ``.NAME.SUFFIX`` beside it, renamed over it (rename(2)),
    so a reader resolves the old target or the new one, never none."""
    tmp = link.with_name(f".{link.name}.{suffix}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


# --- the next master's boot --------------------------------------------------------------------------
def boot_request_path(app: AppConfig) -> Path:
    return Path(app.boot_request)


def write_boot_request(app: AppConfig, master: int, release: Release, environ: dict[str, str], *,
                       gated: bool = False, workers: int = 0) -> None:
    """Tell the master about to be signalled (USR2 or HUP) what to boot: *release* with *environ*.

    *environ* is the helper's own environment, which systemd built from the unit's current
    ``Environment=``/``EnvironmentFile=``; systemd's per-process variables are left out (the new master
    keeps its parent's). Mode 0600: it holds the app's secrets. For a USR2 child: *gated*, its workers
    wait for the helper's gate-open before they accept; *workers*, how many it starts with (0: the
    configured count). Both only while this helper (``helper``) runs."""
    env = {k: v for k, v in environ.items() if k not in PER_PROCESS_ENV and not k.startswith("RELOADER_")}
    python = os.path.join(release.virtualenv, "bin", "python3") if release.virtualenv else app.python
    body = {"master": master, "release": release.release, "virtualenv": release.virtualenv,
            "python": python, "environ": env, "keep": list(PER_PROCESS_ENV), "helper": os.getpid(),
            "gated": gated, "workers": workers}
    write_atomic(boot_request_path(app), json.dumps(body) + "\n", 0o600)


def clear_boot_request(app: AppConfig) -> None:
    boot_request_path(app).unlink(missing_ok=True)


def booted(app: AppConfig, master: int) -> dict:
    """What *master* booted, as its gunicorn config recorded it: {"release", "virtualenv", "environ"}."""
    try:
        return json.loads(Path(app.boot_record(master)).read_text())
    except (OSError, ValueError):
        return {}


# --- operator input and housekeeping ---------------------------------------------------------------------
def check_release(app: AppConfig, path: str) -> str:
    """The resolved directory of a release the operator named; :class:`BadRelease` says why not."""
    root = releases_root(app)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    try:
        resolved = Path(candidate).resolve(strict=True)
    except RuntimeError:
        raise BadRelease(f"{path}: symlink loop") from None
    except FileNotFoundError:
        raise BadRelease(f"{path}: no such release directory") from None
    except OSError as e:
        raise BadRelease(f"{path}: {e.strerror}") from None
    if not resolved.is_dir():
        raise BadRelease(f"{path}: not a directory")
    if resolved.parent != Path(root):
        raise BadRelease(f"{path}: not a release in {root} (set [reload] releases_root to deploy from elsewhere)")
    return str(resolved)


def listing(app: AppConfig) -> list[dict]:
    """Every release directory under the root, newest first, with its state."""
    records = read(app)
    root = Path(releases_root(app))
    rows = []
    try:
        dirs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not (p / BUILDING).exists()]
    except OSError:
        dirs = []
    for d in sorted(dirs, key=_age_key, reverse=True):
        path = str(d)
        row: dict = {"release": d.name, "path": path, "state": "never tried"}
        if records.live and records.live.release == path:
            row.update(state="live", since=records.live.since)
        elif records.previous and records.previous.release == path:
            row.update(state="previous", since=records.previous.since)
        elif path in records.refused:
            row.update(state="refused", reason=records.refused[path].reason, time=records.refused[path].time)
        elif path in records.proven:
            row.update(state="proven")
        rows.append(row)
    return rows


def rollback_target(app: AppConfig, name: str = "") -> str:
    """The release a rollback deploys: *name* if it was proven live once, else the previous release."""
    records = read(app)
    if not name:
        if records.previous is None:
            raise BadRelease("no previous release recorded to roll back to")
        return records.previous.release
    path = check_release(app, name)
    if path not in records.proven:
        state = "was refused" if path in records.refused else "was never live"
        raise BadRelease(f"{name}: {state}; rollback only goes to a proven release (deploy it with --release)")
    return path


def point_current(app: AppConfig, release_dir: str) -> str:
    """Atomically point ``current`` (the configured working directory) at *release_dir*; returns what it
    pointed at before, so a refused deploy can put it back."""
    link = Path(app.working_directory)
    if not link.is_symlink():
        raise BadRelease(f"{link} (working_directory) is not a symlink; --release needs one to point")
    before = os.readlink(link)
    replace_symlink(link, release_dir, suffix="reloader")
    return before


def prune(app: AppConfig, keep: int) -> list[str]:
    """Remove release directories beyond *keep*, the least useful first (:func:`prune_order`); never the
    live, previous or current one. Deploy and rollback both call this after a release went live."""
    records = read(app)
    protected = {r.release for r in (records.live, records.previous) if r} | {resolve_current(app)}
    removed = []
    for path in prune_order(app, records, listing(app))[keep:]:
        if path in protected:
            continue
        shutil.rmtree(path)
        removed.append(path)
    if removed:
        _save(app, Records(records.live, records.previous,
                           {d: r for d, r in records.refused.items() if d not in removed},
                           tuple(p for p in records.proven if p not in removed), records.analysis,
                           records.history, records.counts))
    return removed


def prune_order(app: AppConfig, records: Records, rows: list[dict]) -> list[str]:
    """Every release directory, the one to keep longest first: the live, previous and current ones, then
    the proven releases by when they last went live (newest first: what a rollback may still name), then
    those never tried (newest first: maybe staged for the next deploy), and last the refused ones, which a
    rollback can never deploy. Pruning by age alone kept refused releases and deleted rollback targets."""
    protected = [r.release for r in (records.live, records.previous) if r] + [resolve_current(app)]
    on_disk = [row["path"] for row in rows]  # newest first
    proven = [p for p in reversed(records.proven) if p in on_disk]
    tried = set(proven) | set(records.refused)
    never = [p for p in on_disk if p not in tried]
    refused = sorted((p for p in on_disk if p in records.refused), key=lambda p: records.refused[p].time,
                     reverse=True)
    order: list[str] = []
    for path in protected + proven + never + refused:
        if path in on_disk and path not in order:
            order.append(path)
    return order


def _age_key(path: Path) -> tuple[float, str]:
    """Order releases by when they were shipped (the directory's mtime), then by name."""
    try:
        return (path.stat().st_mtime, path.name)
    except OSError:
        return (0.0, path.name)
