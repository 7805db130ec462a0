"""reloader.config: typed loading, every rejection path, and injection attempts (pure host tests).

Every error must be ONE line of the form ``FILE: [section] key: problem``: that line is all the user sees.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from configbed import BASE, DROP, SRC, cfg, rejected

from reloader.config import AppConfig, ConfigError, NginxConfig, load, parse
from reloader.render import render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flaskapp.toml"


def assert_rejected(data: dict[str, Any], where: str, fragment: str) -> None:
    message = rejected(data)
    assert message.startswith(f"{SRC}: {where}: "), message
    assert fragment in message, message


# --- what loads ------------------------------------------------------------------------------------------
def test_example_config_loads_with_expected_values_and_defaults():
    app = load(EXAMPLE)
    assert app == AppConfig(
        name="flaskapp", source=str(EXAMPLE), user="flaskapp", group="flaskapp",
        working_directory="/srv/flaskapp/current", virtualenv="/srv/flaskapp/venv", gunicorn="",
        wsgi="app:app", health_path="/health", workers=4, worker_class="sync", threads=1, timeout=30,
        graceful_timeout=30, preload_app=False, socket="/run/flaskapp.sock", socket_activation=True,
        environment=(), environment_file="", strategy="generation", preflight_timeout=60, ready_timeout=120,
        bake_seconds=2.0, helper="/usr/bin/reloader",
        nginx=NginxConfig(server_name=("flaskapp.example", "_"), listen=("80",), client_max_body_size="10m",
                          static=(("/static/", "/srv/flaskapp/current/static/"),), proxy_read_timeout=60,
                          user="www-data"),
    )
    assert isinstance(app.bake_seconds, float)
    # derived names
    assert (app.service, app.socket_unit, app.runtime_dir) == ("flaskapp.service", "flaskapp.socket", "/run/flaskapp")
    assert (app.pidfile, app.ready_dir) == ("/run/flaskapp/gunicorn.pid", "/run/flaskapp/ready")
    assert app.config_path == "/etc/reloader/flaskapp.toml"
    assert app.gunicorn_config_path == "/etc/reloader/flaskapp.gunicorn.conf.py"
    assert (app.python, app.gunicorn_bin) == ("/srv/flaskapp/venv/bin/python3", "/srv/flaskapp/venv/bin/gunicorn")


def test_minimal_config_file(tmp_path):
    path = tmp_path / "mini.toml"
    path.write_text('[app]\nname = "mini"\nworking_directory = "/srv/mini"\n'
                    'gunicorn = "/opt/py/bin/gunicorn"\nwsgi = "mini:create_app()"\n')
    app = load(path)
    assert (app.name, app.user, app.group, app.source) == ("mini", "mini", "mini", str(path))
    assert (app.virtualenv, app.gunicorn_bin, app.python) == ("", "/opt/py/bin/gunicorn", "/opt/py/bin/python3")
    assert (app.workers, app.socket, app.socket_activation, app.health_path) == (2, "/run/mini.sock", True, "/")
    assert app.nginx == NginxConfig()


def _socket_of_length(length: int) -> str:
    """A socket path of exactly *length* bytes, outside /run/myapp/ (allowed with socket activation)."""
    stem = "/run/"
    return stem + "s" * (length - len(stem) - len(".sock")) + ".sock"


@pytest.mark.parametrize(("strategy", "instances", "longest_suffix"), [
    ("blue-green", None, "-green.sock"),  # blue-green's longest instance socket: 6 bytes more
    ("rolling", 12, "-12.sock"),          # the 12th of 12 instances: 3 bytes more
])
def test_the_longest_instance_socket_must_fit_a_unix_socket_path(strategy, instances, longest_suffix):
    """Each instance listens on the configured socket's name + "-INSTANCE": the socket that fits only
    when those also fit within the 107 bytes of a unix socket path (else they fail at run time)."""
    grow = len(longest_suffix) - len(".sock")
    reload = {"strategy": strategy} | ({"instances": instances} if instances else {})
    fits = _socket_of_length(107 - grow)
    app = parse(cfg(gunicorn={"socket": fits}, reload=reload))
    assert max(len(app.instance_socket(i).encode()) for i in app.instance_names) == 107
    too_long = _socket_of_length(108 - grow)
    message = rejected(cfg(gunicorn={"socket": too_long}, reload=reload))
    assert message.startswith(f"{SRC}: [gunicorn] socket: "), message
    assert f"{too_long[:-len('.sock')]}{longest_suffix}' has 108 bytes" in message, message


def test_a_105_byte_socket_is_refused_for_blue_green():
    """The case the old check passed: 105 + len("-2") fit, while blue/green sockets are 110/111 bytes."""
    message = rejected(cfg(gunicorn={"socket": _socket_of_length(105)}, reload={"strategy": "blue-green"}))
    assert "has 111 bytes, over the 107" in message, message


def test_socket_defaults_follow_socket_activation():
    assert parse(cfg()).socket == "/run/myapp.sock"
    off = parse(cfg(gunicorn={"socket_activation": False}))
    assert off.socket == "/run/myapp/gunicorn.sock"
    assert parse(cfg(gunicorn={"socket": "/srv/myapp/app.sock"})).socket == "/srv/myapp/app.sock"
    off = parse(cfg(gunicorn={"socket_activation": False, "socket": "/run/myapp/x.sock"}))
    assert off.socket == "/run/myapp/x.sock"


@pytest.mark.parametrize("section, key, value", [
    ("gunicorn", "workers", 1), ("gunicorn", "workers", 512), ("gunicorn", "threads", 1024),
    ("gunicorn", "timeout", 86400), ("reload", "bake_seconds", 0), ("reload", "bake_seconds", 3600.0),
    ("reload", "preflight_timeout", 3600), ("nginx", "proxy_read_timeout", 1), ("nginx", "listen", "65535"),
    ("nginx", "listen", ["127.0.0.1:8080", "[::1]:443"]), ("nginx", "server_name", ["*.a.com", "a.*", "_"]),
    ("nginx", "client_max_body_size", "0"), ("nginx", "client_max_body_size", "1G"),
    ("reload", "strategy", "hup"), ("app", "user", "_svc-user"), ("app", "health_path", "/h?a=1&b=%20"),
    ("app", "wsgi", "pkg.mod:create_app()"), ("app", "working_directory", "/srv/a@b+c,d:e=f%g~h-i"),
])
def test_boundary_and_unusual_but_valid_values_are_accepted(section, key, value):
    data = cfg({key: value}) if section == "app" else cfg(**{section: {key: value}})
    parse(data)


@pytest.mark.parametrize("location, directory, alias", [
    ("/static/", "/srv/s", "/srv/s/"),
    ("/static", "/srv/s/", "/srv/s"),
    ("/static/", "/srv/s/", "/srv/s/"),
    ("/favicon.ico", "/srv/s/favicon.ico", "/srv/s/favicon.ico"),
])
def test_static_alias_trailing_slash_follows_the_location(location, directory, alias):
    assert parse(cfg(nginx={"static": {location: directory}})).nginx.static == ((location, alias),)


@pytest.mark.parametrize("value, text", [("x", "x"), (8080, "8080"), (0.5, "0.5"), ("", "")])
def test_environment_values_become_strings(value, text):
    assert parse(cfg({"environment": {"K": value}})).environment == (("K", text),)


# --- every rejection path ----------------------------------------------------------------------------------
def case(id: str, where: str, fragment: str, app: dict[str, Any] | None = None, **sections: Any):
    return pytest.param(cfg(app, **sections), where, fragment, id=id)


REJECTIONS = [
    # sections and keys
    case("typo-section", "[gunicron]", "unknown section; did you mean [gunicorn]?", gunicron={}),
    case("unknown-section", "[database]", "unknown section; known sections: analysis, app, build, gunicorn, hooks, "
         "metrics, nginx, reload, setup", database={}),
    pytest.param({"gunicorn": {}}, "[app]", "missing section", id="no-app-section"),
    pytest.param({"app": "myapp"}, "[app]", "must be a table ([app]), not str", id="app-not-a-table"),
    case("gunicorn-not-a-table", "[gunicorn]", "must be a table", gunicorn=[1]),
    case("typo-app-key", "[app] virtualenvs", "unknown key; did you mean 'virtualenv'?", {"virtualenvs": "/v"}),
    case("typo-gunicorn-key", "[gunicorn] workrs", "did you mean 'workers'?", gunicorn={"workrs": 2}),
    case("typo-reload-key", "[reload] stratgy", "did you mean 'strategy'?", reload={"stratgy": "hup"}),
    case("typo-nginx-key", "[nginx] server_names", "did you mean 'server_name'?", nginx={"server_names": "a"}),
    case("unknown-key-list", "[app] zzz", "unknown key; known keys: cache_directory, environment, environment_file",
         {"zzz": 1}),
    # required keys
    case("missing-name", "[app] name", "is required", {"name": DROP}),
    case("missing-working_directory", "[app] working_directory", "is required", {"working_directory": DROP}),
    case("missing-wsgi", "[app] wsgi", "is required", {"wsgi": DROP}),
    # types (bool is never an int; a float is not an int)
    case("name-int", "[app] name", "must be a string, not int 1", {"name": 1}),
    case("virtualenv-list", "[app] virtualenv", "must be a string, not list", {"virtualenv": ["/v"]}),
    case("workers-str", "[gunicorn] workers", "must be an integer, not str '4'", gunicorn={"workers": "4"}),
    case("workers-bool", "[gunicorn] workers", "must be an integer, not bool True", gunicorn={"workers": True}),
    case("workers-float", "[gunicorn] workers", "must be an integer, not float 2.0", gunicorn={"workers": 2.0}),
    case("timeout-bool", "[gunicorn] timeout", "not bool False", gunicorn={"timeout": False}),
    case("preload-int", "[gunicorn] preload_app", "must be true or false, not int 1", gunicorn={"preload_app": 1}),
    case("activation-str", "[gunicorn] socket_activation", "must be true or false, not str 'yes'",
         gunicorn={"socket_activation": "yes"}),
    case("bake-bool", "[reload] bake_seconds", "must be a number, not bool True", reload={"bake_seconds": True}),
    case("bake-str", "[reload] bake_seconds", "must be a number, not str", reload={"bake_seconds": "2"}),
    case("strategy-int", "[reload] strategy", "must be a string, not int", reload={"strategy": 1}),
    case("environment-str", "[app] environment", "must be a table, not str", {"environment": "A=1"}),
    case("static-list", "[nginx] static", "must be a table, not list", nginx={"static": ["/s/"]}),
    case("server_name-int", "[nginx] server_name", "must be a string or a non-empty list of strings, not int",
         nginx={"server_name": 1}),
    case("server_name-empty", "[nginx] server_name", "non-empty list", nginx={"server_name": []}),
    case("server_name-mixed", "[nginx] server_name", "not list", nginx={"server_name": ["a.com", 1]}),
    case("listen-int", "[nginx] listen", "must be a string or a non-empty list of strings, not int 80",
         nginx={"listen": 80}),
    case("nginx-user-int", "[nginx] user", "must be a string", nginx={"user": 33}),
    # ranges
    case("workers-0", "[gunicorn] workers", "0 is out of range; allowed 1..512", gunicorn={"workers": 0}),
    case("workers-513", "[gunicorn] workers", "513 is out of range", gunicorn={"workers": 513}),
    case("workers-negative", "[gunicorn] workers", "-1 is out of range", gunicorn={"workers": -1}),
    case("threads-0", "[gunicorn] threads", "allowed 1..1024", gunicorn={"threads": 0}),
    case("threads-1025", "[gunicorn] threads", "out of range", gunicorn={"threads": 1025}),
    case("timeout-0", "[gunicorn] timeout", "allowed 1..86400", gunicorn={"timeout": 0}),
    case("graceful-big", "[gunicorn] graceful_timeout", "out of range", gunicorn={"graceful_timeout": 86401}),
    case("preflight-0", "[reload] preflight_timeout", "allowed 1..3600", reload={"preflight_timeout": 0}),
    case("ready-3601", "[reload] ready_timeout", "out of range", reload={"ready_timeout": 3601}),
    case("bake-negative", "[reload] bake_seconds", "out of range; allowed 0..3600", reload={"bake_seconds": -0.5}),
    case("bake-too-long", "[reload] bake_seconds", "out of range", reload={"bake_seconds": 3600.5}),
    case("bake-nan", "[reload] bake_seconds", "nan is out of range", reload={"bake_seconds": math.nan}),
    case("bake-inf", "[reload] bake_seconds", "inf is out of range", reload={"bake_seconds": math.inf}),
    case("proxy-timeout-0", "[nginx] proxy_read_timeout", "allowed 1..86400", nginx={"proxy_read_timeout": 0}),
    # paths: absolute, normalized
    case("wd-relative", "[app] working_directory", "'srv/myapp' must be an absolute path",
         {"working_directory": "srv/myapp"}),
    case("wd-empty", "[app] working_directory", "must be an absolute path", {"working_directory": ""}),
    case("venv-relative", "[app] virtualenv", "must be an absolute path", {"virtualenv": "venv"}),
    case("gunicorn-relative", "[app] gunicorn", "must be an absolute path",
         {"virtualenv": DROP, "gunicorn": "bin/gunicorn"}),
    case("envfile-relative", "[app] environment_file", "must be an absolute path", {"environment_file": "app.env"}),
    case("helper-relative", "[reload] helper", "must be an absolute path", reload={"helper": "reloader"}),
    case("socket-relative", "[gunicorn] socket", "must be an absolute path", gunicorn={"socket": "app.sock"}),
    case("static-dir-relative", "[nginx] static./static/", "must be an absolute path",
         nginx={"static": {"/static/": "static/"}}),
    case("wd-dotdot", "[app] working_directory", "must be normalized", {"working_directory": "/srv/../etc"}),
    case("wd-dot", "[app] working_directory", "must be normalized", {"working_directory": "/srv/./myapp"}),
    case("venv-trailing-dotdot", "[app] virtualenv", "must be normalized", {"virtualenv": "/srv/venv/.."}),
    case("static-dir-dotdot", "[nginx] static./s/", "must be normalized", nginx={"static": {"/s/": "/srv/../etc/"}}),
    case("path-bad-chars", "[app] working_directory", "contains ' ;'; paths may only use",
         {"working_directory": "/srv/a b;c"}),
    # name / user / group
    case("name-upper", "[app] name", "'MyApp' is not valid: use 1-48 lowercase letters", {"name": "MyApp"}),
    case("name-leading-dash", "[app] name", "is not valid", {"name": "-app"}),
    case("name-leading-underscore", "[app] name", "is not valid", {"name": "_app"}),
    case("name-dot", "[app] name", "is not valid", {"name": "my.app"}),
    case("name-empty", "[app] name", "'' is not valid", {"name": ""}),
    case("name-49-chars", "[app] name", "is not valid", {"name": "a" * 49}),
    case("user-upper", "[app] user", "'Bob' is not valid: a POSIX user name", {"user": "Bob"}),
    case("user-digit-first", "[app] user", "is not valid", {"user": "1bob"}),
    case("user-33-chars", "[app] user", "is not valid", {"user": "u" * 33}),
    case("group-bad", "[app] group", "is not valid: a POSIX group name", {"group": "my group"}),
    case("user-root", "[app] user", "must not run as root", {"user": "root"}),
    case("group-root", "[app] group", "must not run as root", {"group": "root"}),
    case("name-root", "[app] user", "must not run as root", {"name": "root"}),
    # virtualenv xor gunicorn
    case("venv-and-gunicorn", "[app] virtualenv", "set exactly one of virtualenv", {"gunicorn": "/usr/bin/gunicorn"}),
    case("neither-venv-nor-gunicorn", "[app] virtualenv", "set exactly one of", {"virtualenv": DROP}),
    # wsgi
    case("wsgi-no-callable", "[app] wsgi", "'app' is not valid: use 'module:callable'", {"wsgi": "app"}),
    case("wsgi-empty-callable", "[app] wsgi", "is not valid", {"wsgi": "app:"}),
    case("wsgi-no-module", "[app] wsgi", "is not valid", {"wsgi": ":app"}),
    case("wsgi-args", "[app] wsgi", "is not valid", {"wsgi": "app:create(1)"}),
    case("wsgi-double-call", "[app] wsgi", "is not valid", {"wsgi": "app:create()()"}),
    case("wsgi-digit-module", "[app] wsgi", "is not valid", {"wsgi": "1app:app"}),
    case("wsgi-empty-package", "[app] wsgi", "is not valid", {"wsgi": "pkg.:app"}),
    case("worker-class-bad", "[gunicorn] worker_class", "is not valid: a gunicorn worker class",
         gunicorn={"worker_class": "g event"}),
    # health_path
    case("health-relative", "[app] health_path", "'health' is not valid: an absolute URL path",
         {"health_path": "health"}),
    case("health-space", "[app] health_path", "is not valid", {"health_path": "/a b"}),
    case("health-fragment", "[app] health_path", "is not valid", {"health_path": "/a#b"}),
    # environment
    case("env-key-digit", "[app] environment.1A", "variable names may only use", {"environment": {"1A": "x"}}),
    case("env-key-dash", "[app] environment.A-B", "variable names", {"environment": {"A-B": "x"}}),
    case("env-key-space", "[app] environment.A B", "variable names", {"environment": {"A B": "x"}}),
    case("env-key-equals", "[app] environment.A=B", "variable names", {"environment": {"A=B": "x"}}),
    case("env-value-bool", "[app] environment.DEBUG", "must be a string or number, not bool True",
         {"environment": {"DEBUG": True}}),
    case("env-value-list", "[app] environment.A", "not list", {"environment": {"A": ["x"]}}),
    case("env-value-table", "[app] environment.A", "not dict", {"environment": {"A": {"b": 1}}}),
    case("env-value-newline", "[app] environment.A", "must not contain newlines or control characters",
         {"environment": {"A": "x\nExecStartPre=/bin/sh"}}),
    # sockets
    case("socket-in-runtime-dir-with-activation", "[gunicorn] socket", "must not be inside /run/myapp/",
         gunicorn={"socket": "/run/myapp/gunicorn.sock"}),
    case("socket-outside-runtime-dir-without-activation", "[gunicorn] socket", "must be inside /run/myapp/",
         gunicorn={"socket_activation": False, "socket": "/run/myapp.sock"}),
    # reload strategy
    case("strategy-unknown", "[reload] strategy",
         "'canary' is not a strategy; use one of generation, hup, blue-green, rolling",
         reload={"strategy": "canary"}),
    case("multi-instance-needs-activation", "[reload] strategy", "needs [gunicorn] socket_activation = true",
         reload={"strategy": "blue-green"}, gunicorn={"socket_activation": False, "socket": "/run/myapp/g.sock"}),
    case("instances-only-rolling", "[reload] instances", "only applies to strategy",
         reload={"strategy": "blue-green", "instances": 3}),
    case("instances-range", "[reload] instances", "out of range", reload={"strategy": "rolling", "instances": 1}),
    # nginx
    case("server_name-space", "[nginx] server_name", "'a.com b.com' is not valid: server names",
         nginx={"server_name": "a.com b.com"}),
    case("server_name-trailing-dot", "[nginx] server_name", "is not valid", nginx={"server_name": "a.com."}),
    case("server_name-leading-dash", "[nginx] server_name", "is not valid", nginx={"server_name": ["ok.com", "-a"]}),
    case("server_name-regex", "[nginx] server_name", "is not valid", nginx={"server_name": "~^www"}),
    case("listen-word", "[nginx] listen", "'http' is not valid: use a port", nginx={"listen": "http"}),
    case("listen-ssl", "[nginx] listen", "is not valid", nginx={"listen": "443 ssl"}),
    case("listen-no-port", "[nginx] listen", "is not valid", nginx={"listen": "127.0.0.1"}),
    case("listen-v6-no-brackets", "[nginx] listen", "is not valid", nginx={"listen": "::1:80"}),
    case("listen-port-0", "[nginx] listen", "'0': port 0 is out of range 1..65535", nginx={"listen": "0"}),
    case("listen-port-65536", "[nginx] listen", "port 65536 is out of range", nginx={"listen": ["80", "65536"]}),
    case("listen-addr-port-0", "[nginx] listen", "port 0 is out of range", nginx={"listen": "127.0.0.1:0"}),
    case("listen-v6-port-99999", "[nginx] listen", "port 99999 is out of range", nginx={"listen": "[::]:99999"}),
    case("size-unit", "[nginx] client_max_body_size", "'10mb' is not valid: a size like",
         nginx={"client_max_body_size": "10mb"}),
    case("size-negative", "[nginx] client_max_body_size", "is not valid", nginx={"client_max_body_size": "-1"}),
    case("size-empty", "[nginx] client_max_body_size", "is not valid", nginx={"client_max_body_size": ""}),
    case("static-location-relative", "[nginx] static.static/", "the location must be a URL prefix",
         nginx={"static": {"static/": "/srv/s/"}}),
    case("static-location-double-slash", "[nginx] static./s//x/", "URL prefix", nginx={"static": {"/s//x/": "/srv/"}}),
    case("static-location-regex", "[nginx] static./s/*", "URL prefix", nginx={"static": {"/s/*": "/srv/s/"}}),
    case("static-dir-int", "[nginx] static./s/", "must be a directory path string, not int 1",
         nginx={"static": {"/s/": 1}}),
    case("static-dir-bad-char", "[nginx] static./s/", "contains", nginx={"static": {"/s/": "/srv/$host/"}}),
    case("nginx-user-bad", "[nginx] user", "is not valid: the user nginx's workers run as", nginx={"user": "WWW"}),
]


@pytest.mark.parametrize("data, where, fragment", REJECTIONS)
def test_rejected_with_one_line_naming_file_section_and_key(data, where, fragment):
    assert_rejected(data, where, fragment)


def test_load_errors_name_the_file_on_one_line(tmp_path):
    def message(path: Path) -> str:
        with pytest.raises(ConfigError) as e:
            load(path)
        text = str(e.value)
        assert "\n" not in text and text.startswith(f"{path}: "), text
        return text

    assert "no such file" in message(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[app\nname = 1\n")
    assert "not valid TOML" in message(tmp_path / "bad.toml")
    (tmp_path / "latin1.toml").write_bytes(b'[app]\nname = "caf\xe9"\n')
    assert "cannot read" in message(tmp_path / "latin1.toml")
    (tmp_path / "typo.toml").write_text(EXAMPLE.read_text().replace("workers =", "wrokers ="))
    assert message(tmp_path / "typo.toml").startswith(f"{tmp_path / 'typo.toml'}: [gunicorn] wrokers: unknown key")


# --- injection: a value that could inject text into a unit file, nginx or gunicorn config is refused -----------
#: (section, key) -> a valid value; each payload is appended to it. "static" keys are handled below.
STRING_KEYS = {
    ("app", "name"): "myapp", ("app", "user"): "svc", ("app", "group"): "svc",
    ("app", "working_directory"): "/srv/myapp", ("app", "virtualenv"): "/srv/venv",
    ("app", "environment_file"): "/etc/myapp.env", ("app", "wsgi"): "app:app", ("app", "health_path"): "/health",
    ("gunicorn", "worker_class"): "sync", ("gunicorn", "socket"): "/run/myapp.sock",
    ("reload", "strategy"): "hup", ("reload", "helper"): "/usr/bin/reloader",
    ("nginx", "server_name"): "a.com", ("nginx", "listen"): "80", ("nginx", "client_max_body_size"): "10m",
    ("nginx", "user"): "www-data",
    ("static", "location"): "/static/", ("static", "directory"): "/srv/static/", ("env", "key"): "VAR",
}
PAYLOADS = {
    "newline": "\n[Service]\nExecStartPre=/bin/sh -c evil",
    "cr": "\rExecStartPre=/bin/sh",
    "nul": "\x00",
    "tab": "\tx",
    "escape": "\x1b[2J",
    "del": "\x7f",
    "unit-sep": "\x1f",
    "double-quote": '"',
    "single-quote": "'",
    "semicolon": "; include /etc/passwd",
    "open-brace": "{",
    "close-brace": "} server {",
    "dollar": "$host",
    "space": " x",
    "backslash": "\\x",
    "hash": "#x",
}


def injected(section: str, key: str, value: str) -> tuple[dict[str, Any], str]:
    """A config with *value* at (section, key), and the ``[section] key`` its error must name."""
    if section == "static":
        location, directory = (value, "/srv/static/") if key == "location" else ("/static/", value)
        return cfg(nginx={"static": {location: directory}}), f"[nginx] static.{location}"
    if section == "env":
        return cfg({"environment": {value: "x"}}), f"[app] environment.{value}"
    data = cfg({key: value}) if section == "app" else cfg(**{section: {key: value}})
    return data, f"[{section}] {key}"


@pytest.mark.parametrize("section, key", STRING_KEYS, ids=[f"{s}.{k}" for s, k in STRING_KEYS])
def test_a_value_that_could_inject_text_is_refused(section, key):
    for name, payload in PAYLOADS.items():
        data, where = injected(section, key, STRING_KEYS[section, key] + payload)
        if re.search(r"[\x00-\x1f\x7f]", where):
            # A TOML key holding a control character: refused; how the message shows the key (and that it stays
            # one line) is test_keys_with_control_characters_give_one_line_errors' business.
            section_, family = where.split(".")[0].split(" ")  # e.g. "[app]", "environment"
            with pytest.raises(ConfigError, match=re.escape(f"{SRC}: {section_} ") + f".*{family}"):
                parse(data, source=SRC)
            continue
        message = rejected(data)
        assert message.startswith(f"{SRC}: {where}: "), f"payload {name}: {message}"


@pytest.mark.parametrize("section, key, value", [
    ("nginx", "server_name", "a.com; include /etc/passwd"),
    ("nginx", "server_name", ["ok.com", "a.com;include /etc/passwd;"]),
    ("nginx", "listen", "80; evil"),
    ("nginx", "listen", "80;"),
    ("nginx", "client_max_body_size", "1m; evil"),
    ("app", "working_directory", "/srv/app\nExecStartPre=/bin/sh"),
    ("app", "working_directory", "/srv/my app"),
    ("app", "working_directory", "C:\\srv\\app"),
    ("app", "working_directory", "/srv/a\\nb"),
    ("app", "wsgi", "app:app\nExecStartPre=/bin/sh"),
    ("app", "wsgi", "app:app --bind 0.0.0.0:80"),
    ("app", "wsgi", "app:app; import os"),
    ("gunicorn", "socket", "/run/a.sock; }"),
    ("gunicorn", "worker_class", "sync'; import os; '"),
    ("reload", "helper", "/usr/bin/reloader --evil"),
])
def test_named_injection_attempts_are_refused(section, key, value):
    data = cfg({key: value}) if section == "app" else cfg(**{section: {key: value}})
    assert_rejected(data, f"[{section}] {key}", "")


def test_percent_is_allowed_in_paths_and_env_and_escaped_only_in_unit_files():
    app = parse(cfg({
        "working_directory": "/srv/100%n/app", "virtualenv": "/srv/%h/venv", "environment_file": "/etc/%i.env",
        "environment": {"P": "50%% off %n", "Q": "%"},
    }, gunicorn={"socket": "/run/%p.sock"}, reload={"helper": "/opt/%U/reloader"},
        nginx={"static": {"/s/": "/srv/%t/s/"}}))
    files = {f.name: f.content for f in render(app)}
    service, socket = files["myapp.service"], files["myapp.socket"]
    for text in (service, socket, files["nginx.service.d/reloader.conf"]):
        for line in text.splitlines():
            if not line.startswith("#"):
                assert "%" not in line.replace("%%", ""), f"unescaped systemd specifier in {line!r}"
    assert "WorkingDirectory=/srv/100%%n/app\n" in service
    assert "ExecStart=/srv/%%h/venv/bin/gunicorn --config " in service
    assert "EnvironmentFile=/etc/%%i.env\n" in service
    assert "ExecReload=/opt/%%U/reloader exec-reload /etc/reloader/myapp.toml\n" in service
    assert 'Environment="P=50%%%% off %%n"\n' in service and 'Environment="Q=%%"\n' in service
    assert "ListenStream=/run/%%p.sock\n" in socket
    assert "nginx -s reload' sh /opt/%%U/reloader\n" in files["nginx.service.d/reloader.conf"]
    # gunicorn (Python) and nginx take the value literally: no systemd escaping leaks into them
    assert "_CURRENT = '/srv/100%n/app'" in files["myapp.gunicorn.conf.py"]
    assert "bind = ['unix:/run/%p.sock']" in files["myapp.gunicorn.conf.py"]
    assert "server unix:/run/%p.sock " in files["myapp.nginx.conf"]
    assert "alias /srv/%t/s/;" in files["myapp.nginx.conf"]
    assert "%%" not in files["myapp.gunicorn.conf.py"] + files["myapp.nginx.conf"]


def systemd_unquote(rvalue: str) -> str:
    """Strictly model how systemd reads one ``Environment=`` word written by reloader: a single double-quoted
    word; inside it only ``\\\\`` and ``\\"`` escapes; then specifiers, of which only ``%%`` may appear."""
    assert rvalue.startswith('"') and rvalue.endswith('"') and len(rvalue) >= 2, rvalue
    out, i, body = [], 0, rvalue[1:-1]
    while i < len(body):
        c = body[i]
        if c == "\\":
            assert body[i + 1] in '\\"', f"unexpected escape in {rvalue!r}"
            out.append(body[i + 1])
            i += 2
            continue
        assert c != '"', f"unescaped quote ends the word early in {rvalue!r}"
        out.append(c)
        i += 1
    unquoted, result, i = "".join(out), [], 0
    while i < len(unquoted):
        if unquoted[i] == "%":
            assert unquoted[i + 1] == "%", f"specifier %{unquoted[i + 1]} would be expanded in {rvalue!r}"
            i += 2
            result.append("%")
            continue
        result.append(unquoted[i])
        i += 1
    return "".join(result)


ENV_VALUES = {
    "double-quotes": 'say "hi"',
    "single-quotes": "it's 'quoted'",
    "backslashes": "C:\\new\\table\\",
    "escaped-quote": '\\"',
    "percent": "100%",
    "specifiers": "%n %i %% %%%",
    "shell": "$HOME ${X} `id` $(id); rm -rf / && x || y",
    "braces": "{a} }{",
    "semicolon": "a;b",
    "spaces": "  leading and trailing  ",
    "equals": "a=b=c",
    "hash": "#not a comment",
    "unicode": "café ☃",
    "empty": "",
}


@pytest.mark.parametrize("value", ENV_VALUES.values(), ids=ENV_VALUES.keys())
def test_environment_value_is_quoted_so_systemd_reads_it_back_exactly(value):
    app = parse(cfg({"environment": {"FIRST": value, "SECOND": "after"}}))
    service = next(f.content for f in render(app) if f.name == "myapp.service")
    lines = [line for line in service.splitlines() if line.startswith("Environment=")]
    assert [systemd_unquote(line.removeprefix("Environment=")) for line in lines] == [f"FIRST={value}",
                                                                                    "SECOND=after"]


# --- values that once slipped through ----------------------------------------------------------------
@pytest.mark.parametrize("data", [
    {"app": {**BASE, "x\nExecStart=/bin/sh": 1}},
    {"app": BASE, "x\ny": {}},
    cfg({"environment": {"A\nB": "x"}}),
    cfg(nginx={"static": {"/s\n/": "/srv/"}}),
], ids=["unknown-key", "unknown-section", "env-key", "static-location"])
def test_keys_with_control_characters_give_one_line_errors(data):
    rejected(data)


@pytest.mark.parametrize("name", ["0", "1000", "a" * 48])
def test_default_user_from_name_is_validated(name):
    rejected(cfg({"name": name}))


@pytest.mark.parametrize("data", [
    cfg(nginx={"static": {"/x": "/"}}),  # alias becomes '' -> "alias ;"
    cfg(nginx={"static": {"/": "/srv/s/"}}),  # duplicate "location /" with the proxy
    cfg(gunicorn={"socket": "/run/" + "s" * 110 + ".sock"}),  # longer than sun_path (108 bytes)
    cfg(gunicorn={"socket": "/run/myapp"}),  # the socket takes the RuntimeDirectory's path
    cfg(gunicorn={"socket_activation": False, "socket": "/run/myapp/"}),  # no file name
], ids=["static-alias-root", "static-location-root", "socket-too-long", "socket-is-runtime-dir",
        "socket-is-a-directory"])
def test_values_that_break_the_rendered_files_are_refused(data):
    rejected(data)


def test_hup_with_preload_is_refused_because_it_would_never_deploy() -> None:
    assert_rejected(cfg(gunicorn={"preload_app": True}, reload={"strategy": "hup"}),
                    "[reload] strategy", "never deploys new code")
    assert parse(cfg(gunicorn={"preload_app": True})).strategy == "generation"


# --- the schema: each key declared once, on its field -------------------------------------------------------
def _declared() -> list[tuple[str, str, Any]]:
    """(section, key, TomlKey with the field's default) of every field that is a TOML key."""
    from dataclasses import fields

    from reloader.config import AnalysisConfig, BuildConfig, HooksConfig, MetricsConfig, SetupConfig

    out = []
    for cls in (AppConfig, NginxConfig, SetupConfig, AnalysisConfig, BuildConfig, HooksConfig, MetricsConfig):
        for f in fields(cls):
            if f.name in ("source", "nginx", "setup", "analysis", "build", "hooks", "metrics"):
                assert "toml" not in f.metadata, f.name
                continue
            spec = f.metadata["toml"]  # every other field is a key
            out.append((spec.section, spec.key or f.name, (spec, f.default)))
    return out


def test_every_key_is_declared_once_and_unknown_keys_are_told_the_known_ones():
    declared = _declared()
    assert len({(section, key) for section, key, _ in declared}) == len(declared)
    gunicorn_keys = sorted(key for section, key, _ in declared if section == "gunicorn")
    assert "settings" in gunicorn_keys and "config_file" in gunicorn_keys  # the TOML names, not the fields'
    assert_rejected(cfg(gunicorn={"zzzz": 1}), "[gunicorn] zzzz", f"known keys: {', '.join(gunicorn_keys)}")


def test_declared_defaults_and_ranges_are_the_ones_parse_applies():
    base = parse(cfg())
    checked = 0
    for section, key, (spec, default) in _declared():
        if spec.kind not in ("integer", "number", "boolean") or key == "instances":  # instances: rolling only
            continue
        set_to_default = cfg(**{section: {key: default}}) if section != "app" else cfg({key: default})
        assert parse(set_to_default) == base, (section, key)
        if spec.kind == "integer":
            too_big = int(spec.high) + 1
            assert_rejected(cfg(**{section: {key: too_big}}), f"[{section}] {key}",
                            f"{too_big} is out of range; allowed {int(spec.low)}..{int(spec.high)}")
        checked += 1
    assert checked >= 12, checked
