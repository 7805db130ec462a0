"""Render an :class:`~reloader.config.AppConfig` into the files reloader installs. Pure: no I/O but reads.

Each output is a :class:`RenderedFile` that knows its short name (the layout of ``reloader render -o DIR``
and of ``units/``) and where ``reloader install`` puts it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import maintenance
from .config import CHAINED_HOOKS, OWNED_SETTINGS, AppConfig

UNIT_DIR = "/etc/systemd/system"
NGINX_SITE_DIR = "/etc/nginx/conf.d"
NGINX_DROPIN = f"{UNIT_DIR}/nginx.service.d/reloader.conf"


@dataclass(frozen=True)
class RenderedFile:
    name: str  #: relative path under ``render -o DIR`` and ``units/``
    install_path: str  #: absolute path on the target system
    content: str
    mode: int = 0o644
    #: Runtime state seeded at install (e.g. the live nginx upstream): written only when missing.
    seed: bool = False


def templates_dir() -> Path:
    """Find the templates: next to the checkout, installed as package data, or in /usr/share."""
    checkout = Path(__file__).resolve().parent.parent
    candidates = [
        os.environ.get("RELOADER_TEMPLATES", ""),
        # ../templates only in a checkout: installed, that is dist-packages/templates, anyone's name.
        str(checkout / "templates") if (checkout / "pyproject.toml").is_file() else "",
        str(Path(__file__).resolve().parent / "templates"),
        "/usr/share/reloader/templates",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "service.j2").is_file():
            return Path(candidate)
    raise FileNotFoundError("reloader's templates are missing (looked in: "
                            + ", ".join(c for c in candidates if c) + "); reinstall reloader")


# --- filters: the only escaping the templates do ------------------------------------------------------
def _sd(value: str) -> str:
    """Escape systemd specifiers: a literal '%' is '%%' in unit files."""
    return str(value).replace("%", "%%")


def _sd_quote(value: str) -> str:
    """Quote one word for systemd (e.g. ``Environment="K=v w"``): escape '\\', '"' and specifiers."""
    return '"' + _sd(str(value)).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Stands for the instance name in a path rendered into a template unit (``NAME@.socket``): "{" is a
#: character no config path may hold, so :func:`_sd_instance` can escape the rest and put ``%i`` there.
INSTANCE = "{instance}"


def _sd_instance(path: str) -> str:
    """A per-instance path (built with :data:`INSTANCE`) for a template unit: escaped, ``%i`` for the name."""
    return _sd(path).replace(INSTANCE, "%i")


def _basename(path: str) -> str:
    """The config's file name, for header comments: escaped so a newline in it can't add a line."""
    return os.path.basename(path).encode("unicode_escape").decode("ascii")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(sd=_sd, sd_quote=_sd_quote, sd_instance=_sd_instance, pyrepr=repr, basename=_basename)
    env.globals["INSTANCE"] = INSTANCE
    return env


#: gunicorn's own default access_log_format (27.0), for a config that enables the access log without one.
GUNICORN_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


def render(app: AppConfig, *, notify_reload: bool = False) -> list[RenderedFile]:
    """All files of *app*, in install order (config before the units that read it).

    *notify_reload* selects ``Type=notify-reload`` (systemd ≥ 253); on older systemd it is ``notify``.
    """
    env = _environment()

    def get(template: str, **extra: object) -> str:
        text = env.get_template(template).render(app=app, **extra)
        # Jinja blocks leave blank runs in unit files; Python keeps its PEP 8 double blank lines.
        return text if template.endswith(".py.j2") else re.sub(r"\n{3,}", "\n\n", text)

    files = [RenderedFile(f"{app.name}.gunicorn.conf.py", app.gunicorn_config_path,
                          get("gunicorn.conf.py.j2", owned_settings=OWNED_SETTINGS, chained_hooks=CHAINED_HOOKS,
                              default_access_log_format=GUNICORN_ACCESS_LOG_FORMAT))]
    if app.pausable:  # loaded by the gunicorn config in each worker (reloader.pause_hook)
        files.append(RenderedFile(f"{app.name}.pause_hook.py", app.pause_hook_path,
                                  Path(__file__).with_name("pause_hook.py").read_text(encoding="utf-8")))
    if app.drain_timeout:  # loaded by the gunicorn config in each master and worker (reloader.drain)
        files.append(RenderedFile(f"{app.name}.drain_hook.py", app.drain_hook_path,
                                  Path(__file__).with_name("drain.py").read_text(encoding="utf-8")))
    if app.multi_instance:
        files += [
            RenderedFile(f"{app.name}.service", f"{UNIT_DIR}/{app.service}", get("controller.j2")),
            RenderedFile(f"{app.name}@.service", f"{UNIT_DIR}/{app.name}@.service", get("instance.j2")),
            RenderedFile(f"{app.name}@.socket", f"{UNIT_DIR}/{app.name}@.socket", get("instance-socket.j2")),
            RenderedFile(f"{app.name}.upstream.conf", app.upstream_path, upstream(app), seed=True),
        ]
    else:
        files.append(RenderedFile(f"{app.name}.service", f"{UNIT_DIR}/{app.service}",
                                  get("service.j2", service_type="notify-reload" if notify_reload else "notify")))
        if app.socket_activation:
            files.append(RenderedFile(f"{app.name}.socket", f"{UNIT_DIR}/{app.socket_unit}", get("socket.j2")))
        if app.setup.commands:
            files.append(RenderedFile(f"{app.name}-setup.service", f"{UNIT_DIR}/{app.setup_unit}", get("setup.j2")))
        if app.max_worker_memory:
            files += [RenderedFile(f"{app.name}-recycle.service", f"{UNIT_DIR}/{app.recycle_unit}", get("recycle.j2")),
                      RenderedFile(f"{app.name}-recycle.timer", f"{UNIT_DIR}/{app.recycle_timer}",
                                   get("recycle-timer.j2"))]
    files.append(RenderedFile(f"{app.name}.nginx.conf", f"{NGINX_SITE_DIR}/{app.name}.conf",
                              get("nginx-site.j2", static=static_locations(app), **maintenance.template_values())))
    files.append(RenderedFile("nginx.service.d/reloader.conf", NGINX_DROPIN,
                              env.get_template("nginx-dropin.j2").render(helper=app.helper)))
    return files


def sandbox(app: AppConfig) -> str:
    """The sandbox settings every unit running the app's code gets (templates/sandbox.j2): also what the
    first start's pre-flight runs under (reloader.firststart)."""
    return _environment().get_template("sandbox.j2").render(app=app)


def static_locations(app: AppConfig) -> list[tuple[str, str, str, str]]:
    """(location, directory, regex, path in the release) per static location. A directory inside the
    release (under working_directory) is served from the *live* release, then the previous one, through
    the links in the state dir (reloader.releases): never from a refused release `current` points at, and
    the old generation's assets stay reachable after a deploy. Others are served as configured."""
    out = []
    prefix = app.working_directory.rstrip("/") + "/"
    for location, directory in app.nginx.static:
        inside = "" if app.multi_instance or not directory.startswith(prefix) else directory[len(prefix):]
        regex = "^" + re.escape(location) + ("(?<reloader_file>.*)$" if location.endswith("/") else
                                             "(?<reloader_file>/.*)?$")
        out.append((location, directory, regex, inside))
    return out


def upstream(app: AppConfig) -> str:
    """The nginx upstream include: the app's routes (stable socket paths the fleet points at instances).
    It depends on the config alone; the fleet writes it (and reloads nginx) only when it differs, e.g.
    after an upgrade from the layout that named the instances' sockets and was rewritten by every deploy."""
    return _environment().get_template("upstream.j2").render(app=app)


def write_tree(files: list[RenderedFile], out: Path) -> list[Path]:
    """Write *files* under *out* all or nothing: into a temp dir first, then each renamed into place.

    A failure while writing leaves *out* as it was; the renames happen only after every file is written.
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".reloader-render-", dir=out))
    written: list[Path] = []
    backups: dict[Path, Path] = {}
    try:
        for f in files:
            path = staging / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f.content, encoding="utf-8")
            path.chmod(f.mode)
        try:
            for i, f in enumerate(files):
                target = out / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists() or target.is_symlink():
                    backup = staging / ".old" / str(i)
                    backup.parent.mkdir(exist_ok=True)
                    os.replace(target, backup)
                    backups[target] = backup
                os.replace(staging / f.name, target)
                written.append(target)
        except BaseException:
            # A rename failed half-way: put back what was there, so the tree is as before.
            for target in reversed(written):
                target.unlink()
            for target, backup in backups.items():
                os.replace(backup, target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
