"""``reloader install`` and ``reloader uninstall``: the files, the user, the units and their first start.

install renders the config, refuses (exit 2, nothing written) what the units would trip over later, writes
every file atomically with a manifest of what it wrote (reloader.registry), creates the user and the
records directory, daemon-reloads, runs the setup commands on a first install, starts or reloads the app
(restarts only on request, for what a reload cannot apply), reloads nginx when its files changed, and ends
by checking the app through nginx. Run again unchanged it only checks. uninstall removes exactly the
manifest's files.
"""

from __future__ import annotations

import difflib
import grp
import hashlib
import json
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

from . import maintenance, probe, registry
from .bus import Systemd, client_wait
from .config import STATE_DIR, AppConfig, ConfigError, load
from .errors import Failed
from .render import NGINX_DROPIN, RenderedFile, render
from .run import run

#: Oldest systemd reloader is known to work with (Debian 11's; 252 and 257 are tested).
MIN_SYSTEMD = 247


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


def _ensure_user(app: AppConfig) -> None:
    try:
        pwd.getpwnam(app.user)
        return
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
           "--shell", "/usr/sbin/nologin", "--user-group" if app.group == app.user else f"--gid={app.group}",
           app.user]
    run(cmd, what=f"creating the user {app.user!r} (useradd)")


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


def _run_setup_unit(sd: object, app: AppConfig) -> None:
    """First install: the setup commands run in their oneshot unit (the app's user, sandbox, environment).
    A failure quotes the commands' own output (the exception, its file and line), not systemd's lines."""
    from . import causes

    print(f"{app.name}: running the setup commands ({app.setup_unit})")
    since = time.time() - 1
    result = sd.start_unit(app.setup_unit, timeout=app.setup.timeout + 60)  # type: ignore[attr-defined]
    st = sd.state(app.setup_unit)  # type: ignore[attr-defined]
    if result != "done" or st.active_state == "failed":
        release = os.path.realpath(app.working_directory)
        cause = causes.summarize(causes.unit_output(app.setup_unit, since, until=" failed"), app, release)
        raise Failed(f"{app.name}: setup commands failed ({app.setup_unit}: job {result}); {app.service} not "
                     f"started: {cause or 'see journalctl -u ' + app.setup_unit}"
                     f"{causes.advice(cause, app, release)}")


def _preflight_first_start(app: AppConfig, *, import_only: bool) -> None:
    """Before the first start: the release imports (and answers) as the service will run it, in its sandbox."""
    from . import firststart

    why_not = firststart.unavailable(app)
    if why_not:
        print(f"{app.name}: first start not pre-flighted: {why_not}")
        return
    status = firststart.preflight(app, import_only=import_only)
    print(f"{app.name}: pre-flight of the first start in {app.service}'s sandbox: "
          + ("the app imports" if import_only else f"{app.health_path} answered {status}"))


def _start_job_ok(app: AppConfig, unit: str, result: str, since: float) -> None:
    if result != "done":
        raise Failed(f"start {unit}: job {result}{_cause_in_journal(app, unit, since)}; see journalctl -u {unit}")


def _cause_in_journal(app: AppConfig, unit: str, since: float) -> str:
    """': CAUSE' from what *unit*'s processes printed since *since* (the app's traceback, its file and
    line), never systemd's own lines ("Failed with result 'exit-code'"); "" when they printed nothing."""
    from . import causes

    release = os.path.realpath(app.working_directory)
    cause = causes.summarize(causes.unit_output(unit, since), app, release)
    return f": {cause}{causes.advice(cause, app, release)}" if cause else ""


def install(config: str, *, dry_run: bool = False, allow_restart: bool = False, notify_reload: bool = False) -> int:
    """``reloader install CONFIG``: see the module docstring; 0 when the app answers through nginx."""
    app = load(config)
    config_text = Path(config).read_text(encoding="utf-8")
    problems = preinstall_problems(app)
    if problems:
        raise ConfigError("; ".join(problems))
    if os.geteuid() != 0 and not dry_run:
        raise Failed("install writes /etc and manages system units: run it as root (sudo)")
    if dry_run:
        return _install(app, config, config_text, dry_run=True, allow_restart=False, notify_reload=notify_reload)
    # One install or deploy of the app at a time: a deploy still running may be baking for the installed
    # config's bake_seconds, so wait as long as the longer of the two budgets.
    try:
        installed = registry.app_for(app.name).reload_budget
    except (Failed, ConfigError):
        installed = 0
    with registry.operator_lock(app, "install", client_wait(max(app.reload_budget, installed))):
        return _install(app, config, config_text, dry_run=False, allow_restart=allow_restart,
                        notify_reload=notify_reload)


def _install(app: AppConfig, config: str, config_text: str, *, dry_run: bool, allow_restart: bool,
             notify_reload: bool) -> int:
    """The install itself, under the operator lock (a dry run takes none: it changes nothing)."""
    with Systemd() as sd:
        if sd.version < MIN_SYSTEMD:
            raise Failed(f"systemd {sd.version} is too old: reloader needs {MIN_SYSTEMD} or newer "
                         "(MAINPID= hand-over from ExecReload=, ReloadResult)")
        if notify_reload and sd.version < 253:
            raise Failed(f"--notify-reload needs systemd 253 or newer (this is systemd {sd.version}); "
                         "leave it off to use Type=notify")
        files = _planned_files(app, config_text, notify_reload)
        changes = {f.install_path: _diff(f.install_path, f.content) for f in files
                   if not (f.seed and Path(f.install_path).exists())}
        changed = [p for p, d in changes.items() if d]
        service = sd.state(app.service)
        if dry_run:
            for path in changed:
                print("\n".join(changes[path]))
            print(f"{app.name}: {len(changed)} file(s) would change" if changed else f"{app.name}: no changes")
            return 0
        # The shortcut only for an install that once completed (a failed first install wrote the files but
        # may have left nginx without the site, or the service restarting by itself).
        verified = bool(registry.read_manifest(app.name).get("verified"))
        if not changed and service.running and verified:
            print(f"{app.name}: already installed and running; nothing changed")
            if not app.multi_instance:
                _check_environment(app, service.main_pid)
            _check_through_nginx(app, sd.state("nginx.service").load_state == "loaded")
            return 0
        # A reload starts the new master from the old one: it keeps the old unit's user, sandbox (mount
        # namespace) and sockets; only the environment and the gunicorn config reach it. Anything else
        # needs a restart: refuse before writing anything unless asked to restart.
        restart = restart_only_changes(app, files) if service.running else []
        restart_units = ([app.socket_unit] if any(k.startswith(app.socket_unit) for k in restart) else []) \
            + [app.service]
        if restart and not allow_restart:
            raise Failed(f"{app.name}: {', '.join(restart)} changed, which a reload cannot apply (the running "
                         "generation keeps its user, sandbox and sockets); nothing was changed: run `reloader "
                         f"install {config} --restart`, which runs `systemctl restart {' '.join(restart_units)}`"
                         + (" (the socket holds connections meanwhile)" if app.socket_activation
                            and app.socket_unit not in restart_units else
                            " (requests are refused while the socket is re-created)"))
        for path in changed:
            print("\n".join(changes[path]))
        _ensure_user(app)
        if not service.running:
            # Refused here, nothing of the new config is written yet. With setup commands (migrations the
            # health path may need), only the import now; the request after them.
            _preflight_first_start(app, import_only=bool(app.setup.commands))
        if not app.multi_instance:
            _ensure_state_dir(app)
        for f in files:
            if f.install_path in changed:
                _write_atomic(Path(f.install_path), f.content, f.mode)
        units = [app.service] + ([app.socket_unit] if app.socket_activation and not app.multi_instance else [])
        units += [app.recycle_timer] if app.max_worker_memory and not app.multi_instance else []
        _stop_dropped_units(sd, app, units)
        manifest = {"name": app.name, "config": app.config_path, "installed": time.time(),
                    "files": {f.install_path: hashlib.sha256(f.content.encode()).hexdigest() for f in files},
                    "units": units}
        manifest["state_dir"] = app.state_dir  # the records (single master) or the instances' pins
        _write_atomic(registry.manifest_path(app.name), json.dumps(manifest, indent=2) + "\n")
        sd.enable(units)  # before daemon-reload, so systemd loads the units with their new symlinks
        sd.daemon_reload()
        timeout = client_wait(app.reload_budget)
        if app.socket_activation and not app.multi_instance:
            _job_ok(app.socket_unit, sd.start_unit(app.socket_unit, timeout=60), "start")
        if app.setup.commands and not service.running:
            _run_setup_unit(sd, app)
            _preflight_first_start(app, import_only=False)
        since = time.time() - 1  # the journal of what the units print from here on
        if restart:
            print(f"{app.name}: restarting {' '.join(restart_units)} for {', '.join(restart)}")
            if app.setup.commands:
                _run_setup_unit(sd, app)
            for unit in restart_units:
                _job_ok(unit, sd.restart_unit(unit, timeout=timeout), "restart")
        elif service.running:
            print(f"{app.name}: reloading the running service")
            _job_ok(app.service, sd.reload_unit(app.service, timeout=timeout), "reload")
        else:
            _start_job_ok(app, app.service, sd.start_unit(app.service, timeout=timeout), since)
        if app.recycle_timer in units:
            _job_ok(app.recycle_timer, sd.start_unit(app.recycle_timer, timeout=60), "start")
        nginx = sd.state("nginx.service")
        # An nginx reload closes idle client keep-alive connections: only when nginx's files changed (or a
        # previous install never completed), not for a change of the app alone.
        nginx_changed = not verified or any(p.startswith("/etc/nginx/") or "/nginx.service.d/" in p for p in changed)
        if nginx.load_state == "loaded":
            if nginx.running and nginx_changed:
                _job_ok("nginx.service", sd.reload_unit("nginx.service", timeout=120), "reload")
            elif nginx.running:
                print(f"{app.name}: nginx's files are unchanged; nginx not reloaded")
            else:
                _job_ok("nginx.service", sd.start_unit("nginx.service", timeout=120), "start")
        for unit in units:
            st = sd.state(unit)
            if st.active_state != "active":
                raise Failed(f"{unit} is {st.active_state}/{st.sub_state} after install"
                             f"{_cause_in_journal(app, unit, since)}; see journalctl -u {unit}")
        if not app.multi_instance:
            _check_environment(app, sd.state(app.service).main_pid)
    _check_through_nginx(app, nginx.load_state == "loaded", "installed")
    _write_atomic(registry.manifest_path(app.name), json.dumps({**manifest, "verified": time.time()}, indent=2) + "\n")
    return 0


def _stop_dropped_units(sd: Systemd, app: AppConfig, units: list[str]) -> None:
    """Units the last install set up that this config no longer has (e.g. the recycle timer once
    max_worker_memory is removed): stopped and disabled, so nothing runs for a setting that is gone."""
    dropped = [u for u in registry.read_manifest(app.name).get("units", []) if u not in units]
    for unit in dropped:
        sd.stop_unit(unit, timeout=60)
    if dropped:
        sd.disable(dropped)
        print(f"{app.name}: stopped and disabled {', '.join(dropped)} (no longer configured)")


def _check_through_nginx(app: AppConfig, nginx_loaded: bool, done: str = "installed and running") -> None:
    """The last word of every install, even one that changed nothing: does the app answer through nginx?"""
    if not nginx_loaded:
        print(f"{app.name}: {done} (nginx.service not found: the site is written but not served)")
        return
    status = _http_status(app)
    if status == 503 and maintenance.state(app)["on"]:  # reloader.maintenance: nginx answers for the app
        print(f"{app.name}: {done}; maintenance is on, so nginx answers 503 (`reloader maintenance {app.name} "
              "off` ends it)")
        return
    if not app.health_ok(status):
        raise Failed(f"{app.name}: {done}, but {app.health_path} through nginx (Host: {app.health_host}) answered "
                     f"{status or 'nothing'}; see journalctl -u {app.service}")
    print(f"{app.name}: {done}; {app.health_path} answers {status} through nginx")


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
                     f"{app.boot_record(main_pid)}); run `systemctl restart {app.service}`")
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


def _job_ok(unit: str, result: str, verb: str) -> None:
    if result != "done":
        raise Failed(f"{verb} {unit}: job {result}; see journalctl -u {unit}")


def _http_status(app: AppConfig) -> int:
    """The health path's status through the app's nginx site (0 when nothing answered)."""
    host_port, _ = probe.target_of(app.nginx.listen[0], app.nginx.server_name)
    return probe.url_status(f"http://{host_port}{app.health_path}", {"Host": app.health_host}, 10)[0]


def uninstall(name: str) -> int:
    """``reloader uninstall NAME``: stop, disable and remove exactly what install wrote."""
    manifest = registry.read_manifest(name)
    if not manifest:
        raise Failed(f"{name} is not managed by reloader (no {registry.manifest_path(name)})")
    if os.geteuid() != 0:
        raise Failed("uninstall removes files from /etc and manages system units: run it as root (sudo)")
    shared_elsewhere = set()
    for other, recorded in registry.manifests().items():
        if other != name:
            shared_elsewhere |= set(recorded.get("files", {}))
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
        registry.manifest_path(name).unlink()
        sd.daemon_reload()
        nginx = sd.state("nginx.service")
        if nginx.running:
            _job_ok("nginx.service", sd.reload_unit("nginx.service", timeout=120), "reload")
    print(f"{name}: uninstalled")
    return 0


