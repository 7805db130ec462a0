"""Read and validate an app's TOML config into a frozen, typed :class:`AppConfig`.

Everything downstream (templates, the reload engine, the CLI) receives an ``AppConfig`` and never a raw
dict, so every check lives here. Values end up inside systemd unit files, an nginx config and a Python
gunicorn config: a value that could inject text into any of them is refused with a one-line error naming
the file, the key and the fix, rather than escaped in a way a reader could misjudge.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
import sys
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

#: Where ``reloader install`` puts an app's config; the units' ``ExecReload=`` points here.
CONFIG_DIR = Path("/etc/reloader")



class Strategy(enum.StrEnum):
    """``[reload] strategy``: how ``systemctl reload`` deploys, and what that implies everywhere else.

    A ``StrEnum``, so templates print the TOML spelling and ``app.strategy == "hup"`` still holds; code
    asks the properties below instead of comparing names, so a new strategy is declared here once.
    """

    #: USR2: a new master beside the old one, verified, then MAINPID= handed over (the default).
    GENERATION = "generation"
    #: HUP: the same master re-forks its workers in place.
    HUP = "hup"
    #: Two instances; a reload starts the idle colour and switches nginx's upstream to it.
    BLUE_GREEN = "blue-green"
    #: N instances behind one upstream, replaced one at a time.
    ROLLING = "rolling"

    @property
    def multi_instance(self) -> bool:
        """Several instances (NAME@INSTANCE.service) behind one nginx upstream, driven by a controller."""
        return self in (Strategy.BLUE_GREEN, Strategy.ROLLING)

    @property
    def new_generation(self) -> bool:
        """A reload starts a new master (USR2) next to the old one rather than re-forking in place."""
        return self is Strategy.GENERATION

    @property
    def keeps_master(self) -> bool:
        """A reload keeps the running master (HUP): with preload_app it would keep the old import too."""
        return self is Strategy.HUP

    @property
    def instant_rollback(self) -> bool:
        """``reloader rollback`` without a RELEASE switches back to the idle instance, which still runs the
        previous release; other strategies redeploy the previous release with a verified reload."""
        return self is Strategy.BLUE_GREEN

    @property
    def one_live_instance(self) -> bool:
        """Exactly one instance gets traffic (blue or green); rolling serves from all of them."""
        return self is Strategy.BLUE_GREEN

    @property
    def setup_commands(self) -> bool:
        """``[setup] commands`` can run in the reload (the multi-instance controller is not sandboxed as
        the app)."""
        return not self.multi_instance

    def instance_names(self, instances: int) -> tuple[str, ...]:
        """The instance names (systemd's %i) for *instances* configured instances; () for a single master."""
        if self is Strategy.BLUE_GREEN:
            return ("blue", "green")
        if self is Strategy.ROLLING:
            return tuple(str(i) for i in range(1, instances + 1))
        return ()


STRATEGIES = tuple(s.value for s in Strategy)
#: Where reloader keeps per-app state: the nginx upstream include and each instance's pinned release.
STATE_DIR = Path("/var/lib/reloader")
#: The helper the .deb installs; see :func:`default_helper` for a pip install.
DEB_HELPER = "/usr/bin/reloader"
#: Worker classes that serve an ASGI app (the pre-flight then speaks ASGI, with lifespan).
#: Worker classes whose retiring generation can stop accepting and drain (reloader.drain): uvicorn's, on asyncio.
DRAIN_WORKERS = frozenset({
    "uvicorn_worker.UvicornWorker", "uvicorn_worker.UvicornH11Worker",
    "uvicorn.workers.UvicornWorker", "uvicorn.workers.UvicornH11Worker",
})
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


# --- the schema: each TOML key declared once ------------------------------------------------------------
@dataclass(frozen=True)
class TomlKey:
    """How one TOML key is read: its section, its name there, and the check its value gets. The default
    is the dataclass field's; the known keys of each section (and "did you mean" hints) come from these.

    ``kind`` names the :class:`_Reader` method that reads it ("integer", "number", "boolean", "string",
    "path", "strings"); "custom" keys need more than one value's check and are read by :func:`parse`."""

    section: str
    kind: str = "custom"
    low: float = 0
    high: float = 0
    pattern: re.Pattern[str] | None = None
    allowed: str = ""  #: what a valid value looks like, for the error when *pattern* does not match
    key: str = ""  #: the TOML name, when it is not the field's


def toml(section: str, default: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field that is the TOML key ``[section] NAME`` (see :class:`TomlKey`); no default: required."""
    return field(default=default, metadata={"toml": TomlKey(section, **spec)})


@dataclass(frozen=True)
class NginxConfig:
    """The app's nginx site: a server block proxying to the gunicorn socket."""

    server_name: tuple[str, ...] = toml("nginx", ("_",), kind="strings", pattern=_SERVER_NAME,
                                        allowed="server names may only use letters, digits, '.', '-', '_' "
                                        "and a leading '*.'")
    listen: tuple[str, ...] = toml("nginx", ("80",), kind="strings", pattern=_LISTEN,
                                   allowed="use a port ('80'), 'ADDRESS:PORT' or '[IPV6]:PORT'")
    client_max_body_size: str = toml("nginx", "10m", kind="string", pattern=_SIZE,
                                     allowed="a size like '10m', '512k' or '0'")
    #: URL prefix → directory served by nginx directly (``location PREFIX { alias DIR; }``).
    static: tuple[tuple[str, str], ...] = toml("nginx", ())
    proxy_read_timeout: int = toml("nginx", 60, kind="integer", low=1, high=86400)
    #: The user nginx's workers run as; the gunicorn socket is made accessible to its group.
    user: str = toml("nginx", "www-data", kind="string", pattern=_USER, allowed="the user nginx's workers run as")


@dataclass(frozen=True)
class SetupConfig:
    """Commands run as the app's user, in its sandbox and environment, in the release being deployed,
    before its new generation starts (e.g. ``python manage.py migrate --noinput``)."""

    commands: tuple[tuple[str, ...], ...] = toml("setup", ())
    #: Seconds for all commands together; a command still running then is killed and the deploy refused.
    timeout: int = toml("setup", 300, kind="integer", low=1, high=86400)
    #: Run once the old generation has retired (a "contract" migration the old code could not survive).
    #: A failure is reported but leaves the new release serving: not a rollback (reloader.after_switch).
    after_switch: tuple[tuple[str, ...], ...] = toml("setup", ())


@dataclass(frozen=True)
class AnalysisConfig:
    """The bake's comparison of the new generation with the old one on real traffic (strategies
    "generation", "blue-green", "rolling"; reloader.traffic, docs/traffic-analysis.md): a regressing
    release is refused."""

    enabled: bool = toml("analysis", True, kind="boolean")
    #: Workers of the new generation that take traffic while it is judged (the rest wait at the gate).
    canary_workers: int = toml("analysis", 1, kind="integer", low=0, high=512)
    #: Requests the new generation must have served before it can pass.
    min_requests: int = toml("analysis", 100, kind="integer", low=1, high=10_000_000)
    #: The longest the bake waits for min_requests (seconds; never less than bake_seconds).
    timeout: float = toml("analysis", 30.0, kind="number", low=0, high=3600)
    #: Too few requests by then: "proceed" on the health checks alone, or "refuse".
    low_traffic: str = toml("analysis", "proceed", kind="string", pattern=re.compile("proceed|refuse"),
                            allowed="use \"proceed\" or \"refuse\"")
    #: 5xx: refused when the one-sided Fisher test's p-value is below this and the rate rose by error_margin.
    error_pvalue: float = toml("analysis", 0.01, kind="number", low=1e-12, high=0.5)
    error_margin: float = toml("analysis", 0.01, kind="number", low=0, high=1)
    #: Latency: refused when p50 or p95 is latency_ratio times the old one and latency_floor_ms more, and
    #: the one-sided Mann-Whitney test's p-value is below latency_pvalue.
    latency_ratio: float = toml("analysis", 1.5, kind="number", low=1, high=1000)
    latency_floor_ms: float = toml("analysis", 100.0, kind="number", low=0, high=3_600_000)
    latency_pvalue: float = toml("analysis", 0.01, kind="number", low=1e-12, high=0.5)


# --- [build], [hooks], [metrics]: the first hour with a real app (reloader.build, reloader.hooks) --------
@dataclass(frozen=True)
class BuildConfig:
    """Commands ``reloader deploy/install --from`` runs in a new release before anything else of the
    deploy, as the app's user, with the release writable and not sandboxed (``pybabel compile``,
    ``collectstatic``, front-end bundles): what writes *into* the release. ``[setup]`` is for what writes
    elsewhere (migrations), in the sandbox, on every deploy."""

    commands: tuple[tuple[str, ...], ...] = toml("build", ())
    #: Seconds for all build commands together (and the virtualenv), then the build is abandoned.
    timeout: int = toml("build", 900, kind="integer", low=1, high=86400)
    #: A requirements file in the release: the build creates ``[app] virtualenv`` (which must then lie
    #: inside the release, e.g. current/venv) and installs it, with pip's own configuration.
    requirements: str = toml("build", "", kind="string", pattern=re.compile(r"[A-Za-z0-9._/-]+"),
                             allowed="a path relative to the release, like 'requirements.txt'")


@dataclass(frozen=True)
class HooksConfig:
    """Commands run by ``reloader deploy`` and ``reloader rollback`` (as root, not sandboxed) once the
    outcome is known, with the facts as RELOADER_* environment variables (reloader.hooks)."""

    after_deploy: tuple[tuple[str, ...], ...] = toml("hooks", ())
    after_refusal: tuple[tuple[str, ...], ...] = toml("hooks", ())
    after_rollback: tuple[tuple[str, ...], ...] = toml("hooks", ())
    #: Seconds per hook command; a hook never changes the deploy's outcome, only reports on it.
    timeout: int = toml("hooks", 30, kind="integer", low=1, high=3600)


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics of deploys in node_exporter's textfile-collector format (reloader.hooks)."""

    #: Where ``NAME.prom`` is written (atomically) when the directory exists: Debian's
    #: prometheus-node-exporter reads this one. "" turns the metrics off.
    textfile_directory: str = toml("metrics", "/var/lib/prometheus/node-exporter", kind="path")


def _sd_directory(base: str) -> Any:
    return toml("app", "", kind="string", pattern=_SD_DIRECTORY,
                allowed=f"a directory name relative to {base}, like 'myapp' (letters, digits, '._-', '/')")


@dataclass(frozen=True)
class AppConfig:
    """One app: its Gunicorn service, socket, nginx site and reload policy.

    Each field that is a TOML key says where (see :func:`toml`); :func:`parse` reads them from that."""

    # [app]
    name: str = toml("app", kind="string", pattern=_NAME,
                     allowed="use 1-48 lowercase letters, digits, '-' or '_', starting with a letter or digit "
                     "(it names the systemd unit, the user and /run/NAME)")
    working_directory: str = toml("app", kind="path")
    wsgi: str = toml("app", kind="string", pattern=_WSGI,
                     allowed="use 'module:callable' or 'package.module:create_app()'")
    #: The config file it was read from (not a key).
    source: str = "<config>"
    #: The app's user and group ("" here; parse() defaults them to the name, then the user).
    user: str = toml("app", "", kind="string", pattern=_USER, allowed="a POSIX user name like 'flaskapp'")
    group: str = toml("app", "", kind="string", pattern=_USER, allowed="a POSIX group name like 'flaskapp'")
    virtualenv: str = toml("app", "", kind="path")
    gunicorn: str = toml("app", "", kind="path")
    health_path: str = toml("app", "/", kind="string", pattern=_URL_PATH,
                            allowed="an absolute URL path such as '/health' (no spaces or quotes)")
    environment: tuple[tuple[str, str], ...] = toml("app", ())
    environment_file: str = toml("app", "", kind="path")
    #: Paths outside the systemd-managed directories the app may write (ReadWritePaths=); they must exist.
    read_write_paths: tuple[str, ...] = toml("app", ())
    #: StateDirectory=/CacheDirectory=/LogsDirectory= names (systemd creates them, owned by the app user).
    state_directory: str = _sd_directory("/var/lib")
    cache_directory: str = _sd_directory("/var/cache")
    logs_directory: str = _sd_directory("/var/log")
    #: Inclusive range of health-path statuses that pass the pre-flight and the bake.
    health_status: tuple[int, int] = toml("app", (200, 399))

    # [gunicorn]
    workers: int = toml("gunicorn", 2, kind="integer", low=1, high=512)
    worker_class: str = toml("gunicorn", "sync", kind="string", pattern=_WORKER_CLASS,
                             allowed="a gunicorn worker class like 'sync', 'gthread' or 'gevent'")
    threads: int = toml("gunicorn", 1, kind="integer", low=1, high=1024)
    timeout: int = toml("gunicorn", 30, kind="integer", low=1, high=86400)
    graceful_timeout: int = toml("gunicorn", 30, kind="integer", low=1, high=86400)
    preload_app: bool = toml("gunicorn", False, kind="boolean")
    #: The listening socket ("" here; parse() defaults it by socket_activation).
    socket: str = toml("gunicorn", "")
    socket_activation: bool = toml("gunicorn", True, kind="boolean")
    #: [gunicorn.settings]: any other gunicorn setting, as (name, value) rendered with repr().
    gunicorn_settings: tuple[tuple[str, Any], ...] = toml("gunicorn", (), key="settings")
    #: An existing gunicorn config file the generated one loads first (its hooks run before reloader's).
    gunicorn_config_file: str = toml("gunicorn", "", kind="path", key="config_file")
    #: gunicorn's access log, to the journal at priority debug. Off: nginx logs every request already, and a
    #: journal line per request costs throughput (docs/steady-state.md has the numbers).
    access_log: bool = toml("gunicorn", False, kind="boolean")
    # Surge-first recycling (reloader.recycle): a worker whose RSS passes max_worker_memory ("512M"; ""
    # off) is replaced, its replacement ready first; a timer (NAME-recycle.timer) checks every
    # memory_check_interval seconds.
    max_worker_memory: str = toml("gunicorn", "", kind="string", pattern=re.compile(r"\d{1,9}[kKmMgG]"),
                                  allowed="a size like '512M', '2G' or '800000K'")
    memory_check_interval: int = toml("gunicorn", 30, kind="integer", low=5, high=86400)

    # [reload]
    strategy: Strategy = toml("reload", Strategy.GENERATION)
    preflight_timeout: int = toml("reload", 60, kind="integer", low=1, high=3600)
    ready_timeout: int = toml("reload", 120, kind="integer", low=1, high=3600)
    bake_seconds: float = toml("reload", 2.0, kind="number", low=0, high=3600)
    instances: int = toml("reload", 3, kind="integer", low=2, high=32)
    #: strategy "generation": start the new master with this many workers and swap the rest in lockstep
    #: (TTOU old, TTIN new), so at most workers + max_surge run; 0: a full second generation.
    max_surge: int = toml("reload", 0, kind="integer", low=0, high=512)
    #: The ExecReload= helper (parse() defaults it to :func:`default_helper`).
    helper: str = toml("reload", DEB_HELPER, kind="path")
    #: Where release directories live ("" = the directory holding the release ``current`` points at).
    releases_root: str = toml("reload", "", kind="path")
    #: How many release directories `reloader deploy` keeps (the live and previous one always stay).
    keep_releases: int = toml("reload", 5, kind="integer", low=2, high=1000)
    #: `reloader recycle`: how many workers are replaced at a time (each batch ready before it retires
    #: as many old ones), so at most workers + recycle_surge run.
    recycle_surge: int = toml("reload", 1, kind="integer", low=1, high=512)
    #: Long-lived connections (reloader.drain): on a reload the retiring generation stops accepting and keeps
    #: its open connections up to this many seconds before its TERM (WebSockets then get 1012); 0: TERM at once.
    drain_timeout: int = toml("reload", 0, kind="integer", low=0, high=86400)

    # [nginx], [setup], [analysis]
    nginx: NginxConfig = field(default_factory=NginxConfig)
    setup: SetupConfig = field(default_factory=SetupConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    # [build], [hooks], [metrics]
    build: BuildConfig = field(default_factory=BuildConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        # A str from a caller that builds AppConfig by hand becomes the enum (ValueError if unknown).
        object.__setattr__(self, "strategy", Strategy(self.strategy))

    # Derived names: one place decides where each unit and runtime file lives. Templates and code both
    # read these, so a path is spelled once (the reference renders in units/ pin the result).
    @property
    def service(self) -> str:
        return f"{self.name}.service"

    @property
    def socket_unit(self) -> str:
        return f"{self.name}.socket"

    @property
    def config_path(self) -> str:
        return str(CONFIG_DIR / f"{self.name}.toml")

    @property
    def gunicorn_config_path(self) -> str:
        return str(CONFIG_DIR / f"{self.name}.gunicorn.conf.py")

    # /run/NAME: the single master's RuntimeDirectory= (emptied when the service stops).
    @property
    def runtime_dir(self) -> str:
        return f"/run/{self.name}"

    @property
    def pidfile(self) -> str:
        return f"{self.runtime_dir}/gunicorn.pid"

    @property
    def new_pidfile(self) -> str:
        """Where gunicorn's USR2 child writes its pid until its parent exits and it renames it to pidfile."""
        return f"{self.pidfile}.2"

    @property
    def ready_dir(self) -> str:
        """Where the gunicorn hooks record which workers have loaded the app (one dir per master)."""
        return f"{self.runtime_dir}/ready"

    def boot_record(self, master: int) -> str:
        """What *master* booted (release, virtualenv, environment), written by its gunicorn config."""
        return f"{self.ready_dir}/{master}/boot.json"

    @property
    def reload_lock(self) -> str:
        """flock()ed by a single-master reload, so two helpers never swap generations at once."""
        return f"{self.runtime_dir}/reload.lock"

    @property
    def boot_request(self) -> str:
        """The release and environment the reload helper resolved for the master it signals next."""
        return f"{self.runtime_dir}/boot-request.json"

    @property
    def generation_path(self) -> str:
        """The single master's generation counter (STATUS=); the one systemd started is 1."""
        return f"{self.runtime_dir}/generation"

    # /var/lib/reloader/NAME: reloader's own state, kept across restarts (`reloader install` creates it).
    @property
    def state_dir(self) -> str:
        return str(STATE_DIR / self.name)

    @property
    def records_path(self) -> str:
        """The records of the live, previous, refused and proven releases (reloader.releases)."""
        return f"{self.state_dir}/releases.json"

    # --- several instances (strategy blue-green or rolling) ---------------------------------------------
    @property
    def multi_instance(self) -> bool:
        return self.strategy.multi_instance

    @property
    def instance_names(self) -> tuple[str, ...]:
        return self.strategy.instance_names(self.instances)

    def instance_unit(self, instance: str) -> str:
        return f"{self.name}@{instance}.service"

    def instance_socket(self, instance: str) -> str:
        """The listening socket of *instance* (``NAME@.socket`` renders it with %i for the instance)."""
        return instance_socket(self.socket, instance)

    def instance_runtime_dir(self, instance: str) -> str:
        """An instance's RuntimeDirectory= (``instance`` may be systemd's ``%i`` in a template)."""
        return f"/run/{self.name}-{instance}"

    def instance_pidfile(self, instance: str) -> str:
        return f"{self.instance_runtime_dir(instance)}/gunicorn.pid"

    def instance_ready_dir(self, instance: str) -> str:
        return f"{self.instance_runtime_dir(instance)}/ready"

    @property
    def instances_dir(self) -> str:
        """Holds one symlink per instance naming the release it runs (its WorkingDirectory)."""
        return f"{self.state_dir}/instances"

    def instance_link(self, instance: str) -> str:
        """The symlink naming the release an instance runs (its WorkingDirectory)."""
        return f"{self.instances_dir}/{instance}"

    @property
    def upstream_path(self) -> str:
        """The nginx include naming the routes (written at install; a deploy never changes it)."""
        return f"{self.state_dir}/upstream.conf"

    @property
    def fleet_state_path(self) -> str:
        """The deploy generation of a multi-instance app (reloader.fleet; what is live is read from the routes)."""
        return f"{self.state_dir}/state.json"

    @property
    def deploy_lock(self) -> str:
        """flock()ed by a multi-instance deploy (and by `reloader rollback`, to tell whether one runs)."""
        return f"{self.state_dir}/lock"

    @property
    def route_slots(self) -> tuple[str, ...]:
        """The routes nginx's upstream names: one for blue-green (``live``), one per instance when rolling."""
        return ("live",) if self.strategy.one_live_instance else self.instance_names

    def route(self, slot: str) -> str:
        """A stable socket path in nginx's upstream: a symlink to an instance's socket that the fleet
        replaces with rename(2) to switch traffic. connect() resolves it at every new connection, so no
        nginx reload is needed; connections already open stay where they are."""
        return f"{self.state_dir}/routes/{slot}.sock"

    @property
    def rollback_request(self) -> str:
        """Written by `reloader rollback` while a blue-green deploy runs: the deploy switches back."""
        return f"{self.state_dir}/rollback-request"

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

    @property
    def upstream_keepalive(self) -> int:
        """Idle connections each nginx worker keeps open to the app; none for ASGI workers (see
        templates/nginx-site.j2)."""
        return 0 if self.asgi else 16

    @property
    def upstream_tries(self) -> int:
        """How often nginx may send one idempotent request whose upstream connection failed or was closed
        before a response header: once per worker that serves it, once per cached keep-alive connection,
        plus one. nginx sends a request at most once per ``server`` entry of the upstream, and a cached
        keep-alive connection that turns out closed (its worker died) uses up an entry too, so the socket
        is listed this many times (a canary instance's workers count too, blue-green/rolling with the
        analysis). A request loses its connection only when the worker holding it dies,
        so neither a whole generation of workers crashing one after another (a release that dies after
        boot) nor a pool of cached connections to a killed worker can exhaust the entries.
        See docs/worker-death.md."""
        return self.workers * max(1, len(self.route_slots) + self.canary_route) + self.upstream_keepalive + 1

    def health_ok(self, status: int) -> bool:
        low, high = self.health_status
        return low <= status <= high

    @property
    def reload_budget(self) -> int:
        """Seconds one reload (or start) may take: each step's own timeout added up, per instance started
        (rolling: every instance in turn). The units' TimeoutStartSec= and every client's wait for the job
        (deploy, verify, install, rollback) use this one number, so a long bake_seconds or many instances
        can never make a command give up on a reload that is still running."""
        setup = self.setup.timeout if self.setup.commands else 0
        setup += self.setup.timeout if self.setup.after_switch else 0
        per_instance = self.ready_timeout + self.graceful_timeout + (60 if self.multi_instance else 30)
        return (self.preflight_timeout + setup + math.ceil(self.bake_limit)
                + max(1, len(self.instance_names)) * per_instance)

    @property
    def request_stats(self) -> bool:
        """The workers count their requests for the bake's traffic analysis (every strategy but "hup")."""
        return not self.strategy.keeps_master and self.analysis.enabled

    @property
    def canary_route(self) -> bool:
        """Blue-green/rolling with the analysis: nginx's upstream names a ``canary`` route beside the
        others (weighted, see :attr:`canary_weights`), which a deploy points at the new instance to judge it."""
        return self.multi_instance and self.request_stats

    @property
    def canary_weights(self) -> tuple[int, int]:
        """nginx weights of (each serving route, the canary route): a canary instance weighs as much as
        canary_workers workers against the workers behind each route, so its share is what a canary of
        that many workers gets in strategy "generation" (all of a colour's workers when 0)."""
        return self.workers, self.analysis.canary_workers or self.workers

    @property
    def bake_limit(self) -> float:
        """The longest a bake may last: bake_seconds, or the analysis waiting for traffic up to its timeout."""
        return max(self.bake_seconds, self.analysis.timeout if self.request_stats else 0)

    @property
    def setup_unit(self) -> str:
        """The oneshot unit ``install`` runs the setup commands in before the first start."""
        return f"{self.name}-setup.service"

    # --- the operator toolkit (reloader.recycle, reloader.maintenance, reloader.pause) -----------------
    @property
    def max_worker_memory_bytes(self) -> int:
        """max_worker_memory in bytes (0: off)."""
        if not self.max_worker_memory:
            return 0
        unit = self.max_worker_memory[-1].lower()
        return int(self.max_worker_memory[:-1]) * {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]

    @property
    def recycle_unit(self) -> str:
        """The oneshot that recycles workers over max_worker_memory, started by its timer."""
        return f"{self.name}-recycle.service"

    @property
    def recycle_timer(self) -> str:
        return f"{self.name}-recycle.timer"

    @property
    def toolkit_dir(self) -> str:
        """State of the operator commands (the last recycle, the after_switch result); root-owned."""
        return f"{self.state_dir}/toolkit"

    @property
    def maintenance_dir(self) -> str:
        """Maintenance mode: ``active`` is a symlink nginx reads per request (see reloader.maintenance)."""
        return f"{self.state_dir}/maintenance"

    @property
    def nginx_var(self) -> str:
        """The app's name as nginx variable names need it (no '-')."""
        return self.name.replace("-", "_")

    @property
    def pausable(self) -> bool:
        """`reloader pause` holds requests in the workers of a single master with a WSGI worker class."""
        return not self.multi_instance and not self.asgi

    @property
    def pause_hook_path(self) -> str:
        """reloader/pause_hook.py as installed next to the gunicorn config, which loads it in each worker."""
        return str(CONFIG_DIR / f"{self.name}.pause_hook.py")

    @property
    def drain_hook_path(self) -> str:
        """reloader/drain.py as installed next to the gunicorn config ([reload] drain_timeout)."""
        return str(CONFIG_DIR / f"{self.name}.drain_hook.py")

    @property
    def pause_flag(self) -> str:
        """Present while the app is paused: its workers hold new requests (reloader.pause)."""
        return f"{self.runtime_dir}/paused"

    @property
    def bin_dir(self) -> str:
        """The app's virtualenv bin directory: first on PATH for setup commands (``python`` is the venv's)."""
        return str(Path(self.python).parent)


# --- reading -------------------------------------------------------------------------------------------
def _schema() -> dict[str, dict[str, tuple[str, TomlKey, Any]]]:
    """section → TOML key → (the field it fills, its :class:`TomlKey`, its default or MISSING), from the fields."""
    schema: dict[str, dict[str, tuple[str, TomlKey, Any]]] = {}
    for cls in (AppConfig, NginxConfig, SetupConfig, AnalysisConfig, BuildConfig, HooksConfig, MetricsConfig):
        for f in fields(cls):
            if "toml" in f.metadata:
                spec = f.metadata["toml"]
                schema.setdefault(spec.section, {})[spec.key or f.name] = (f.name, spec, f.default)
    return schema


_SCHEMA = _schema()


class _Reader:
    """Pulls typed values out of one TOML table, phrasing every failure as ``file: [section] key: …``."""

    def __init__(self, source: str, section: str, table: Any) -> None:
        self.source, self.section = source, section
        if not isinstance(table, dict):
            self.fail(None, f"must be a table ([{section}]), not {type(table).__name__}")
        self.table: dict[str, Any] = table
        self.keys = _SCHEMA[section]
        #: field name → value, for the dataclass; filled by read() and put().
        self.values: dict[str, Any] = {}
        allowed = sorted(self.keys)
        for key in table:
            if key not in self.keys:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
                self.fail(key, f"unknown key{hint}")

    def fail(self, key: str | None, message: str) -> None:
        where = f"[{self.section}] {_printable(key)}" if key else f"[{self.section}]"
        raise ConfigError(f"{self.source}: {where}: {message}")

    def required(self) -> list[str]:
        """The keys of this section without a default, in declaration order."""
        return [key for key, (_, _, default) in self.keys.items() if default is MISSING]

    def default(self, key: str) -> Any:
        """The declared default of *key* (MISSING for a required one)."""
        return self.keys[key][2]

    def read(self, key: str, default: Any = MISSING) -> Any:
        """Read *key* as its :class:`TomlKey` says, with its declared default unless *default* is given."""
        name, spec, declared = self.keys[key]
        default = declared if default is MISSING else default
        if spec.kind == "integer":
            value = self.integer(key, default, int(spec.low), int(spec.high))
        elif spec.kind == "number":
            value = self.number(key, default, spec.low, spec.high)
        elif spec.kind == "boolean":
            value = self.boolean(key, default)
        elif spec.kind == "string":
            value = self.string(key, "" if default is MISSING else default, pattern=spec.pattern,
                                allowed=spec.allowed)
        elif spec.kind == "path":
            value = self.path(key, "" if default is MISSING else default)
        elif spec.kind == "strings":
            assert spec.pattern is not None
            value = self.strings(key, default, spec.pattern, spec.allowed)
        else:
            raise AssertionError(f"[{self.section}] {key} is read by parse() itself")
        return self.put(key, value)

    def put(self, key: str, value: Any) -> Any:
        """Record *value*, checked by the caller, as the value of *key*; returns it."""
        self.values[self.keys[key][0]] = value
        return value

    def rest(self) -> dict[str, Any]:
        """Read every key not read yet (those parse() needs nothing special for); all the values."""
        for key, (name, _, _) in self.keys.items():
            if name not in self.values:
                self.read(key)
        return self.values

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
        if section not in _SCHEMA:
            close = difflib.get_close_matches(section, sorted(_SCHEMA), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f"; known sections: {', '.join(sorted(_SCHEMA))}"
            raise ConfigError(f"{source}: [{_printable(section)}]: unknown section{hint}")
    if "app" not in data:
        raise ConfigError(f"{source}: [app]: missing section; it needs at least name, working_directory, "
                          "wsgi and virtualenv (or gunicorn)")

    app = _Reader(source, "app", data["app"])
    for required in app.required():
        if not app.has(required):
            app.fail(required, "is required")
    name = app.read("name")
    user = app.read("user", name)
    if not _USER.fullmatch(user):
        app.fail("user", f"{user!r} is not a valid user name (it defaults to the app name): set user to a POSIX "
                 "user name like 'flaskapp'")
    group = app.read("group", user)
    if user == "root" or group == "root":
        app.fail("user" if user == "root" else "group",
                 "the app must not run as root; give it a dedicated user (the default is the app name)")
    if bool(app.read("virtualenv")) == bool(app.read("gunicorn")):
        app.fail("virtualenv", "set exactly one of virtualenv (the venv holding gunicorn) or gunicorn "
                 "(the path of the gunicorn script)")
    app.put("environment", _environment(app))
    _writable(app)
    app.put("health_status", _health_status(app))
    # Each section's remaining keys need only their own declared check: rest() reads them.
    values = app.rest()

    gun = _Reader(source, "gunicorn", data.get("gunicorn", {}))
    preload_app = gun.read("preload_app")
    socket_activation = gun.read("socket_activation")
    socket = gun.put("socket", _socket(gun, name, socket_activation))
    gun.put("settings", _gunicorn_settings(gun))
    config_file = gun.read("config_file")
    if config_file and not config_file.endswith(".py"):
        gun.fail("config_file", f"{config_file!r} must be a gunicorn config file ending in .py")
    values.update(gun.rest())

    rel = _Reader(source, "reload", data.get("reload", {}))
    name_of_strategy = rel.string("strategy", rel.default("strategy"))
    if name_of_strategy not in STRATEGIES:
        rel.fail("strategy", f"{name_of_strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}")
    strategy = rel.put("strategy", Strategy(name_of_strategy))
    if strategy.keeps_master and preload_app:
        rel.fail("strategy", f"{strategy.value!r} with [gunicorn] preload_app = true never deploys new code (the "
                 "master keeps the old import); use strategy = \"generation\" or turn preload_app off")
    if strategy.multi_instance and not socket_activation:
        rel.fail("strategy", f"{strategy.value!r} needs [gunicorn] socket_activation = true (each instance gets "
                 "its own socket unit)")
    instances = rel.read("instances")
    if rel.has("instances") and strategy is not Strategy.ROLLING:
        rel.fail("instances", "only applies to strategy = \"rolling\" (blue-green always has two)")
    if strategy.multi_instance:
        # Each instance listens on its own socket, named after the configured one (the longest counts).
        longest = sorted((instance_socket(socket, i) for i in strategy.instance_names(instances)),
                         key=lambda path: len(path.encode()))[-1]
        if len(longest.encode()) > 107:
            gun.fail("socket", f"{socket!r} is too long for the per-instance sockets: {longest!r} has "
                     f"{len(longest.encode())} bytes, over the 107 a unix socket path may have; use a shorter path")
    if rel.has("max_surge") and not strategy.new_generation:
        rel.fail("max_surge", f"only applies to strategy = \"generation\" (not {strategy.value!r})")
    if rel.read("drain_timeout"):
        if not strategy.new_generation:
            rel.fail("drain_timeout", f"only applies to strategy = \"generation\" (not {strategy.value!r}): the "
                     "old generation drains beside the new one")
        if rel.read("max_surge"):
            rel.fail("drain_timeout", "not with max_surge (lockstep retires the old workers one by one, which closes "
                     "their connections); set max_surge = 0 or drain_timeout = 0")
        if values["worker_class"] not in DRAIN_WORKERS:
            rel.fail("drain_timeout", f"needs an asyncio ASGI worker_class ({', '.join(sorted(DRAIN_WORKERS))}), not "
                     f"{values['worker_class']!r}, whose connections cannot be drained yet; set it to 0")
    rel.read("helper", default_helper())
    releases_root = rel.read("releases_root")
    if releases_root == "/":
        rel.fail("releases_root", "refusing '/' as the releases root (keep_releases prunes in it); use e.g. "
                 f"/srv/{name}/releases")
    rel.put("releases_root", releases_root.rstrip("/"))
    values.update(rel.rest())

    nginx = _nginx(_Reader(source, "nginx", data.get("nginx", {})))
    setup = _setup(_Reader(source, "setup", data.get("setup", {})))
    if setup.commands and not strategy.setup_commands:
        raise ConfigError(f"{source}: [setup] commands: not supported with strategy {strategy.value!r} yet (its "
                          "controller is not sandboxed as the app); run them from your deploy script, or use "
                          "strategy \"generation\"")
    if setup.after_switch and not strategy.setup_commands:
        raise ConfigError(f"{source}: [setup] after_switch: not supported with strategy {strategy.value!r} (its "
                          "controller is not sandboxed as the app); use strategy \"generation\" or \"hup\"")
    if setup.after_switch and values["drain_timeout"]:
        raise ConfigError(f"{source}: [setup] after_switch: not supported with [reload] drain_timeout yet (the "
                          "contract step would run while the old generation still serves its draining connections); "
                          "set one of them")
    if values.get("max_worker_memory") and strategy.multi_instance:
        gun.fail("max_worker_memory", f"not supported with strategy {strategy.value!r} yet (recycling works on "
                 "the single master of \"generation\" and \"hup\")")
    analysis = _analysis(_Reader(source, "analysis", data.get("analysis", {})), strategy, values["workers"])
    build, hooks, metrics = _first_hour(source, data)
    return AppConfig(source=source, **values, nginx=nginx, setup=setup, analysis=analysis, build=build,
                     hooks=hooks, metrics=metrics)


def _analysis(ana: _Reader, strategy: Strategy, workers: int) -> AnalysisConfig:
    if ana.table and strategy.keeps_master:
        ana.fail(next(iter(ana.table)), f"does not apply to strategy = {strategy.value!r}: the traffic analysis "
                 "compares two generations serving side by side, and a HUP replaces the workers in place "
                 "(docs/traffic-analysis.md)")
    if ana.read("canary_workers") > workers:
        ana.fail("canary_workers", f"{ana.values['canary_workers']} is more than [gunicorn] workers ({workers})")
    return AnalysisConfig(**ana.rest())


def _first_hour(source: str, data: dict[str, Any]) -> tuple[BuildConfig, HooksConfig, MetricsConfig]:
    build = _Reader(source, "build", data.get("build", {}))
    build.put("commands", _command_lines(build, "commands", "python -m flask translate compile"))
    requirements = build.read("requirements")
    if requirements.startswith("/") or ".." in requirements.split("/"):
        build.fail("requirements", f"{requirements!r} must be a path inside the release, like 'requirements.txt'")
    hooks = _Reader(source, "hooks", data.get("hooks", {}))
    for key in ("after_deploy", "after_refusal", "after_rollback"):
        hooks.put(key, _command_lines(hooks, key, "/usr/local/bin/notify-chat"))
    metrics = _Reader(source, "metrics", data.get("metrics", {}))
    return BuildConfig(**build.rest()), HooksConfig(**hooks.rest()), MetricsConfig(**metrics.rest())


def _command_lines(reader: _Reader, key: str, example: str) -> tuple[tuple[str, ...], ...]:
    """A list of command lines (split like a shell, never run by one), as ``[setup] commands``."""
    import shlex

    raw = reader.table.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        reader.fail(key, f"must be a list of command lines like [\"{example}\"], not {_show(raw)}")
    commands = []
    for line in raw:
        if _CONTROL.search(line):
            reader.fail(key, f"{line!r} must not contain newlines or control characters")
        try:
            words = shlex.split(line)
        except ValueError as e:
            reader.fail(key, f"{line!r} is not a valid command line ({e})")
        if not words:
            reader.fail(key, "an empty command line")
        commands.append(tuple(words))
    return tuple(commands)


def _socket(gun: _Reader, name: str, socket_activation: bool) -> str:
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
    return socket


def instance_socket(socket: str, instance: str) -> str:
    """The listening socket of *instance* of an app whose [gunicorn] socket is *socket*."""
    base = socket[: -len(".sock")] if socket.endswith(".sock") else socket
    return f"{base}-{instance}.sock"


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


def _writable(app: _Reader) -> None:
    """What the sandbox lets the app write: read_write_paths and the systemd-managed directories."""
    paths = app.strings("read_write_paths", (), _ANY, "directories must be absolute paths without control characters")
    for path in paths:
        app.check_path("read_write_paths", path)
        if path == "/" or path in ("/etc", "/usr", "/boot", "/proc", "/sys", "/dev"):
            app.fail("read_write_paths", f"refusing to make {path!r} writable; name the app's own data directory")
    app.put("read_write_paths", paths)
    for key in ("state_directory", "cache_directory", "logs_directory"):
        value = app.read(key)
        if any(part in (".", "..") for part in value.split("/")):
            app.fail(key, f"{value!r} must be normalized (no '.' or '..' components)")


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


def _gunicorn_settings(gun: _Reader) -> tuple[tuple[str, Any], ...]:
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
    setup.put("commands", _command_lines(setup, "commands", "python manage.py migrate --noinput"))
    setup.put("after_switch", _command_lines(setup, "after_switch", "python manage.py migrate app 0042"))
    return SetupConfig(**setup.rest())


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
    ngx.read("server_name")
    for item in ngx.read("listen"):
        port = int(item.rsplit(":", 1)[-1])
        if not 1 <= port <= 65535:
            ngx.fail("listen", f"{item!r}: port {port} is out of range 1..65535")
    ngx.read("client_max_body_size")
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
    ngx.put("static", tuple(static))
    return NginxConfig(**ngx.rest())
