"""Every failure shows its cause (host tests): the exception with the app's file and line found in a failed
process's output, the setting that fixes a sandbox refusal, and the first start's sandboxed pre-flight
command (run for real in tests/test_commands.py and tests/test_first_hour.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from configbed import cfg

from reloader import causes, firststart, setup_commands
from reloader.config import parse

FLASK_CLI_IMPORT_ERROR = """\
Error: While importing 'microblog', an ImportError was raised:

Traceback (most recent call last):
  File "/srv/microblog/venv/lib/python3.11/site-packages/flask/cli.py", line 245, in locate_app
    __import__(module_name)
  File "/srv/microblog/releases/7/microblog.py", line 1, in <module>
    from app import create_app, db
  File "/srv/microblog/releases/7/app/__init__.py", line 12, in <module>
    from flask_babelx import Babel
ModuleNotFoundError: No module named 'flask_babelx'

Usage: flask [OPTIONS] COMMAND [ARGS]...
Try 'flask --help' for help.

Error: No such command 'db'.
"""


def test_the_cause_is_the_last_exception_at_the_apps_innermost_frame() -> None:
    cause = causes.cause_of(FLASK_CLI_IMPORT_ERROR.splitlines(), "/srv/microblog/releases/7")
    assert cause == "ModuleNotFoundError: No module named 'flask_babelx' (app/__init__.py:12)"


def test_gunicorn_and_setup_prefixes_are_read_through() -> None:
    lines = ["[2026-12-04 10:00:00 +0000] [55] [ERROR] Exception in worker process",
             "Traceback (most recent call last):", '  File "/srv/a/releases/2/app.py", line 4, in <module>',
             "    raise RuntimeError('x')", "RuntimeError: x",
             "[2026-12-04 10:00:00 +0000] [55] [INFO] Worker exiting (pid: 55)"]
    assert causes.cause_of(lines, "/srv/a/releases/2") == "RuntimeError: x (app.py:4)"
    assert causes.cause_of(["setup: " + line for line in lines[1:5]]) == "RuntimeError: x (/srv/a/releases/2/app.py:4)"


def test_a_real_setup_command_that_cannot_import_the_app_names_file_and_line(tmp_path: Path) -> None:
    """[setup] before the reload's pre-flight: the CLI's noise does not hide where the import failed."""
    (tmp_path / "app.py").write_text("import os\nimport nosuch_dependency\n")
    script = "import sys; sys.path.insert(0, '.'); import app"
    app = parse(cfg({"virtualenv": str(Path(sys.executable).parent.parent)},
                    setup={"commands": [f"{sys.executable} -c \"{script}\""]}))
    with pytest.raises(setup_commands.SetupFailed) as e:
        setup_commands.run(app, str(tmp_path), lambda _: None)
    assert "failed with exit status 1: ModuleNotFoundError: No module named 'nosuch_dependency' (app.py:2)" \
        in str(e.value), e.value


def test_the_setup_failure_keeps_the_oserror_and_its_path_when_the_tail_is_long(tmp_path: Path) -> None:
    (tmp_path / "compile.py").write_text(
        "import sys\nfor i in range(5):\n    print('compiling', i)\n"
        "open('app/translations/es/LC_MESSAGES/messages.mo', 'w')\n")
    app = parse(cfg({"virtualenv": str(Path(sys.executable).parent.parent)},
                    setup={"commands": [f"{sys.executable} compile.py"]}))
    with pytest.raises(setup_commands.SetupFailed) as e:
        setup_commands.run(app, str(tmp_path), lambda _: None)
    message = str(e.value)
    assert "FileNotFoundError: [Errno 2] No such file or directory: 'app/translations/es/LC_MESSAGES/messages.mo' " \
           "(compile.py:4)" in message, message


def test_a_read_only_write_gets_the_keys_that_fix_it() -> None:
    app = parse(cfg())
    advice = causes.advice("OSError: [Errno 30] Read-only file system: 'logs' (app/__init__.py:40)", app,
                           "/srv/myapp/releases/3")
    assert "writes /srv/myapp/releases/3/logs" in advice
    for key in ("state_directory", "read_write_paths", "LOG_TO_STDOUT", "logs_directory", "[build] commands"):
        assert key in advice, (key, advice)
    mo = causes.advice("OSError: [Errno 30] Read-only file system: 'app/x.mo'", app, "/r")
    assert "LOG_TO_STDOUT" not in mo and "[build] commands" in mo
    assert causes.advice("KeyError: 'x'", app) == ""


def test_summarize_prefers_reloaders_own_failure_line() -> None:
    app = parse(cfg())
    lines = ["reloader: myapp: setup: running flask db upgrade in /srv/myapp/releases/2", "setup: Traceback",
             "reloader: myapp: setup command 'flask db upgrade' failed with exit status 1: KeyError: 'x'"]
    assert causes.summarize(lines, app) == "myapp: setup command 'flask db upgrade' failed with exit status 1: " \
                                           "KeyError: 'x'"
    assert causes.summarize(["Main process exited", "just text"], app) == "Main process exited | just text"


def test_the_sandboxed_preflight_runs_with_the_units_identity_environment_and_sandbox() -> None:
    app = parse(cfg({"state_directory": "myapp", "environment": {"GREETING": "a b"},
                     "read_write_paths": ["/srv/data%1"]}))
    cmd = firststart.command(app, ["/srv/myapp/venv/bin/python3", "preflight.py"])
    assert cmd[:4] == ["systemd-run", "--quiet", "--wait", "--pipe"]
    for expected in ("--property=User=myapp", "--property=WorkingDirectory=/srv/myapp", "--setenv=GREETING=a b",
                     "--property=ProtectSystem=strict", "--property=StateDirectory=myapp",
                     "--property=ReadWritePaths=/srv/data%1", "--property=NoNewPrivileges=yes"):
        assert expected in cmd, expected
    assert not any("/var/lib/reloader" in word for word in cmd), "reloader's records are not the app's to write"
    assert not any("RemoveIPC" in word for word in cmd), "would remove the running service's IPC objects"
    assert cmd[cmd.index("--") + 1:] == ["/srv/myapp/venv/bin/python3", "preflight.py"]
