"""The operator and hook commands: exec-reload, nginx-reload, install, deploy, status, uninstall.

All systemd interaction goes through :mod:`reloader.bus` (D-Bus); nothing here runs ``systemctl``.
"""

from __future__ import annotations

import argparse
import difflib
import grp
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import CONFIG_DIR, STATE_DIR, AppConfig, ConfigError, load
from .errors import Failed
from .render import NGINX_DROPIN, RenderedFile, render

#: Oldest systemd reloader is known to work with (Debian 11's; 252 and 257 are tested).
MIN_SYSTEMD = 247


# --- hooks (run by systemd) -----------------------------------------------------------------------------
def cmd_exec_reload(args: argparse.Namespace) -> int:
    """``ExecReload=`` of an app's service: swap generations (see reloader.swap)."""
    from .engine import Notifier
    from .swap import Swap

    app = load(args.config)
    if app.multi_instance:
        from . import fleet

        return fleet.run(app, "deploy")
    notifier = Notifier(app.name)
    bus = None

    def main_pid_from_bus() -> int:
        nonlocal bus
        from .bus import Systemd

        if bus is None:
            bus = Systemd(timeout=30)
        return bus.main_pid(app.service)

    try:
        main_pid = int(os.environ.get("MAINPID") or 0) or main_pid_from_bus()
    except ValueError:
        main_pid = main_pid_from_bus()
    try:
        return Swap(app, main_pid, notifier, main_pid_from_bus).run(notify_reload=args.notify_reload)
    finally:
        if bus is not None:
            bus.close()


def cmd_exec_started(args: argparse.Namespace) -> int:
    """``ExecStartPost=`` of an app's service: record the first live release, report what serves."""
    from .engine import Notifier
    from .swap import report_start

    app = load(args.config)
    try:
        main_pid = int(os.environ.get("MAINPID") or 0)
    except ValueError:
        main_pid = 0
    if not main_pid:
        raise Failed("exec-started runs as the service's ExecStartPost= (no $MAINPID)")
    return report_start(app, main_pid, Notifier(app.name))


def cmd_instances(args: argparse.Namespace) -> int:
    """``ExecStart=``/``ExecStop=`` of a blue-green/rolling controller unit: bring the instances up or down."""
    from . import fleet

    return fleet.run(load(args.config), args.action)


def cmd_rollback(args: argparse.Namespace) -> int:
    """A verified deploy of the previous (or the named) proven release, through the strategy's own deploy
    (blue-green: onto the idle colour; rolling: across the instances). Blue-green without RELEASE instead
    switches back to the previous colour (during a deploy's bake, or after it)."""
    from . import fleet, releases
    from .bus import Systemd
    from .engine import Notifier, Refused, try_lock

    app = _app_for(args.name)
    if args.release or app.strategy != "blue-green":
        try:
            target = releases.rollback_target(app, args.release or "")
        except releases.BadRelease as e:
            raise ConfigError(f"rollback: {e}") from None
        print(f"{app.name}: rolling back to {target}")
        return _deploy(app, argparse.Namespace(timeout=0, json=False), target)
    lock = Path(app.state_dir) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f, Systemd() as sd:
        if not try_lock(f):
            # A deploy is running: ask it to switch back (it does before its switch or during its bake),
            # and wait for the reload job to end.
            request = Path(app.rollback_request)
            request.write_text("1\n")
            print(f"{app.name}: a deploy is running; asked it to switch back")
            deadline = time.monotonic() + app.preflight_timeout + 2 * (app.ready_timeout + app.graceful_timeout
                                                                       + 60) + app.bake_seconds
            while sd.state(app.service).active_state == "reloading" and time.monotonic() < deadline:
                time.sleep(0.2)
            request.unlink(missing_ok=True)  # taken, or too late: never left for a later deploy
            st = sd.state(app.service)
            if "rolled back on operator request" not in st.status_text:
                raise Failed(f"{app.name}: rollback not applied: the deploy was past its bake (or was not a "
                             f"deploy); it reports: {st.status_text}; run `reloader rollback {app.name}` again")
            print(f"{app.name}: {st.status_text}")
            return 0
        try:
            summary = fleet.Fleet(app, sd, Notifier(app.name)).rollback()
        except Refused as e:
            raise Failed(f"{app.name}: rollback refused: {e}") from None
    print(f"{app.name}: rolled back; {summary}")
    return 0


def cmd_nginx_reload(args: argparse.Namespace) -> int:
    from . import nginx

    return nginx.exec_reload()


# --- install / uninstall ------------------------------------------------------------------------------
def _manifest_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _read_manifest(name: str) -> dict:
    try:
        return json.loads(_manifest_path(name).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise Failed(f"{_manifest_path(name)}: unreadable manifest ({e})") from None


def _write_atomic(path: Path, content: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.chown(tmp, 0, 0)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _planned_files(app: AppConfig, config_text: str, notify_reload: bool) -> list[RenderedFile]:
    files = [RenderedFile(f"{app.name}.toml", app.config_path, config_text)]
    return files + render(app, notify_reload=notify_reload)


def _diff(path: str, new: str) -> list[str]:
    try:
        old = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    if old == new:
        return []
    if old is None:
        return [f"+ new file {path}"]
    return list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"{path} (installed)", f"{path} (new)",
                                     lineterm=""))


def _ensure_user(app: AppConfig) -> bool:
    try:
        pwd.getpwnam(app.user)
        return False
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin", "--user-group" if app.group == app.user else f"--gid={app.group}",
           app.user]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise Failed(f"cannot create user {app.user!r}: {r.stderr.strip()}")
    return True


def _ensure_state_dir(app: AppConfig) -> None:
    """The single-master unit's records directory: the helper writes it as the app user (ReadWritePaths=),
    nginx's workers read static files through its links."""
    path = Path(app.state_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, pwd.getpwnam(app.user).pw_uid, grp.getgrnam(app.group).gr_gid)
    path.chmod(0o755)


def preinstall_problems(app: AppConfig) -> list[str]:
    """What ``install`` refuses before writing anything (exit 2): things the units would trip over later."""
    problems = []
    if not os.access(app.helper, os.X_OK):
        problems.append(f"{app.source}: [reload] helper: {app.helper} is not executable, so every reload would "
                        "fail (status=203/EXEC); install the .deb (/usr/bin/reloader), or set helper to the "
                        "`reloader` of your pip install (e.g. /opt/reloader/bin/reloader)")
    for path in app.read_write_paths:
        if not os.path.isdir(path):
            problems.append(f"{app.source}: [app] read_write_paths: {path} does not exist (systemd would refuse "
                            "to start the service); create it, or use state_directory to have systemd create one")
    return problems


def cmd_setup(args: argparse.Namespace) -> int:
    """``ExecStart=`` of NAME-setup.service (and usable by hand): run the [setup] commands in a release."""
    from . import setup_commands

    app = load(args.config)
    release = args.release or os.path.realpath(app.working_directory)
    try:
        setup_commands.run(app, release, lambda text: print(f"reloader: {app.name}: {text}", file=sys.stderr,
                                                            flush=True))
    except setup_commands.SetupFailed as e:
        raise Failed(f"{app.name}: {e}") from None
    return 0


def _run_setup_unit(sd: object, app: AppConfig) -> None:
    """First install: the setup commands run in their oneshot unit (the app's user, sandbox, environment)."""
    print(f"{app.name}: running the setup commands ({app.setup_unit})")
    result = sd.start_unit(app.setup_unit, timeout=app.setup.timeout + 60)  # type: ignore[attr-defined]
    st = sd.state(app.setup_unit)  # type: ignore[attr-defined]
    if result != "done" or st.active_state == "failed":
        r = subprocess.run(["journalctl", "-u", app.setup_unit, "-n", "3", "-o", "cat", "--no-pager"],
                           capture_output=True, text=True, check=False)
        tail = " | ".join(line.strip() for line in r.stdout.splitlines() if line.strip())
        raise Failed(f"{app.name}: setup commands failed ({app.setup_unit}: job {result}); {app.service} not "
                     f"started: {tail or 'see journalctl -u ' + app.setup_unit}")


def cmd_install(args: argparse.Namespace) -> int:
    from .bus import Systemd

    app = load(args.config)
    config_text = Path(args.config).read_text(encoding="utf-8")
    problems = preinstall_problems(app)
    if problems:
        from .config import ConfigError

        raise ConfigError("; ".join(problems))
    if os.geteuid() != 0 and not args.dry_run:
        raise Failed("install writes /etc and manages system units: run it as root (sudo)")
    with Systemd() as sd:
        if sd.version < MIN_SYSTEMD:
            raise Failed(f"systemd {sd.version} is too old: reloader needs {MIN_SYSTEMD} or newer "
                         "(MAINPID= hand-over from ExecReload=, ReloadResult)")
        if args.notify_reload and sd.version < 253:
            raise Failed(f"--notify-reload needs systemd 253 or newer (this is systemd {sd.version}); "
                         "leave it off to use Type=notify")
        notify_reload = args.notify_reload
        files = _planned_files(app, config_text, notify_reload)
        changes = {f.install_path: _diff(f.install_path, f.content) for f in files
                   if not (f.seed and Path(f.install_path).exists())}
        changed = [p for p, d in changes.items() if d]
        service = sd.state(app.service)
        if args.dry_run:
            for path in changed:
                print("\n".join(changes[path]))
            print(f"{app.name}: {len(changed)} file(s) would change" if changed else f"{app.name}: no changes")
            return 0
        # The shortcut only for an install that once completed (a failed first install wrote the files but
        # may have left nginx without the site, or the service restarting by itself).
        verified = bool(_read_manifest(app.name).get("verified"))
        if not changed and service.running and verified:
            print(f"{app.name}: already installed and running; nothing changed")
            if not app.multi_instance:
                _check_environment(app, service.main_pid)
            return _check_through_nginx(app, sd.state("nginx.service").load_state == "loaded")
        # A reload starts the new master from the old one: it keeps the old unit's user, sandbox (mount
        # namespace) and sockets; only the environment and the gunicorn config reach it. Anything else
        # needs a restart: refuse before writing anything unless asked to restart.
        restart = restart_only_changes(app, files) if service.running else []
        restart_units = ([app.socket_unit] if any(k.startswith(app.socket_unit) for k in restart) else []) \
            + [app.service]
        if restart and not args.restart:
            raise Failed(f"{app.name}: {', '.join(restart)} changed, which a reload cannot apply (the running "
                         "generation keeps its user, sandbox and sockets); nothing was changed: run `reloader "
                         f"install {args.config} --restart`, which runs `systemctl restart {' '.join(restart_units)}`"
                         + (" (the socket holds connections meanwhile)" if app.socket_activation
                            and app.socket_unit not in restart_units else
                            " (requests are refused while the socket is re-created)"))
        for path in changed:
            print("\n".join(changes[path]))
        _ensure_user(app)
        if not app.multi_instance:
            _ensure_state_dir(app)
        for f in files:
            if f.install_path in changed:
                _write_atomic(Path(f.install_path), f.content, f.mode)
        units = [app.service] + ([app.socket_unit] if app.socket_activation and not app.multi_instance else [])
        manifest = {"name": app.name, "config": app.config_path, "installed": time.time(),
                    "files": {f.install_path: hashlib.sha256(f.content.encode()).hexdigest() for f in files},
                    "units": units}
        manifest["state_dir"] = app.state_dir  # the records (single master) or the instances' pins
        _write_atomic(_manifest_path(app.name), json.dumps(manifest, indent=2) + "\n")
        sd.enable(units)  # before daemon-reload, so systemd loads the units with their new symlinks
        sd.daemon_reload()
        timeout = app.preflight_timeout + max(1, len(app.instance_names)) * (app.ready_timeout + app.graceful_timeout
                                                                            + 60)
        if app.socket_activation and not app.multi_instance:
            _job_ok(sd, app.socket_unit, sd.start_unit(app.socket_unit, timeout=60), "start")
        if app.setup.commands and not service.running:
            _run_setup_unit(sd, app)
        if restart:
            print(f"{app.name}: restarting {' '.join(restart_units)} for {', '.join(restart)}")
            if app.setup.commands:
                _run_setup_unit(sd, app)
            for unit in restart_units:
                _job_ok(sd, unit, sd.restart_unit(unit, timeout=timeout), "restart")
        elif service.running:
            print(f"{app.name}: reloading the running service")
            _job_ok(sd, app.service, sd.reload_unit(app.service, timeout=timeout), "reload")
        else:
            _job_ok(sd, app.service, sd.start_unit(app.service, timeout=timeout), "start")
        nginx = sd.state("nginx.service")
        # An nginx reload closes idle client keep-alive connections: only when nginx's files changed (or a
        # previous install never completed), not for a change of the app alone.
        nginx_changed = not verified or any(p.startswith("/etc/nginx/") or "/nginx.service.d/" in p for p in changed)
        if nginx.load_state == "loaded":
            if nginx.running and nginx_changed:
                _job_ok(sd, "nginx.service", sd.reload_unit("nginx.service", timeout=120), "reload")
            elif nginx.running:
                print(f"{app.name}: nginx's files are unchanged; nginx not reloaded")
            else:
                _job_ok(sd, "nginx.service", sd.start_unit("nginx.service", timeout=120), "start")
        for unit in units:
            st = sd.state(unit)
            if st.active_state != "active":
                raise Failed(f"{unit} is {st.active_state}/{st.sub_state} after install; "
                             f"see journalctl -u {unit}")
        if not app.multi_instance:
            _check_environment(app, sd.state(app.service).main_pid)
    _check_through_nginx(app, nginx.load_state == "loaded", "installed")
    _write_atomic(_manifest_path(app.name), json.dumps({**manifest, "verified": time.time()}, indent=2) + "\n")
    return 0


def _check_through_nginx(app: AppConfig, nginx_loaded: bool, done: str = "installed and running") -> int:
    """The last word of every install, even one that changed nothing: does the app answer through nginx?"""
    if not nginx_loaded:
        print(f"{app.name}: {done} (nginx.service not found: the site is written but not served)")
        return 0
    status = _http_status(app)
    if not app.health_ok(status):
        raise Failed(f"{app.name}: {done}, but {app.health_path} through nginx (Host: {app.health_host}) answered "
                     f"{status or 'nothing'}; see journalctl -u {app.service}")
    print(f"{app.name}: {done}; {app.health_path} answers {status} through nginx")
    return 0


#: Service settings a reload applies: systemd reads them per job or sets them up for every process it
#: spawns (StateDirectory=, for the helper), or the new master gets them from the helper (Environment=,
#: EnvironmentFile=). Any other changed line needs a restart.
_RELOAD_SAFE = ("Environment=", "EnvironmentFile=", "ExecReload=", "ExecStartPost=", "TimeoutStartSec=",
                "TimeoutStopSec=", "Restart=", "RestartSec=", "Description=",
                # reloader's own records: only the helper (a fresh process in a fresh namespace) writes them.
                # The app's own ReadWritePaths= are other lines, and need a restart.
                f"ReadWritePaths={STATE_DIR}/",
                # systemd reads these at daemon-reload; the master needs nothing of them (--notify-reload
                # on and off, tested on systemd 257).
                "Type=", "ReloadSignal=", "#")


def restart_only_changes(app: AppConfig, files: list[RenderedFile]) -> list[str]:
    """The settings in the service/socket units that differ from the installed ones and a reload cannot
    apply, as 'UNIT: Key' (empty when a reload brings everything)."""
    out = []
    for f in files:
        if not f.install_path.endswith((f"/{app.service}", f"/{app.socket_unit}")):
            continue
        try:
            old = Path(f.install_path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            continue
        new = f.content.splitlines()
        for line in sorted(set(old) ^ set(new)):
            if line.strip() and not line.startswith(_RELOAD_SAFE) and "=" in line:
                key = f"{os.path.basename(f.install_path)}: {line.split('=', 1)[0]}="
                if key not in out:
                    out.append(key)
    return out


def _check_environment(app: AppConfig, main_pid: int) -> None:
    """The running master has the configured environment (what its gunicorn config recorded at boot),
    or install says exactly which variables it lacks."""
    from . import releases

    booted = releases.booted(app, main_pid)
    if not booted:
        raise Failed(f"{app.name}: cannot tell which environment master {main_pid} runs with (no "
                     f"{app.ready_dir}/{main_pid}/boot.json); run `systemctl restart {app.service}`")
    expected = dict(app.environment)
    if app.environment_file:
        expected.update(_read_environment_file(app.environment_file))
    env = booted.get("environ", {})
    wrong = sorted(k for k, v in expected.items() if env.get(k) != v)
    if wrong:
        raise Failed(f"{app.name}: the running master {main_pid} does not have {', '.join(wrong)} as configured; "
                     f"run `systemctl restart {app.service}`")


def _read_environment_file(path: str) -> dict[str, str]:
    """The plain KEY=VALUE lines of an EnvironmentFile= (quoted or escaped values are left to systemd)."""
    out = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if not any(c in value for c in "\\\"'"):
            out[key] = value
    return out


def _job_ok(sd: object, unit: str, result: str, verb: str) -> None:
    if result != "done":
        raise Failed(f"{verb} {unit}: job {result}; see journalctl -u {unit}")


def _http_status(app: AppConfig) -> int:
    """The health path's status through the app's nginx site (0 when nothing answered)."""
    from .verify import _probe, target_of

    host_port, _ = target_of(app.nginx.listen[0], app.nginx.server_name)
    return _probe(f"http://{host_port}{app.health_path}", {"Host": app.health_host}, 10)[0]


def cmd_uninstall(args: argparse.Namespace) -> int:
    from .bus import Systemd

    manifest = _read_manifest(args.name)
    if not manifest:
        raise Failed(f"{args.name} is not managed by reloader (no {_manifest_path(args.name)})")
    if os.geteuid() != 0:
        raise Failed("uninstall removes files from /etc and manages system units: run it as root (sudo)")
    shared_elsewhere = set()
    for other in STATE_DIR.glob("*.json"):
        if other.stem != args.name:
            shared_elsewhere |= set(_read_manifest(other.stem).get("files", {}))
    with Systemd() as sd:
        units = manifest.get("units", [])
        for unit in units:
            sd.stop_unit(unit, timeout=300)
        sd.disable(units)
        for path in manifest.get("files", {}):
            if path not in shared_elsewhere:
                Path(path).unlink(missing_ok=True)
                print(f"removed {path}")
        if manifest.get("state_dir"):
            shutil.rmtree(manifest["state_dir"], ignore_errors=True)
            print(f"removed {manifest['state_dir']}/")
        dropin_dir = Path(NGINX_DROPIN).parent
        if dropin_dir.is_dir() and not any(dropin_dir.iterdir()):
            dropin_dir.rmdir()
        _manifest_path(args.name).unlink()
        sd.daemon_reload()
        nginx = sd.state("nginx.service")
        if nginx.running:
            _job_ok(sd, "nginx.service", sd.reload_unit("nginx.service", timeout=120), "reload")
    print(f"{args.name}: uninstalled")
    return 0


# --- deploy / status ------------------------------------------------------------------------------------
def _app_for(name: str) -> AppConfig:
    path = CONFIG_DIR / f"{name}.toml"
    if not path.exists():
        raise Failed(f"{name} is not managed by reloader (no {path}); install it with `reloader install`")
    return load(path)


def cmd_deploy(args: argparse.Namespace) -> int:
    """Reload NAME; with --release DIR, point current at DIR first and put it back if DIR is refused."""
    from . import releases

    app = _app_for(args.name)
    if not getattr(args, "release", None):
        return _deploy(app, args)
    try:
        target = releases.check_release(app, args.release)
    except releases.BadRelease as e:
        raise ConfigError(f"--release {e}") from None
    return _deploy(app, args, target)


def _deploy(app: AppConfig, args: argparse.Namespace, target: str = "") -> int:
    """The reload job over D-Bus; with *target*, current points at it for the reload and is put back
    where it was if the reload refuses it (the operator's pointer never names a refused release).
    After a successful deploy of a release, keep_releases prunes the oldest release directories."""
    from . import releases
    from .bus import Systemd

    tty = sys.stderr.isatty()
    with Systemd() as sd:
        before = sd.state(app.service)
        if before.load_state == "masked":
            raise Failed(f"{app.service} is masked; `systemctl unmask {app.service}` first")
        if before.load_state != "loaded":
            raise Failed(f"{app.service} is not loaded ({before.load_state}); run `reloader install`")
        if before.active_state != "active":
            raise Failed(f"{app.service} is {before.active_state}, not running: start it instead of deploying")
        timeout = args.timeout or (app.ready_timeout + app.preflight_timeout + app.graceful_timeout + 60)
        pointed_before = ""
        if target:
            try:
                pointed_before = releases.point_current(app, target)
            except releases.BadRelease as e:
                raise ConfigError(f"--release: {e}") from None
        last = [0.0]

        def progress(elapsed: float) -> None:
            if tty:
                status = sd.state(app.service).status_text
                print(f"\r\033[K{app.name}: {elapsed:5.1f} s  {status[:100]}", end="", file=sys.stderr, flush=True)
            elif elapsed - last[0] >= 5:
                last[0] = elapsed
                print(f"{app.name}: still reloading after {elapsed:.0f} s", file=sys.stderr, flush=True)

        started = time.monotonic()
        result = sd.reload_unit(app.service, timeout=timeout, progress=progress)
        took = time.monotonic() - started
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        after = sd.state(app.service)
    ok = result == "done" and after.running and after.reload_result in ("success", "")
    notes = []
    if target and not ok:
        releases.point_current(app, pointed_before)
        notes.append(f"current put back to {pointed_before}")
    if target and ok and not app.multi_instance:
        notes += [f"pruned {path}" for path in releases.prune(app, app.keep_releases)]
    report = {
        "unit": app.service, "result": "success" if ok else "failed", "job": result,
        "reload_result": after.reload_result, "active_state": after.active_state, "sub_state": after.sub_state,
        "old_main_pid": before.main_pid, "new_main_pid": after.main_pid, "seconds": round(took, 2),
        "status": after.status_text, "current": releases.resolve_current(app), "notes": notes,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{app.name}: deploy {report['result']} in {took:.1f} s (job {result}, reload result "
              f"{after.reload_result or '?'}, {after.active_state}/{after.sub_state})")
        print(f"  MainPID {before.main_pid} -> {after.main_pid}")
        print(f"  status: {after.status_text}")
        for note in notes:
            print(f"  {note}")
    return 0 if ok else 1


def cmd_releases(args: argparse.Namespace) -> int:
    """Every release directory of NAME with its state: live, previous, refused (why, when), never tried."""
    from . import releases

    app = _app_for(args.name)
    rows = releases.listing(app)
    # Blue-green/rolling: which instances each release is pinned on (a stopped colour keeps its pin).
    pins: dict[str, list[str]] = {}
    for instance in app.instance_names if app.multi_instance else ():
        try:
            pins.setdefault(os.readlink(app.instance_link(instance)), []).append(instance)
        except OSError:
            pass
    for row in rows:
        if pins.get(row["path"]):
            row["instances"] = pins[row["path"]]
    if args.json:
        print(json.dumps({"name": app.name, "root": releases.releases_root(app),
                          "current": releases.resolve_current(app), "releases": rows}, indent=2))
        return 0
    current = releases.resolve_current(app)
    for row in rows:
        extra = ""
        if row["state"] == "refused":
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
            extra = f" at {when}: {row['reason']}"
        mark = "  <- current" if row["path"] == current else ""
        on = f" (pinned on {', '.join(row['instances'])})" if row.get("instances") else ""
        print(f"{row['release']:<24} {row['state']}{extra}{on}{mark}")
    if not rows:
        print(f"{app.name}: no release directories in {releases.releases_root(app)}")
    return 0


def _managed() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []


def cmd_status(args: argparse.Namespace) -> int:
    from . import proc
    from .bus import Systemd

    names = [args.name] if args.name else _managed()
    rows = []
    with Systemd() as sd:
        for name in names:
            app = _app_for(name)
            st = sd.state(app.service)
            sock = sd.state(app.socket_unit) if app.socket_activation and not app.multi_instance else None
            row = {
                "name": name, "service": st.active_state + "/" + st.sub_state, "load_state": st.load_state,
                "socket": (sock.active_state + "/" + sock.sub_state) if sock else None,
                "main_pid": st.main_pid, "workers": len(proc.children(st.main_pid)) if st.main_pid else 0,
                "reload_result": st.reload_result, "status": st.status_text,
                "release": os.path.basename(os.path.realpath(app.working_directory)),
                "strategy": app.strategy,
            }
            row.update(_release_state(app))
            if app.multi_instance:
                row["instances"] = _instances(app, sd)
                row["live"] = [i["instance"] for i in row["instances"] if i["live"]]
                row["workers"] = sum(i["workers"] for i in row["instances"] if i["live"])
            rows.append(row)
    if args.json:
        print(json.dumps(rows if not args.name else rows[0], indent=2))
    else:
        if not rows:
            print("no apps managed by reloader (none in /etc/reloader)")
        for r in rows:
            print(f"{r['name']}: {r['service']} (socket {r['socket'] or 'none'}), MainPID {r['main_pid']}, "
                  f"{r['workers']} workers, release {r['release']}, last reload {r['reload_result'] or '-'}")
            if r.get("refused_release"):
                print(f"  refused: release {r['refused_release']}: {r['refused_reason']}")
            if r.get("pending"):
                print(f"  {r['pending']}")
            for i in r.get("instances", []):
                print(f"  {i['unit']}: {i['state']}{' (live)' if i['live'] else ''}, release {i['release'] or '-'}, "
                      f"MainPID {i['main_pid']}, {i['workers']} workers")
            if r["status"]:
                print(f"  {r['status']}")
    bad = [r for r in rows if not r["service"].startswith("active")]
    return 1 if bad else 0


def _release_state(app: AppConfig) -> dict:
    """The live release (what serves), separately the last refused one and why, and what current names."""
    from . import releases

    records = releases.read(app)
    live = records.live
    # The refusal that matters is one after the live release went live (older ones are history).
    refused = max(((d, r) for d, r in records.refused.items() if r.time > (live.since if live else 0)),
                  key=lambda item: item[1].time, default=None)
    return {
        "release": live.name if live else os.path.basename(releases.resolve_current(app)),
        "live_release": live.release if live else None,
        "previous_release": records.previous.release if records.previous else None,
        "current": releases.resolve_current(app),
        "refused_release": os.path.basename(refused[0]) if refused else None,
        "refused_reason": refused[1].reason if refused else None,
        "pending": releases.pending(app, records) or None,
    }


def _instances(app: AppConfig, sd: object) -> list[dict]:
    from . import proc
    from .fleet import Fleet

    fleet = Fleet(app, sd, None)  # type: ignore[arg-type]
    live = fleet.state()["live"]
    out = []
    for instance in app.instance_names:
        st = sd.state(app.instance_unit(instance))  # type: ignore[attr-defined]
        out.append({"instance": instance, "unit": app.instance_unit(instance), "live": instance in live,
                    "state": f"{st.active_state}/{st.sub_state}", "main_pid": st.main_pid,
                    "workers": len(proc.children(st.main_pid)) if st.main_pid else 0,
                    "release": os.path.basename(fleet.pinned(instance))})
    return out


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="render CONFIG, install its units and nginx site, start or reload it")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    p.add_argument("--notify-reload", action="store_true",
                   help="render Type=notify-reload (systemd >= 253). The default Type=notify is more robust: "
                   "a reload helper killed mid-reload ends the reload at once, while under notify-reload "
                   "(systemd 257) the unit stays reloading until `systemctl restart`; see README")
    p.add_argument("--restart", action="store_true",
                   help="restart the running service when a change needs it (writable paths, user): a reload "
                   "cannot apply those; with socket_activation the socket holds connections meanwhile")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("setup", help="run the [setup] commands of CONFIG in a release (NAME-setup.service's "
                       "ExecStart=; the service's ExecReload= runs them on every deploy)")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--release", metavar="DIR", help="the release directory (default: working_directory resolved)")
    p.set_defaults(func=cmd_setup)

    for alias in ("deploy", "reload"):
        p = sub.add_parser(alias, help="reload NAME over D-Bus and report whether the new release is serving")
        p.add_argument("name", metavar="NAME")
        p.add_argument("--timeout", type=float, default=0, help="seconds to wait for the reload job")
        p.add_argument("--json", action="store_true")
        p.add_argument("--release", metavar="DIR", help="point current at DIR (a directory in the releases root) "
                       "and deploy it; current is put back if DIR is refused")
        p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("releases", help="NAME's releases: live, previous, refused (why, when), never tried")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_releases)

    p = sub.add_parser("status", help="state of NAME (or of every managed app)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("uninstall", help="stop and disable NAME and remove exactly the files install wrote")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("exec-reload", help="(systemd hook) the app service's ExecReload=")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--notify-reload", action="store_true", help="the unit is Type=notify-reload")
    p.set_defaults(func=cmd_exec_reload)

    p = sub.add_parser("exec-started", help="(systemd hook) the app service's ExecStartPost=")
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(func=cmd_exec_started)

    p = sub.add_parser("rollback", help="verified reload onto the previous (or the named) proven release; "
                       "blue-green: switch NAME back to the previous colour")
    p.add_argument("name", metavar="NAME")
    p.add_argument("release", metavar="RELEASE", nargs="?", help="a release that was live before (blue-green "
                   "without RELEASE switches back to the previous colour)")
    p.set_defaults(func=cmd_rollback)

    for action, hook in (("start", "ExecStart="), ("stop", "ExecStop=")):
        p = sub.add_parser(f"instances-{action}", help=f"(systemd hook) blue-green/rolling controller's {hook}")
        p.add_argument("config", metavar="CONFIG")
        p.set_defaults(func=cmd_instances, action=action)

    p = sub.add_parser("nginx-reload", help="(systemd hook) nginx.service's ExecReload=: test, reload, verify")
    p.set_defaults(func=cmd_nginx_reload)

    from . import verify

    verify.add_parser(sub)


