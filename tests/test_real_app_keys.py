"""Host tests for the keys real apps need (issue 11): writable state, health_status, [setup],
[gunicorn.settings], config_file, access_log, the helper default; and what they render to."""

from __future__ import annotations

import dataclasses
import os
import shlex
import stat
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import confined_to, in_tmp

from reloader import config, install, setup_commands
from reloader.config import ConfigError, parse
from reloader.render import GUNICORN_ACCESS_LOG_FORMAT, render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flaskapp.toml"
SRC = "app.toml"


def data(**sections: dict[str, Any]) -> dict[str, Any]:
    d = tomllib.loads(EXAMPLE.read_text())
    for section, changes in sections.items():
        table = d.setdefault(section, {})
        for key, value in changes.items():
            table[key] = value
    return d


def load(**sections: dict[str, Any]) -> config.AppConfig:
    return parse(data(**sections), source=SRC)


def refused(where: str, fragment: str, **sections: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as e:
        parse(data(**sections), source=SRC)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{SRC}: {where}: "), message
    assert fragment in message, message


def rendered(app: config.AppConfig) -> dict[str, str]:
    return {f.name: f.content for f in render(app)}


# --- defaults ------------------------------------------------------------------------------------------
def test_defaults_keep_the_example_as_it_was() -> None:
    app = load()
    assert (app.read_write_paths, app.state_directory, app.cache_directory, app.logs_directory) == ((), "", "", "")
    assert app.health_status == (200, 399) and app.access_log is False  # nginx logs every request
    assert app.setup == config.SetupConfig() and app.gunicorn_settings == () and app.gunicorn_config_file == ""
    assert app.health_host == "flaskapp.example" and not app.asgi
    files = rendered(app)
    assert "flaskapp-setup.service" not in files
    service = files["flaskapp.service"]
    # The only state directory is reloader's own records of the releases.
    writable = [line for line in service.splitlines() if line.startswith(("ReadWritePaths=", "StateDirectory="))]
    assert writable == ["ReadWritePaths=/var/lib/reloader/flaskapp"], writable
    assert "accesslog = None" in files["flaskapp.gunicorn.conf.py"]


@pytest.mark.parametrize("names,host", [(["_"], "localhost"), (["_", "*.shop.example", "shop.example"],
                                                                  "shop.example")])
def test_health_host_is_the_first_real_server_name(names, host) -> None:
    assert load(nginx={"server_name": names}).health_host == host


@pytest.mark.parametrize("worker", sorted(config.ASGI_WORKERS))
def test_asgi_worker_classes_are_preflighted_as_asgi(worker) -> None:
    app = load(gunicorn={"worker_class": worker})
    assert app.asgi
    from reloader.engine import preflight_args

    assert preflight_args(app)[-1] == "--asgi"
    assert "--host" in preflight_args(app) and "flaskapp.example" in preflight_args(app)


# --- writable state --------------------------------------------------------------------------------------
def test_writable_paths_render_into_the_sandbox_of_service_and_setup_unit() -> None:
    app = load(app={"read_write_paths": ["/srv/flaskapp/uploads", "/var/spool/x%y"], "state_directory": "flaskapp",
                    "cache_directory": "flaskapp/static", "logs_directory": "flaskapp"},
               setup={"commands": ["flask init-db"]})
    files = rendered(app)
    for unit in ("flaskapp.service", "flaskapp-setup.service"):
        lines = files[unit].splitlines()
        assert "ReadWritePaths=/srv/flaskapp/uploads" in lines and "ReadWritePaths=/var/spool/x%%y" in lines
        assert {"StateDirectory=flaskapp", "CacheDirectory=flaskapp/static", "LogsDirectory=flaskapp"} <= set(lines)


@pytest.mark.parametrize("key,value,fragment", [
    ("read_write_paths", "relative/dir", "must be an absolute path"),
    ("read_write_paths", ["/srv/a b"], "contains ' '"),
    ("read_write_paths", ["/srv/../etc"], "must be normalized"),
    ("read_write_paths", ["/"], "refusing to make '/' writable"),
    ("read_write_paths", ["/etc"], "refusing to make '/etc' writable"),
    ("read_write_paths", [], "non-empty list"),
    ("read_write_paths", [1], "must be a string or a non-empty list of strings"),
    ("read_write_paths", ["/srv/x\nExecStartPre=/bin/sh"], "is not valid"),
    ("state_directory", "/var/lib/x", "relative to /var/lib"),
    ("state_directory", "a/../b", "is not valid"),
    ("cache_directory", "x y", "relative to /var/cache"),
    ("logs_directory", "x\nUser=root", "control characters"),
    ("logs_directory", 3, "must be a string"),
    ("health_status", [200], "must be [LOWEST, HIGHEST]"),
    ("health_status", [399, 200], "the lowest first"),
    ("health_status", [200, 600], "100..599"),
    ("health_status", [True, 300], "must be [LOWEST, HIGHEST]"),
])
def test_bad_app_keys_are_refused_in_one_line(key, value, fragment) -> None:
    refused(f"[app] {key}", fragment, app={key: value})


# --- [setup] -----------------------------------------------------------------------------------------------
def test_setup_commands_are_split_like_a_shell_and_extend_the_reload_timeout() -> None:
    base = load()
    app = load(setup={"commands": ["python manage.py migrate --noinput", "sh -c 'echo \"a b\"'"], "timeout": 90})
    assert app.setup.commands == (("python", "manage.py", "migrate", "--noinput"), ("sh", "-c", 'echo "a b"'))
    timeout = [line for line in rendered(app)["flaskapp.service"].splitlines() if line.startswith("TimeoutStartSec=")]
    before = [line for line in rendered(base)["flaskapp.service"].splitlines() if line.startswith("TimeoutStartSec=")]
    assert int(timeout[0].split("=")[1]) == int(before[0].split("=")[1]) + 90
    setup = rendered(app)["flaskapp-setup.service"]
    assert "Type=oneshot" in setup and "User=flaskapp" in setup and "WorkingDirectory=/srv/flaskapp/current" in setup
    assert "ExecStart=/usr/bin/reloader setup /etc/reloader/flaskapp.toml" in setup
    assert "RuntimeDirectory" not in setup  # its stop would empty the service's /run/flaskapp
    assert "ProtectSystem=strict" in setup and "[Install]" not in setup


@pytest.mark.parametrize("setup,where,fragment", [
    ({"commands": "migrate"}, "[setup] commands", "must be a list of command lines"),
    ({"commands": [1]}, "[setup] commands", "must be a list of command lines"),
    ({"commands": [""]}, "[setup] commands", "an empty command line"),
    ({"commands": ["echo 'unclosed"]}, "[setup] commands", "is not a valid command line"),
    ({"commands": ["a\nb"]}, "[setup] commands", "control characters"),
    ({"timeout": 0}, "[setup] timeout", "out of range"),
    ({"command": ["x"]}, "[setup] command", "did you mean 'commands'?"),
])
def test_bad_setup_is_refused(setup, where, fragment) -> None:
    refused(where, fragment, setup=setup)


def test_setup_with_a_multi_instance_strategy_is_refused() -> None:
    refused("[setup] commands", "not supported with strategy 'rolling'", setup={"commands": ["true"]},
            reload={"strategy": "rolling"})


def test_setup_commands_run_in_the_release_with_the_venv_first_on_path(tmp_path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    tool = venv / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho \"tool in $(pwd) venv=$VIRTUAL_ENV\"\n")
    tool.chmod(0o755)
    release = tmp_path / "release"
    release.mkdir()
    app = load(app={"virtualenv": str(venv)}, setup={"commands": ["tool", "sh -c 'echo ok > done'"]})
    seen: list[str] = []
    setup_commands.run(app, str(release), seen.append)
    assert (release / "done").read_text() == "ok\n"
    assert f"setup: tool done (tool in {release} venv={venv})" in seen


def test_a_failing_setup_command_names_itself_and_its_output_tail(tmp_path) -> None:
    app = load(setup={"commands": ["true", "sh -c 'echo line1; echo line2; echo boom >&2; exit 3'", "touch never"]})
    with pytest.raises(setup_commands.SetupFailed) as e:
        setup_commands.run(app, str(tmp_path), lambda _: None)
    assert str(e.value) == ("setup command \"sh -c 'echo line1; echo line2; echo boom >&2; exit 3'\" failed with "
                            "exit status 3: line1 | line2 | boom")
    assert not (tmp_path / "never").exists()


def test_the_failure_keeps_the_exception_line_a_cli_printed_before_its_usage(tmp_path) -> None:
    script = ("echo Traceback; echo \"ModuleNotFoundError: No module named 'x'\"; echo; echo Usage: flask; "
              "echo Try flask --help; echo \"Error: No such command 'init-db'.\"; exit 2")
    app = load(setup={"commands": [f"sh -c {shlex.quote(script)}"]})
    with pytest.raises(setup_commands.SetupFailed) as e:
        setup_commands.run(app, str(tmp_path), lambda _: None)
    assert str(e.value).endswith("exit status 2: ModuleNotFoundError: No module named 'x' | Usage: flask | "
                                 "Try flask --help | Error: No such command 'init-db'.")


def test_a_hanging_setup_command_is_killed_at_the_timeout(tmp_path) -> None:
    app = load(setup={"commands": ["sh -c 'echo waiting; sleep 60'"], "timeout": 1})
    with pytest.raises(setup_commands.SetupFailed) as e:
        setup_commands.run(app, str(tmp_path), lambda _: None)
    assert "timed out ([setup] timeout = 1 s): waiting" in str(e.value)


def test_a_missing_setup_program_is_a_clear_failure(tmp_path) -> None:
    app = load(setup={"commands": ["no-such-program-xyz --flag"]})
    with pytest.raises(setup_commands.SetupFailed, match="could not start: No such file or directory"):
        setup_commands.run(app, str(tmp_path), lambda _: None)


# --- [gunicorn] settings, config_file, access_log -------------------------------------------------------------
def namespace(app: config.AppConfig, ready: Path) -> dict[str, Any]:
    """The rendered gunicorn config executed with its ready directory at *ready* and its other paths under
    it (tests/fakes.py): it must write nothing elsewhere, and the environment is put back afterwards."""
    source = rendered(in_tmp(app, ready))["flaskapp.gunicorn.conf.py"]
    ns: dict[str, Any] = {}
    with confined_to(ready):
        os.environ["RELOADER_READY_DIR"] = str(ready)
        exec(compile(source, "flaskapp.gunicorn.conf.py", "exec"), ns)
    return ns


def test_gunicorn_settings_pass_through_with_repr(tmp_path) -> None:
    settings = {"max_requests": 1000, "keepalive": 5, "forwarded_allow_ips": "*", "limit_request_line": 8190,
                "worker_connections": 500, "raw_paste_global_conf": ["a=1"], "secure_scheme_headers": {"X-P": "https"},
                "access_log_format": '%(h)s "%(r)s" %(s)s'}
    ns = namespace(load(gunicorn={"settings": settings, "access_log": False}), tmp_path)
    for name, value in settings.items():
        assert ns[name] == value, name
    assert ns["accesslog"] is None and ns["errorlog"] == "-"


def test_access_log_is_off_by_default_and_at_debug_priority_when_on(tmp_path) -> None:
    """Off: no journal line per request. On: to the journal at priority debug ("<7>"), journald's own
    rate-limit budget, whatever format the app sets."""
    assert namespace(load(), tmp_path)["accesslog"] is None
    on = namespace(load(gunicorn={"access_log": True}), tmp_path)
    assert on["accesslog"] == "-" and on["access_log_format"] == "<7>" + GUNICORN_ACCESS_LOG_FORMAT
    own = namespace(load(gunicorn={"access_log": True, "settings": {"access_log_format": '%(h)s "%(r)s"'}}),
                    tmp_path)
    assert own["access_log_format"] == '<7>%(h)s "%(r)s"'


@pytest.mark.parametrize("name,fragment", [
    ("bind", "is set by reloader ([gunicorn] socket)"),
    ("pidfile", "is set by reloader"),
    ("workers", "[gunicorn] workers"),
    ("daemon", "is set by reloader"),
    ("chdir", "[app] working_directory"),
    ("wsgi_app", "[app] wsgi"),
    ("reload", "systemctl reload"),
    ("accesslog", "[gunicorn] access_log"),
    ("pre_exec", "a hook it defines"),
    ("when_ready", "define them in [gunicorn] config_file"),
    ("post_fork", "define them in [gunicorn] config_file"),
    ("Max-Requests", "a gunicorn setting name"),
])
def test_settings_reloader_owns_or_cannot_hold_are_refused(name, fragment) -> None:
    refused(f"[gunicorn] settings.{name}", fragment, gunicorn={"settings": {name: 1}})


def test_a_setting_value_must_be_a_plain_literal() -> None:
    import datetime

    refused("[gunicorn] settings.max_requests", "must be a string, number, boolean",
            gunicorn={"settings": {"max_requests": datetime.date(2026, 1, 1)}})
    refused("[gunicorn] access_log", "must be true or false", gunicorn={"access_log": "yes"})
    refused("[gunicorn] config_file", "must be an absolute path", gunicorn={"config_file": "gunicorn.conf.py"})
    refused("[gunicorn] config_file", "ending in .py", gunicorn={"config_file": "/etc/gunicorn.conf"})


def test_config_file_loads_first_and_its_hooks_run_before_reloaders(tmp_path) -> None:
    log = tmp_path / "hooks.log"
    user = tmp_path / "mine.py"
    user.write_text(f"""
import multiprocessing
max_requests = 123
keepalive = 7
def when_ready(server):
    open({str(log)!r}, "a").write("user when_ready\\n")
def post_worker_init(worker):
    assert not __import__("os").path.exists({str(tmp_path / 'ready' / '100' / 'worker-101')!r})
    open({str(log)!r}, "a").write("user post_worker_init\\n")
def post_fork(server, worker):
    pass
""")
    ns = namespace(load(gunicorn={"config_file": str(user), "settings": {"keepalive": 9}}), tmp_path / "ready")
    assert ns["max_requests"] == 123 and ns["keepalive"] == 9  # the TOML table wins over the file
    assert callable(ns["post_fork"])  # the user's own other hooks pass through
    assert ns["bind"] == ["unix:/run/flaskapp.sock"]
    server, worker = SimpleNamespace(pid=100, systemd=False), SimpleNamespace(pid=101, ppid=100)
    ns["when_ready"](server)
    ns["post_worker_init"](worker)
    assert log.read_text() == "user when_ready\nuser post_worker_init\n"
    assert sorted(p.name for p in (tmp_path / "ready" / "100").iterdir()) == ["master", "worker-101"]


def test_config_file_setting_what_reloader_owns_stops_gunicorn_with_a_clear_error(tmp_path) -> None:
    user = tmp_path / "mine.py"
    user.write_text("bind = ['0.0.0.0:8000']\n")
    with pytest.raises(RuntimeError, match=f"{user} sets 'bind', which reloader sets from \\[gunicorn\\] socket"):
        namespace(load(gunicorn={"config_file": str(user)}), tmp_path)


# --- install's pre-checks -------------------------------------------------------------------------------------
def test_install_refuses_a_helper_that_is_not_executable_and_missing_writable_paths(tmp_path) -> None:
    helper = tmp_path / "reloader"
    helper.write_text("#!/bin/sh\n")
    app = load(reload={"helper": str(helper)}, app={"read_write_paths": [str(tmp_path / "missing"), str(tmp_path)]})
    problems = install.preinstall_problems(app)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{SRC}: [reload] helper: {helper} is not executable")
    assert f"{tmp_path / 'missing'} does not exist" in problems[1]
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    assert install.preinstall_problems(load(reload={"helper": str(helper)})) == []


def test_default_helper_is_the_running_reloader_script_without_the_deb(tmp_path, monkeypatch) -> None:
    script = tmp_path / "venv" / "bin" / "reloader"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "install", "x.toml"])
    monkeypatch.setattr(config, "DEB_HELPER", str(tmp_path / "no-deb"))
    assert config.default_helper() == str(script)
    assert load().helper == str(script)
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/dist-packages/reloader/__main__.py"])
    assert config.default_helper() == str(tmp_path / "no-deb")


def test_a_change_of_writable_paths_or_user_needs_a_restart(tmp_path) -> None:
    def planned(app: config.AppConfig) -> list:
        return [dataclasses.replace(f, install_path=str(tmp_path / os.path.basename(f.name))) for f in render(app)]

    old = planned(load())
    for f in old:
        Path(f.install_path).write_text(f.content)
    assert install.restart_only_changes(load(), old) == []
    changed = load(app={"state_directory": "flaskapp", "user": "web"})
    assert install.restart_only_changes(changed, planned(changed)) == [
        "flaskapp.service: Group=", "flaskapp.service: StateDirectory=", "flaskapp.service: User=",
        "flaskapp.socket: SocketUser="]
    absent = load(app={"name": "other"})
    assert install.restart_only_changes(absent, planned(absent)) == []


@pytest.mark.parametrize("keepalive,line", [(None, "keepalive_timeout 1000ms;"), (5, "keepalive_timeout 4000ms;"),
                                            (1, "keepalive_timeout 500ms;"), (0, None)])
def test_nginx_drops_idle_upstream_connections_before_gunicorn_does(keepalive, line) -> None:
    settings = {} if keepalive is None else {"keepalive": keepalive}
    site = rendered(load(gunicorn={"settings": settings}))["flaskapp.nginx.conf"]
    if line is None:
        assert "keepalive_timeout" not in site
    else:
        assert f"    {line}" in site.splitlines()


def test_asgi_apps_get_no_upstream_keepalive() -> None:
    site = rendered(load(gunicorn={"worker_class": "uvicorn_worker.UvicornWorker"}))["flaskapp.nginx.conf"]
    assert "keepalive 16;" not in site and "keepalive_timeout" not in site
    assert "    keepalive 16;" in rendered(load())["flaskapp.nginx.conf"].splitlines()
