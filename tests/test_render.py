"""reloader.render and the render CLI: the files, their key properties, all-or-nothing writes, and what
systemd-analyze (verify, security --offline) says about the rendered units on this host."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import confined_to, in_tmp, run_gunicorn_config, writes_recorded

from reloader import __version__
from reloader.cli import main
from reloader.config import AppConfig, load, parse
from reloader.render import RenderedFile, render, write_tree

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flaskapp.toml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")


@pytest.fixture(scope="module")
def app() -> AppConfig:
    return load(EXAMPLE)


@pytest.fixture(scope="module")
def files(app: AppConfig) -> dict[str, RenderedFile]:
    return {f.name: f for f in render(app)}


def variant(**sections: dict[str, Any]) -> AppConfig:
    """The example config with some keys of some sections replaced (None removes a key)."""
    data = tomllib.loads(EXAMPLE.read_text())
    for section, changes in sections.items():
        table = data.setdefault(section, {})
        for key, value in changes.items():
            if value is None:
                del table[key]
            else:
                table[key] = value
    return parse(data, source=str(EXAMPLE))


def entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each assignment of a unit file, in order."""
    out, section = [], ""
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def values(text: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in entries(text) if (s, k) == (section, key)]


def one(text: str, section: str, key: str) -> str:
    found = values(text, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


# --- the files -------------------------------------------------------------------------------------------
def test_every_file_is_rendered_with_its_install_path(files):
    assert {name: f.install_path for name, f in files.items()} == {
        "flaskapp.gunicorn.conf.py": "/etc/reloader/flaskapp.gunicorn.conf.py",
        "flaskapp.pause_hook.py": "/etc/reloader/flaskapp.pause_hook.py",
        "flaskapp.service": "/etc/systemd/system/flaskapp.service",
        "flaskapp.socket": "/etc/systemd/system/flaskapp.socket",
        "flaskapp.nginx.conf": "/etc/nginx/conf.d/flaskapp.conf",
        "nginx.service.d/reloader.conf": "/etc/systemd/system/nginx.service.d/reloader.conf",
    }
    assert all(f.mode == 0o644 and f.content.endswith("\n") for f in files.values())
    # config before the units that read it
    assert list(files)[0] == "flaskapp.gunicorn.conf.py"


def test_service_unit(app, files):
    service = files["flaskapp.service"].content
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "exec"
    assert one(service, "Service", "KillMode") == "control-group"
    assert one(service, "Service", "Restart") == "on-failure"
    assert int(one(service, "Service", "TimeoutStopSec")) > app.graceful_timeout
    assert one(service, "Service", "ExecReload") == "/usr/bin/reloader exec-reload /etc/reloader/flaskapp.toml"
    assert one(service, "Service", "ExecStart") == (
        "/srv/flaskapp/venv/bin/gunicorn --config /etc/reloader/flaskapp.gunicorn.conf.py app:app")
    assert one(service, "Service", "User") == "flaskapp"
    assert one(service, "Service", "Group") == "flaskapp"
    assert one(service, "Service", "WorkingDirectory") == "/srv/flaskapp/current"
    assert one(service, "Service", "RuntimeDirectory") == "flaskapp"
    assert one(service, "Unit", "Requires") == "flaskapp.socket"
    assert "flaskapp.socket" in values(service, "Unit", "After")
    assert one(service, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("graceful", [1, 30, 600])
def test_stop_timeout_outlasts_the_graceful_timeout(graceful):
    service = next(f.content for f in render(variant(gunicorn={"graceful_timeout": graceful}))
                   if f.name.endswith(".service"))
    assert int(one(service, "Service", "TimeoutStopSec")) > graceful


def test_socket_unit(files):
    socket = files["flaskapp.socket"].content
    assert one(socket, "Socket", "ListenStream") == "/run/flaskapp.sock"
    assert one(socket, "Socket", "SocketUser") == "flaskapp"
    assert one(socket, "Socket", "SocketGroup") == "www-data"
    assert one(socket, "Socket", "SocketMode") == "0660"
    # No PartOf=: restarting the service must not close and re-create the listening socket.
    assert values(socket, "Unit", "PartOf") == []


def test_notify_reload_selects_type_notify_reload(app):
    service = next(f.content for f in render(app, notify_reload=True) if f.name.endswith(".service"))
    assert one(service, "Service", "Type") == "notify-reload"


def test_without_socket_activation_there_is_no_socket_unit(tmp_path):
    app = variant(gunicorn={"socket_activation": False})
    files = {f.name: f.content for f in render(app)}
    assert "flaskapp.socket" not in files
    service = files["flaskapp.service"]
    assert values(service, "Unit", "Requires") == []
    assert "flaskapp.socket" not in service
    assert "server unix:/run/flaskapp/gunicorn.sock " in files["flaskapp.nginx.conf"]
    assert "bind = ['unix:/run/flaskapp/gunicorn.sock']" in files["flaskapp.gunicorn.conf.py"]
    namespace = gunicorn_namespace(app, tmp_path)
    assert namespace["bind"] == ["unix:/run/flaskapp/gunicorn.sock"]  # a setting, not part of the layout
    assert namespace["umask"] == 0o111  # nginx (another user) must be able to connect


def gunicorn_namespace(app: AppConfig, tmp_path: Path) -> dict[str, Any]:
    """The rendered gunicorn config of *app*, laid out under *tmp_path*, executed there: it must write
    nothing outside it (its module level records what it booted, under the ready directory)."""
    tmp_app = in_tmp(app, tmp_path)
    source = next(f.content for f in render(tmp_app) if f.name.endswith(".gunicorn.conf.py"))
    return run_gunicorn_config(source, tmp_path)


def test_gunicorn_config_is_python_with_the_settings_and_hooks(app, files, tmp_path):
    source = files["flaskapp.gunicorn.conf.py"].content
    assert "pidfile = '/run/flaskapp/gunicorn.pid'" in source
    assert "os.environ.get(\"RELOADER_READY_DIR\", '/run/flaskapp/ready')" in source
    ns = gunicorn_namespace(app, tmp_path)
    assert ns["wsgi_app"] == "app:app"
    assert ns["chdir"] == "/srv/flaskapp/current"
    assert ns["bind"] == ["unix:/run/flaskapp.sock"]
    assert (ns["workers"], ns["worker_class"], ns["threads"]) == (4, "sync", 1)
    assert (ns["timeout"], ns["graceful_timeout"], ns["preload_app"]) == (30, 30, False)
    assert ns["pidfile"] == f"{tmp_path}/run/gunicorn.pid"
    assert ns["control_socket_disable"] is True
    assert "umask" not in ns  # with socket activation systemd creates the socket (SocketMode=)
    for hook in ("when_ready", "post_worker_init", "child_exit", "pre_exec", "on_exit"):
        assert callable(ns[hook]), hook


def test_executing_the_gunicorn_config_writes_only_its_boot_record_in_the_ready_dir(app, tmp_path):
    """What gunicorn's evaluation of the config does to the host: one boot record, under the ready dir."""
    with writes_recorded() as writes:
        gunicorn_namespace(app, tmp_path)
    ready = tmp_path / "run" / "ready" / str(os.getpid())
    assert {Path(w).parent for w in writes} <= {ready, ready.parent}, writes
    assert (ready / "boot.json").is_file()


def test_gunicorn_hooks_record_ready_workers(app, tmp_path):
    ns = gunicorn_namespace(app, tmp_path)
    ready = tmp_path / "run" / "ready"
    assert ns["_READY_DIR"] == str(ready)
    server = SimpleNamespace(pid=100, systemd=False, cfg=SimpleNamespace(env_orig={}))
    worker = SimpleNamespace(pid=101, ppid=100)
    with confined_to(tmp_path):
        ns["when_ready"](server)
        ns["post_worker_init"](worker)
        assert sorted(p.name for p in (ready / "100").iterdir()) == ["master", "worker-101"]
        assert (ready / "100" / "master").read_text() == "100"
        ns["child_exit"](server, worker)
        assert sorted(p.name for p in (ready / "100").iterdir()) == ["exit-101", "master"]
        ns["pre_exec"](server)  # not socket-activated: nothing to move
        ns["on_exit"](server)
    assert [p.name for p in ready.iterdir()] == [str(os.getpid())]  # only the boot record of this process


def test_a_new_master_gets_no_notify_socket(app, tmp_path):
    """systemd refuses (and logs a warning about) a notification from a process that is neither the main
    PID nor the helper: the USR2 master must not send gunicorn's READY=1 before the hand-over."""
    ns = gunicorn_namespace(app, tmp_path)
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/usr/bin", "INVOCATION_ID": "x"}
    server = SimpleNamespace(pid=100, systemd=False, cfg=SimpleNamespace(env_orig=dict(env)))
    ns["pre_exec"](server)
    assert server.cfg.env_orig == {"PATH": "/usr/bin", "INVOCATION_ID": "x"}


def test_nginx_site(files):
    site = files["flaskapp.nginx.conf"].content
    upstream = re.search(r"upstream flaskapp_gunicorn \{(.*?)\}", site, re.S)
    assert upstream, site
    assert re.search(r"^\s*server unix:/run/flaskapp\.sock[ ;]", upstream.group(1), re.M), upstream.group(1)
    assert "proxy_pass http://flaskapp_gunicorn;" in site
    # A static dir inside the release follows the live release, then the previous one, never `current`.
    static = re.search(r"location ~ \^/static/\(\?<reloader_file>\.\*\)\$ \{(.*?)\}", site, re.S)
    assert static, site
    assert "root /var/lib/reloader/flaskapp;" in static.group(1)
    assert ("try_files /live/static/$reloader_file /previous/static/$reloader_file =404;"
            in static.group(1)), static.group(1)
    assert "/srv/flaskapp/current/static" not in static.group(1)
    assert re.search(r"^\s*listen 80;$", site, re.M)
    assert re.search(r"^\s*server_name flaskapp\.example _;$", site, re.M)
    assert "client_max_body_size 10m;" in site
    assert site.count("{") == site.count("}")


@pytest.mark.parametrize(("sections", "tries"), [
    ({}, 4 + 16 + 1),  # the example: 4 workers, nginx's 16 cached keep-alive connections
    ({"gunicorn": {"workers": 9}}, 9 + 16 + 1),
    ({"gunicorn": {"workers": 2, "worker_class": "asgi"}}, 2 + 1),  # ASGI: no upstream keep-alive
    # Blue-green/rolling: the canary instance's workers too (the analysis' canary route, one more entry).
    ({"reload": {"strategy": "rolling", "instances": 3}, "gunicorn": {"workers": 2}}, 8 + 16 + 1),
    ({"reload": {"strategy": "blue-green"}, "gunicorn": {"workers": 2}}, 4 + 16 + 1),
    ({"reload": {"strategy": "blue-green"}, "gunicorn": {"workers": 2}, "analysis": {"enabled": False}}, 2 + 16 + 1),
])
def test_nginx_resends_an_idempotent_request_once_per_worker_that_can_die_under_it(sections, tries):
    """nginx sends a request at most once per upstream entry: the socket (or the routes) is listed once
    per serving worker and per cached keep-alive connection (a stale one uses up an entry) + 1, tries are
    bounded by that, never on a timeout, never past gunicorn's timeout,
    and POST/PATCH stay non-idempotent (nginx's default: no `non_idempotent`). docs/worker-death.md."""
    app = variant(**sections)
    files = {f.name: f.content for f in render(app)}
    site = files["flaskapp.nginx.conf"]
    servers = site if not app.multi_instance else files["flaskapp.upstream.conf"]
    entries = len(re.findall(r"^\s*server unix:\S+( weight=\d+)? max_fails=0( backup)?;$", servers, re.M))
    assert entries == tries + app.canary_route, servers
    assert re.search(r"^\s*proxy_next_upstream error;$", site, re.M), site
    assert f"proxy_next_upstream_tries {tries};" in site
    assert "proxy_next_upstream_timeout 30s;" in site
    assert "non_idempotent" not in site
    assert ("keepalive 16;" in site) == (not app.asgi), site


def test_nginx_dropin_reloads_through_the_helper(files):
    dropin = files["nginx.service.d/reloader.conf"].content
    reset, command = values(dropin, "Service", "ExecReload")
    assert reset == ""
    # The helper when it is installed; nginx's own test-and-reload if reloader was removed.
    assert command.startswith("/bin/sh -c 'if [ -x \"$$1\" ]; then exec \"$$1\" nginx-reload; fi; ")
    assert "/usr/sbin/nginx -t -q && exec /usr/sbin/nginx -s reload' sh /usr/bin/reloader" in command


# --- write_tree: all or nothing --------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def test_write_tree_writes_every_file(files, tmp_path):
    written = write_tree(list(files.values()), tmp_path / "out")
    assert written == [tmp_path / "out" / name for name in files]
    for name, f in files.items():
        path = tmp_path / "out" / name
        assert path.read_text() == f.content
        assert path.stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "out").glob(".reloader-render-*"))


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated\n")
    (out / "flaskapp.service").write_text("old service\n")
    return out


def fail_on_third_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    original, calls = getattr(owner, name), []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_write_tree_failure_while_writing_leaves_the_output_untouched(files, existing_out, monkeypatch):
    before = snapshot(existing_out)
    fail_on_third_call(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="simulated"):
        write_tree(list(files.values()), existing_out)
    monkeypatch.undo()
    assert snapshot(existing_out) == before  # no new file, old content intact, no temp dir left


def test_write_tree_failure_while_renaming_leaves_the_output_untouched(files, existing_out, monkeypatch):
    before = snapshot(existing_out)
    fail_on_third_call(monkeypatch, os, "replace")
    with pytest.raises(OSError, match="simulated"):
        write_tree(list(files.values()), existing_out)
    monkeypatch.undo()
    assert not list(existing_out.glob(".reloader-render-*"))  # this part holds today
    assert snapshot(existing_out) == before


# --- systemd-analyze on this host ------------------------------------------------------------------------
def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYSTEMD_ANALYZE or "systemd-analyze", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def verify(app: AppConfig, tmp_path: Path) -> tuple[int, list[str]]:
    write_tree(render(app), tmp_path)
    units = [f.name for f in render(app) if f.name.endswith((".service", ".socket"))]
    r = analyze("verify", "--man=no", *units, cwd=tmp_path)
    return r.returncode, [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing_but_the_missing_binaries(app, tmp_path):
    status, lines = verify(app, tmp_path)
    print("\n".join(lines))
    # On this host /srv/flaskapp/venv/bin/gunicorn and (usually) /usr/bin/reloader don't exist; verify reports
    # exactly that and nothing else: no unknown key, bad value, specifier or quoting problem.
    expected = {f"flaskapp.service: Command {path} is not executable: No such file or directory"
                for path in (app.gunicorn_bin, app.helper) if not os.access(path, os.X_OK)}
    assert set(lines) == expected, lines
    assert status == (1 if expected else 0)


@needs_systemd_analyze
@pytest.mark.parametrize("sections", [
    {},
    {"gunicorn": {"socket_activation": False}},
    # values that need escaping: systemd must read them without a single complaint
    {"app": {"working_directory": "/tmp/%z/100%", "environment_file": "/etc/%q.env",
             "environment": {"Q": 'say "hi" it\'s C:\\new\\ 100% %n %%', "E": "", "N": 8080}},
     "gunicorn": {"socket": "/run/%z.sock"}},
], ids=["example", "no-socket-activation", "escaped-values"])
def test_systemd_analyze_verify_passes_with_existing_binaries(tmp_path, sections):
    """With ExecStart=/ExecReload= binaries that exist, verify is silent and succeeds."""
    gunicorn = shutil.which("true") or "/bin/true"
    app = variant(**{**sections, "app": {**sections.get("app", {}), "virtualenv": None, "gunicorn": gunicorn}},
                  reload={"helper": gunicorn})
    status, lines = verify(app, tmp_path)
    assert (status, lines) == (0, [])


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(app, tmp_path):
    """The check above is not vacuous: an unknown key or an unescaped specifier is reported."""
    write_tree(render(app), tmp_path)
    service = tmp_path / "flaskapp.service"
    service.write_text(service.read_text().replace("KillMode=control-group", "KillMode=control-group\nBogusKey=1\n"
                                                   'Environment="A=%z"'))
    status, lines = verify_paths(tmp_path, "flaskapp.service")
    assert status != 0
    assert any("Unknown key 'BogusKey'" in line for line in lines), lines
    assert any("Failed to resolve specifiers" in line for line in lines), lines


def verify_paths(directory: Path, *units: str) -> tuple[int, list[str]]:
    r = analyze("verify", "--man=no", *units, cwd=directory)
    return r.returncode, [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


@needs_systemd_analyze
def test_systemd_analyze_security_exposure_is_at_most_2(app, tmp_path):
    write_tree(render(app), tmp_path)
    r = analyze("security", "--offline=true", "flaskapp.service", cwd=tmp_path)
    match = re.search(r"Overall exposure level for flaskapp\.service: (\d+\.\d+)", r.stdout)
    assert match, r.stdout + r.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security --offline=true flaskapp.service: exposure {exposure}")
    assert exposure <= 2.0, r.stdout


# --- the CLI -----------------------------------------------------------------------------------------------
def test_cli_render_writes_the_files(tmp_path, files):
    """The real command line, once as a subprocess; the other CLI tests call main() in-process (fast)."""
    r = subprocess.run([sys.executable, "-m", "reloader", "render", "examples/flaskapp.toml", "-o",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "out" / name) for name in files]
    assert {name: (tmp_path / "out" / name).read_text() for name in files} == {
        name: f.content for name, f in files.items()}


def test_cli_render_without_output_prints_every_file(capsys, files):
    assert main(["render", str(EXAMPLE)]) == 0
    printed = capsys.readouterr().out
    for name, f in files.items():
        assert f"# ---- {name} -> {f.install_path}\n{f.content}" in printed


@pytest.mark.parametrize("config, problem", [
    ('[app]\nname = "x"\nworking_directory = "/srv/x"\nvirtualenv = "/v"\nwsgi = "x:app"\n[gunicorn]\nworkrs = 2\n',
     "[gunicorn] workrs: unknown key; did you mean 'workers'?"),
    ('[app]\nname = "x"\nworking_directory = "/srv/x\\n[Service]"\nvirtualenv = "/v"\nwsgi = "x:app"\n',
     "[app] working_directory: must not contain newlines"),
    ("[app\n", "not valid TOML"),
], ids=["unknown-key", "injection", "bad-toml"])
def test_cli_render_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, config, problem):
    path = tmp_path / "bad.toml"
    path.write_text(config)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["render", str(path), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"reloader: {path}: "), captured.err
    assert problem in captured.err
    assert list(out.iterdir()) == []


def test_cli_missing_config_exits_2(tmp_path, capsys):
    assert main(["render", str(tmp_path / "nope.toml"), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"reloader: {tmp_path / 'nope.toml'}: no such file\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--version"], f"reloader {__version__}"),
    (["--help"], "render"),
    (["render", "--help"], "--notify-reload"),
])
def test_cli_version_and_help_exit_0(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert expected in capsys.readouterr().out
