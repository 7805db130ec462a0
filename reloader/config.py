"""Read and validate an app's TOML config into a frozen, typed :class:`AppConfig`.

Everything downstream (templates, the reload engine, the CLI) receives an ``AppConfig`` and never a raw
dict, so every check lives here. Values end up inside systemd unit files, an nginx config and a Python
gunicorn config: a value that could inject text into any of them is refused with a one-line error naming
the file, the key and the fix, rather than escaped in a way a reader could misjudge.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where ``reloader install`` puts an app's config; the units' ``ExecReload=`` points here.
CONFIG_DIR = Path("/etc/reloader")

STRATEGIES = ("generation", "hup", "blue-green", "rolling")
#: Strategies that run several instances (NAME@INSTANCE.service) behind one nginx upstream.
MULTI_INSTANCE = ("blue-green", "rolling")
#: Where reloader keeps per-app state: the nginx upstream include and each instance's pinned release.
STATE_DIR = Path("/var/lib/reloader")
#: The helper the .deb installs; see :func:`default_helper` for a pip install.
DEB_HELPER = "/usr/bin/reloader"
#: Worker classes that serve an ASGI app (the pre-flight then speaks ASGI, with lifespan).
ASGI_WORKERS = frozenset({
    "asgi", "gunicorn.workers.gasgi.ASGIWorker",
    "uvicorn_worker.UvicornWorker", "uvicorn_worker.UvicornH11Worker",
    "uvicorn.workers.UvicornWorker", "uvicorn.workers.UvicornH11Worker",
})
#: gunicorn settings reloader writes itself: the key that sets each (or why it is reloader's), for the
#: error when one appears in [gunicorn.settings] or in the user's config_file.
OWNED_SETTINGS = {
    "wsgi_app": "[app] wsgi", "chdir": "[app] working_directory", "bind": "[gunicorn] socket",
    "workers": "[gunicorn] workers", "worker_class": "[gunicorn] worker_class", "threads": "[gunicorn] threads",
    "timeout": "[gunicorn] timeout", "graceful_timeout": "[gunicorn] graceful_timeout",
    "preload_app": "[gunicorn] preload_app", "accesslog": "[gunicorn] access_log",
    "errorlog": "the journal (stderr)", "pidfile": "the reload engine (it reads it)",
    "daemon": "systemd (the service is Type=notify)", "reload": "systemctl reload", "reload_engine": "systemctl reload",
    "reload_extra_files": "systemctl reload", "user": "[app] user", "group": "[app] group",
    "umask": "the socket unit", "control_socket_disable": "reloader (signals and systemd only)",
    "config": "[gunicorn] config_file", "raw_env": "[app] environment",
    "pre_exec": "the reload engine (a hook it defines; define yours in config_file, it is chained)",
}
#: Server hooks the generated config defines; a user's own (from config_file) runs first, then reloader's.
CHAINED_HOOKS = ("pre_exec", "when_ready", "post_worker_init", "child_exit", "on_exit")
#: gunicorn 27's callable settings: Python functions, which a TOML table cannot hold.
SERVER_HOOKS = frozenset({
    "on_starting", "on_reload", "when_ready", "pre_fork", "post_fork", "post_worker_init", "worker_int",
    "worker_abort", "pre_exec", "pre_request", "post_request", "child_exit", "worker_exit", "nworkers_changed",
    "on_exit", "ssl_context", "on_dirty_starting", "dirty_post_fork", "dirty_worker_init", "dirty_worker_exit",
})


class ConfigError(Exception):
    """A config problem, already phrased as the one line the user sees."""


# --- value patterns --------------------------------------------------------------------------------
# Allow-lists, not deny-lists: each names exactly the characters that are inert in every file the
# value is written to. "%" is allowed in paths because the templates escape it as "%%" for systemd.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_PATH = re.compile(r"/[A-Za-z0-9._/@+,:=%~-]*")
_WSGI = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\(\))?")
_WORKER_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_URL_PATH = re.compile(r"/[A-Za-z0-9._~/%-]*(\?[A-Za-z0-9._~/%=&-]*)?")
_LOCATION = re.compile(r"/[A-Za-z0-9._~/-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SERVER_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?(\.\*)?|_")
_LISTEN = re.compile(r"(\d{1,5}|(\d{1,3}\.){3}\d{1,3}:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5})")
_SIZE = re.compile(r"\d{1,9}[kKmMgG]?")
_SETTING = re.compile(r"[a-z_][a-z0-9_]{0,63}")
#: A systemd StateDirectory=/CacheDirectory=/LogsDirectory= name: relative to /var/lib, /var/cache, /var/log.
_SD_DIRECTORY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ANY = re.compile(r".*")


@dataclass(frozen=True)
class NginxConfig:
    """The app's nginx site: a server block proxying to the gunicorn socket."""

    server_name: tuple[str, ...] = ("_",)
    listen: tuple[str, ...] = ("80",)
    client_max_body_size: str = "10m"
    #: URL prefix → directory served by nginx directly (``location PREFIX { alias DIR; }``).
    static: tuple[tuple[str, str], ...] = ()
    proxy_read_timeout: int = 60
    #: The user nginx's workers run as; the gunicorn socket is made accessible to its group.
    user: str = "www-data"


@dataclass(frozen=True)
class SetupConfig:
    """Commands run as the app's user, in its sandbox and environment, in the release being deployed,
    before its new generation starts (e.g. ``python manage.py migrate --noinput``)."""

    commands: tuple[tuple[str, ...], ...] = ()
    #: Seconds for all commands together; a command still running then is killed and the deploy refused.
    timeout: int = 300


@dataclass(frozen=True)
class AppConfig:
    """One app: its Gunicorn service, socket, nginx site and reload policy."""

    name: str
    working_directory: str
    wsgi: str
    source: str = "<config>"
    user: str = ""
    group: str = ""
    virtualenv: str = ""
    gunicorn: str = ""
    workers: int = 2
    worker_class: str = "sync"
    threads: int = 1
    timeout: int = 30
    graceful_timeout: int = 30
    preload_app: bool = False
    socket: str = ""
    socket_activation: bool = True
    health_path: str = "/"
    environment: tuple[tuple[str, str], ...] = ()
    environment_file: str = ""
    strategy: str = "generation"
    preflight_timeout: int = 60
    ready_timeout: int = 120
    bake_seconds: float = 2.0
    instances: int = 3
    #: strategy "generation": start the new master with this many workers and swap the rest in lockstep
    #: (TTOU old, TTIN new), so at most workers + max_surge run; 0: a full second generation.
    max_surge: int = 0
    helper: str = DEB_HELPER
    #: Where release directories live ("" = the directory holding the release ``current`` points at).
    releases_root: str = ""
    #: How many release directories `reloader deploy` keeps (the live and previous one always stay).
    keep_releases: int = 5
    nginx: NginxConfig = field(default_factory=NginxConfig)
    #: Paths outside the systemd-managed directories the app may write (ReadWritePaths=); they must exist.
    read_write_paths: tuple[str, ...] = ()
    #: StateDirectory=/CacheDirectory=/LogsDirectory= names (systemd creates them, owned by the app user).
    state_directory: str = ""
    cache_directory: str = ""
    logs_directory: str = ""
    #: Inclusive range of health-path statuses that pass the pre-flight and the bake.
    health_status: tuple[int, int] = (200, 399)
    setup: SetupConfig = field(default_factory=SetupConfig)
    #: [gunicorn.settings]: any other gunicorn setting, as (name, value) rendered with repr().
    gunicorn_settings: tuple[tuple[str, Any], ...] = ()
    #: An existing gunicorn config file the generated one loads first (its hooks run before reloader's).
    gunicorn_config_file: str = ""
    access_log: bool = True

    # Derived names: one place decides where each runtime file lives.
    @property
    def service(self) -> str:
        return f"{self.name}.service"

    @property
    def socket_unit(self) -> str:
        return f"{self.name}.socket"

    @property
    def runtime_dir(self) -> str:
        return f"/run/{self.name}"

    @property
    def pidfile(self) -> str:
        return f"{self.runtime_dir}/gunicorn.pid"

    @property
    def ready_dir(self) -> str:
        """Where the gunicorn hooks record which workers have loaded the app (one dir per master)."""
        return f"{self.runtime_dir}/ready"

    @property
    def config_path(self) -> str:
        return str(CONFIG_DIR / f"{self.name}.toml")

    @property
    def gunicorn_config_path(self) -> str:
        return str(CONFIG_DIR / f"{self.name}.gunicorn.conf.py")

    # --- several instances (strategy blue-green or rolling) ---------------------------------------------
    @property
    def multi_instance(self) -> bool:
        return self.strategy in MULTI_INSTANCE

    @property
    def instance_names(self) -> tuple[str, ...]:
        if self.strategy == "blue-green":
            return ("blue", "green")
        if self.strategy == "rolling":
            return tuple(str(i) for i in range(1, self.instances + 1))
        return ()

    def instance_unit(self, instance: str) -> str:
        return f"{self.name}@{instance}.service"

    def instance_socket(self, instance: str) -> str:
        base = self.socket[: -len(".sock")] if self.socket.endswith(".sock") else self.socket
        return f"{base}-{instance}.sock"

    def instance_runtime_dir(self, instance: str) -> str:
        return f"/run/{self.name}-{instance}"

    @property
    def state_dir(self) -> str:
        return str(STATE_DIR / self.name)

    def instance_link(self, instance: str) -> str:
        """The symlink naming the release an instance runs (its WorkingDirectory)."""
        return f"{self.state_dir}/instances/{instance}"

    @property
    def upstream_path(self) -> str:
        """The nginx include listing the instances that get traffic (rewritten by reloads)."""
        return f"{self.state_dir}/upstream.conf"

    @property
    def python(self) -> str:
        """The interpreter that runs the app (and the pre-flight)."""
        if self.virtualenv:
            return f"{self.virtualenv}/bin/python3"
        return str(Path(self.gunicorn).parent / "python3")

    @property
    def gunicorn_bin(self) -> str:
        return self.gunicorn or f"{self.virtualenv}/bin/gunicorn"

    @property
    def asgi(self) -> bool:
        """Served by an ASGI worker: the pre-flight calls the app through the ASGI interface."""
        return self.worker_class in ASGI_WORKERS

    @property
    def health_host(self) -> str:
        """The Host header of health checks: the first real server_name (a Django ALLOWED_HOSTS accepts it)."""
        for name in self.nginx.server_name:
            if name != "_" and "*" not in name:
                return name
        return "localhost"

    @property
    def upstream_keepalive_ms(self) -> int:
        """How long nginx keeps an idle upstream connection: below gunicorn's ``keepalive`` (default 2 s,
        uvicorn's ``timeout_keep_alive`` too), so the worker never closes one nginx is about to reuse (a
        502 when the retry meets a closed connection as well). 0: gunicorn keeps no connection alive."""
        value = dict(self.gunicorn_settings).get("keepalive", 2)
        seconds = value if isinstance(value, int | float) and not isinstance(value, bool) else 2
        if seconds <= 0:
            return 0
        return int(max(seconds * 1000 / 2, seconds * 1000 - 1000))

    def health_ok(self, status: int) -> bool:
        low, high = self.health_status
        return low <= status <= high

    @property
    def setup_unit(self) -> str:
        """The oneshot unit ``install`` runs the setup commands in before the first start."""
        return f"{self.name}-setup.service"

    @property
    def bin_dir(self) -> str:
        """The app's virtualenv bin directory: first on PATH for setup commands (``python`` is the venv's)."""
        return str(Path(self.python).parent)


# --- the schema ------------------------------------------------------------------------------------
_APP_KEYS = {
    "name", "user", "group", "working_directory", "virtualenv", "gunicorn", "wsgi", "health_path",
    "environment", "environment_file", "read_write_paths", "state_directory", "cache_directory", "logs_directory",
    "health_status",
}
_GUNICORN_KEYS = {
    "workers", "worker_class", "threads", "timeout", "graceful_timeout", "preload_app", "socket",
    "socket_activation", "settings", "config_file", "access_log",
}
_RELOAD_KEYS = {"strategy", "preflight_timeout", "ready_timeout", "bake_seconds", "instances", "helper",
                "releases_root", "keep_releases", "max_surge"}
_NGINX_KEYS = {"server_name", "listen", "client_max_body_size", "static", "proxy_read_timeout", "user"}
_SETUP_KEYS = {"commands", "timeout"}
_SECTIONS = {"app": _APP_KEYS, "gunicorn": _GUNICORN_KEYS, "reload": _RELOAD_KEYS, "nginx": _NGINX_KEYS,
             "setup": _SETUP_KEYS}


class _Reader:
    """Pulls typed values out of one TOML table, phrasing every failure as ``file: [section] key: …``."""

    def __init__(self, source: str, section: str, table: Any) -> None:
        self.source, self.section = source, section
        if not isinstance(table, dict):
            self.fail(None, f"must be a table ([{section}]), not {type(table).__name__}")
        self.table: dict[str, Any] = table
        allowed = _SECTIONS[section]
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(allowed))}"
                self.fail(key, f"unknown key{hint}")

    def fail(self, key: str | None, message: str) -> None:
        where = f"[{self.section}] {_printable(key)}" if key else f"[{self.section}]"
        raise ConfigError(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.table

    def _typed(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        # bool is an int subclass: never let `workers = true` through as 1.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            self.fail(key, f"must be {what}, not {_show(value)}")
        return value

    def string(self, key: str, default: str = "", *, pattern: re.Pattern[str] | None = None,
               allowed: str = "") -> str:
        value = self._typed(key, (str,), "a string", default)
        if key in self.table:
            if _CONTROL.search(value):
                self.fail(key, "must not contain newlines or control characters")
            if pattern is not None and not pattern.fullmatch(value):
                self.fail(key, f"{value!r} is not valid: {allowed}")
        return value

    def path(self, key: str, default: str = "") -> str:
        value = self.string(key, default)
        if key in self.table:
            self.check_path(key, value)
        return value

    def check_path(self, key: str, value: str) -> None:
        if not value.startswith("/"):
            self.fail(key, f"{value!r} must be an absolute path (start with '/')")
        if not _PATH.fullmatch(value):
            bad = sorted({c for c in value if not _PATH.fullmatch("/" + c)})
            self.fail(key, f"{value!r} contains {''.join(bad)!r}; paths may only use letters, digits and "
                      "'._/@+,:=%~-' (no spaces, quotes, '$', ';', '{' or '}')")
        if any(part in (".", "..") for part in value.split("/")):
            self.fail(key, f"{value!r} must be normalized (no '.' or '..' components)")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._typed(key, (int,), "an integer", default)
        if not low <= value <= high:
            self.fail(key, f"{value} is out of range; allowed {low}..{high}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._typed(key, (int, float), "a number", default)
        if not low <= value <= high:
            self.fail(key, f"{value} is out of range; allowed {low}..{high}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        return self._typed(key, (bool,), "true or false", default)

    def strings(self, key: str, default: tuple[str, ...], pattern: re.Pattern[str], allowed: str) -> tuple[str, ...]:
        if key not in self.table:
            return default
        value = self.table[key]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            self.fail(key, f"must be a string or a non-empty list of strings, not {_show(value)}")
        for item in items:
            if _CONTROL.search(item) or not pattern.fullmatch(item):
                self.fail(key, f"{item!r} is not valid: {allowed}")
        return tuple(items)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._typed(key, (dict,), "a table", {})
        return dict(value)


def _printable(text: str) -> str:
    """Keys come from the user too: keep a key with a newline from splitting the one-line error."""
    return repr(text) if _CONTROL.search(text) else text


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def load(path: str | Path) -> AppConfig:
    """Read and validate the config file at *path*; raise :class:`ConfigError` with one clear line."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, source=str(path))


def parse(data: dict[str, Any], source: str = "<config>") -> AppConfig:
    """Validate already-parsed TOML *data*. Separate from :func:`load` so tests can feed dicts."""
    for section in data:
        if section not in _SECTIONS:
            close = difflib.get_close_matches(section, sorted(_SECTIONS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f"; known sections: {', '.join(sorted(_SECTIONS))}"
            raise ConfigError(f"{source}: [{_printable(section)}]: unknown section{hint}")
    if "app" not in data:
        raise ConfigError(f"{source}: [app]: missing section; it needs at least name, working_directory, "
                          "wsgi and virtualenv (or gunicorn)")

    app = _Reader(source, "app", data["app"])
    for required in ("name", "working_directory", "wsgi"):
        if not app.has(required):
            app.fail(required, "is required")
    name = app.string("name", pattern=_NAME,
                      allowed="use 1-48 lowercase letters, digits, '-' or '_', starting with a letter or digit "
                      "(it names the systemd unit, the user and /run/NAME)")
    user = app.string("user", name, pattern=_USER, allowed="a POSIX user name like 'flaskapp'")
    if not _USER.fullmatch(user):
        app.fail("user", f"{user!r} is not a valid user name (it defaults to the app name): set user to a POSIX "
                 "user name like 'flaskapp'")
    group = app.string("group", user, pattern=_USER, allowed="a POSIX group name like 'flaskapp'")
    if user == "root" or group == "root":
        app.fail("user" if user == "root" else "group",
                 "the app must not run as root; give it a dedicated user (the default is the app name)")
    working_directory = app.path("working_directory")
    virtualenv = app.path("virtualenv")
    gunicorn = app.path("gunicorn")
    if bool(virtualenv) == bool(gunicorn):
        app.fail("virtualenv", "set exactly one of virtualenv (the venv holding gunicorn) or gunicorn "
                 "(the path of the gunicorn script)")
    wsgi = app.string("wsgi", pattern=_WSGI, allowed="use 'module:callable' or 'package.module:create_app()'")
    health_path = app.string("health_path", "/", pattern=_URL_PATH,
                             allowed="an absolute URL path such as '/health' (no spaces or quotes)")
    environment = _environment(app)
    environment_file = app.path("environment_file")

    gun = _Reader(source, "gunicorn", data.get("gunicorn", {}))
    workers = gun.integer("workers", 2, 1, 512)
    worker_class = gun.string("worker_class", "sync", pattern=_WORKER_CLASS,
                              allowed="a gunicorn worker class like 'sync', 'gthread' or 'gevent'")
    threads = gun.integer("threads", 1, 1, 1024)
    timeout = gun.integer("timeout", 30, 1, 86400)
    graceful_timeout = gun.integer("graceful_timeout", 30, 1, 86400)
    preload_app = gun.boolean("preload_app", False)
    socket_activation = gun.boolean("socket_activation", True)
    if socket_activation:
        socket = gun.path("socket", f"/run/{name}.sock")
        if socket == f"/run/{name}" or socket.startswith(f"/run/{name}/"):
            gun.fail("socket", f"must not be inside /run/{name}/ with socket_activation: systemd empties that "
                     f"directory when the service stops, deleting the listening socket; use /run/{name}.sock")
    else:
        # Without activation gunicorn binds the socket itself, as the app user: only its runtime directory
        # is writable for it.
        socket = gun.path("socket", f"/run/{name}/gunicorn.sock")
        if not socket.startswith(f"/run/{name}/"):
            gun.fail("socket", f"must be inside /run/{name}/ when socket_activation = false (gunicorn creates "
                     "it as the app user there); or enable socket_activation")

    if socket.endswith("/"):
        gun.fail("socket", f"{socket!r} must name a socket file, not a directory")
    if len(socket.encode()) > 107:
        gun.fail("socket", f"{socket!r} is longer than the 107 bytes a unix socket path may have")

    rel = _Reader(source, "reload", data.get("reload", {}))
    strategy = rel.string("strategy", "generation")
    if strategy not in STRATEGIES:
        rel.fail("strategy", f"{strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}")
    if strategy == "hup" and preload_app:
        rel.fail("strategy", "'hup' with [gunicorn] preload_app = true never deploys new code (the master keeps "
                 "the old import); use strategy = \"generation\" or turn preload_app off")
    if strategy in MULTI_INSTANCE and not socket_activation:
        rel.fail("strategy", f"{strategy!r} needs [gunicorn] socket_activation = true (each instance gets its "
                 "own socket unit)")
    instances = rel.integer("instances", 3, 2, 32)
    if rel.has("instances") and strategy != "rolling":
        rel.fail("instances", "only applies to strategy = \"rolling\" (blue-green always has two)")
    if strategy in MULTI_INSTANCE and len(f"{socket}-{instances}".encode()) > 107:
        gun.fail("socket", f"{socket!r} is too long for the per-instance sockets")
    max_surge = rel.integer("max_surge", 0, 0, 512)
    if rel.has("max_surge") and strategy != "generation":
        rel.fail("max_surge", f"only applies to strategy = \"generation\" (not {strategy!r})")
    preflight_timeout = rel.integer("preflight_timeout", 60, 1, 3600)
    ready_timeout = rel.integer("ready_timeout", 120, 1, 3600)
    bake_seconds = rel.number("bake_seconds", 2.0, 0, 3600)
    helper = rel.path("helper", default_helper())
    releases_root = rel.path("releases_root")
    if releases_root == "/":
        rel.fail("releases_root", "refusing '/' as the releases root (keep_releases prunes in it); use e.g. "
                 f"/srv/{name}/releases")
    keep_releases = rel.integer("keep_releases", 5, 2, 1000)

    nginx = _nginx(_Reader(source, "nginx", data.get("nginx", {})))
    writable = _writable(app)
    health_status = _health_status(app)
    settings = _gunicorn_settings(gun, socket_activation)
    config_file = gun.path("config_file")
    if config_file and not config_file.endswith(".py"):
        gun.fail("config_file", f"{config_file!r} must be a gunicorn config file ending in .py")
    access_log = gun.boolean("access_log", True)
    setup = _setup(_Reader(source, "setup", data.get("setup", {})))
    if setup.commands and strategy in MULTI_INSTANCE:
        raise ConfigError(f"{source}: [setup] commands: not supported with strategy {strategy!r} yet (its "
                          "controller is not sandboxed as the app); run them from your deploy script, or use "
                          "strategy \"generation\"")

    return AppConfig(
        name=name, source=source, user=user, group=group, working_directory=working_directory,
        virtualenv=virtualenv, gunicorn=gunicorn, wsgi=wsgi, workers=workers, worker_class=worker_class,
        threads=threads, timeout=timeout, graceful_timeout=graceful_timeout, preload_app=preload_app,
        socket=socket, socket_activation=socket_activation, health_path=health_path, environment=environment,
        environment_file=environment_file, strategy=strategy, preflight_timeout=preflight_timeout,
        ready_timeout=ready_timeout, bake_seconds=bake_seconds, instances=instances, max_surge=max_surge,
        helper=helper, nginx=nginx,
        **writable, health_status=health_status, setup=setup, gunicorn_settings=settings,
        gunicorn_config_file=config_file, access_log=access_log,
        releases_root=releases_root.rstrip("/"), keep_releases=keep_releases,
    )


def default_helper() -> str:
    """The ``ExecReload=`` helper when the config names none: the .deb's /usr/bin/reloader, or else the
    ``reloader`` script running right now (a ``pip install`` into a virtualenv), so the units call the
    same reloader that installed them. ``install`` refuses a helper that is not executable."""
    if os.access(DEB_HELPER, os.X_OK):
        return DEB_HELPER
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "reloader" and os.access(script, os.X_OK) and _PATH.fullmatch(script):
        return script
    return DEB_HELPER


def _writable(app: _Reader) -> dict[str, Any]:
    paths = app.strings("read_write_paths", (), _ANY, "directories must be absolute paths without control characters")
    for path in paths:
        app.check_path("read_write_paths", path)
        if path == "/" or path in ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev"):
            app.fail("read_write_paths", f"refusing to make {path!r} writable; name the app's own data directory")
    out: dict[str, Any] = {"read_write_paths": paths}
    for key, base in (("state_directory", "/var/lib"), ("cache_directory", "/var/cache"),
                      ("logs_directory", "/var/log")):
        value = app.string(key, "", pattern=_SD_DIRECTORY,
                           allowed=f"a directory name relative to {base}, like 'myapp' (letters, digits, '._-', '/')")
        if any(part in (".", "..") for part in value.split("/")):
            app.fail(key, f"{value!r} must be normalized (no '.' or '..' components)")
        out[key] = value
    return out


def _health_status(app: _Reader) -> tuple[int, int]:
    if not app.has("health_status"):
        return (200, 399)
    value = app.table["health_status"]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        app.fail("health_status", f"must be [LOWEST, HIGHEST] like [200, 399], not {_show(value)}")
    low, high = value
    if not 100 <= low <= high <= 599:
        app.fail("health_status", f"{value} must be two statuses 100..599, the lowest first")
    return (low, high)


def _gunicorn_settings(gun: _Reader, socket_activation: bool) -> tuple[tuple[str, Any], ...]:
    out = []
    for name, value in gun.mapping("settings").items():
        where = f"settings.{name}"
        if not _SETTING.fullmatch(name):
            gun.fail(where, "a gunicorn setting name like 'max_requests' (lowercase letters, digits, '_')")
        if name in OWNED_SETTINGS:
            gun.fail(where, f"is set by reloader ({OWNED_SETTINGS[name]}); remove it from [gunicorn.settings]")
        if name in SERVER_HOOKS or name == "post_request":
            gun.fail(where, "server hooks are Python functions: define them in [gunicorn] config_file (reloader "
                     "chains its own hooks after yours)")
        if not _plain(value):
            gun.fail(where, f"must be a string, number, boolean, or a list/table of those, not {_show(value)}")
        out.append((name, value))
    return tuple(out)


def _plain(value: Any) -> bool:
    """A TOML value whose repr() is the same Python literal (no dates, which repr as datetime(...))."""
    if isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _setup(setup: _Reader) -> SetupConfig:
    import shlex

    commands = []
    raw = setup.table.get("commands", [])
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        setup.fail("commands", f"must be a list of command lines like [\"python manage.py migrate --noinput\"], "
                   f"not {_show(raw)}")
    for line in raw:
        if _CONTROL.search(line):
            setup.fail("commands", f"{line!r} must not contain newlines or control characters")
        try:
            words = shlex.split(line)
        except ValueError as e:
            setup.fail("commands", f"{line!r} is not a valid command line ({e})")
        if not words:
            setup.fail("commands", "an empty command line")
        commands.append(tuple(words))
    timeout = setup.integer("timeout", 300, 1, 86400)
    return SetupConfig(commands=tuple(commands), timeout=timeout)


def _environment(app: _Reader) -> tuple[tuple[str, str], ...]:
    pairs = []
    for key, value in app.mapping("environment").items():
        where = f"environment.{key}"
        if not _ENV_KEY.fullmatch(key):
            app.fail(where, "variable names may only use letters, digits and '_', not starting with a digit")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            app.fail(where, f"must be a string or number, not {_show(value)}")
        text = str(value)
        if _CONTROL.search(text):
            app.fail(where, "must not contain newlines or control characters")
        pairs.append((key, text))
    return tuple(pairs)


def _nginx(ngx: _Reader) -> NginxConfig:
    server_name = ngx.strings("server_name", ("_",), _SERVER_NAME,
                              "server names may only use letters, digits, '.', '-', '_' and a leading '*.'")
    listen = ngx.strings("listen", ("80",), _LISTEN, "use a port ('80'), 'ADDRESS:PORT' or '[IPV6]:PORT'")
    for item in listen:
        port = int(item.rsplit(":", 1)[-1])
        if not 1 <= port <= 65535:
            ngx.fail("listen", f"{item!r}: port {port} is out of range 1..65535")
    size = ngx.string("client_max_body_size", "10m", pattern=_SIZE, allowed="a size like '10m', '512k' or '0'")
    static = []
    for location, directory in ngx.mapping("static").items():
        where = f"static.{location}"
        if not _LOCATION.fullmatch(location) or "//" in location:
            ngx.fail(where, "the location must be a URL prefix like '/static/' (letters, digits, '._~/-')")
        if not isinstance(directory, str):
            ngx.fail(where, f"must be a directory path string, not {_show(directory)}")
        if location == "/":
            ngx.fail(where, "'/' is proxied to the app; serve static files under a prefix like '/static/'")
        ngx.check_path(where, directory)
        if directory == "/":
            ngx.fail(where, "refusing to serve the whole filesystem ('/')")
        # nginx's alias pitfall: "location /static/ { alias /dir; }" serves /dirfile; keep slashes paired.
        if location.endswith("/") != directory.endswith("/"):
            directory = directory.rstrip("/") + "/" if location.endswith("/") else directory.rstrip("/")
        static.append((location, directory))
    proxy_read_timeout = ngx.integer("proxy_read_timeout", 60, 1, 86400)
    user = ngx.string("user", "www-data", pattern=_USER, allowed="the user nginx's workers run as")
    return NginxConfig(server_name=server_name, listen=listen, client_max_body_size=size,
                       static=tuple(static), proxy_read_timeout=proxy_read_timeout, user=user)
