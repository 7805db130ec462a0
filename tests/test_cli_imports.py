"""The hooks systemd runs import nothing they do not run.

`systemctl reload APP` starts `reloader exec-reload` (and the other hooks the units name) as a fresh process
on every reload, and the new version's first answer waits for its start-up. So the CLI imports the module
declaring the asked command only (reloader.cli.COMMANDS): a hook never loads the operator's commands, the load
generator behind `reloader verify`, the builder, the installer or the Jinja renderer. Checked the way the issue
asks for it, with `python3 -X importtime -m reloader COMMAND --help` in a subprocess, and for the modules each
hook's handler imports when it runs. Host-only: no container.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from reloader import cli

ROOT = Path(__file__).resolve().parent.parent

# What no hook runs: the operator's commands and what only they use.
OPERATOR_ONLY = ("reloader.loadgen", "reloader.verify", "reloader.commands", "reloader.install", "reloader.build",
                 "reloader.init", "reloader.hooks", "reloader.firststart", "reloader.venv_check")
# Not needed to parse a hook's command line either (the handler imports what it runs when it runs).
NOT_AT_PARSE = (*OPERATOR_ONLY, "reloader.render", "jinja2", "reloader.probe", "http.client", "reloader.swap",
                "reloader.fleet", "reloader.traffic", "reloader.bus", "pystemd")


def hook_commands() -> set[str]:
    """The reloader commands the rendered units run (ExecStart=, ExecReload=, …, the nginx drop-in)."""
    found: set[str] = set()
    for template in (ROOT / "templates").glob("*.j2"):
        text = template.read_text()
        found.update(re.findall(r"\{\{ (?:app\.)?helper \| sd \}\} ([a-z-]+)", text))
        found.update(re.findall(r'exec "\$\$1" ([a-z-]+)', text))
    return found


HOOKS = sorted(hook_commands())


def imported(argv: list[str]) -> set[str]:
    """The modules `python3 -X importtime ARGV` reports importing (its stderr), for a run that must succeed."""
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return {m.group(1).strip() for m in re.finditer(r"^import time:\s*\d+ \|\s*\d+ \|(.*)$", r.stderr, re.M)}


def test_the_units_run_these_hooks():
    """The hooks found in templates/ are the ones this file checks: a new hook is checked too, and a change
    to the templates that this parser no longer follows fails here instead of checking nothing."""
    assert {"exec-reload", "exec-started", "instances-start", "instances-stop", "setup", "nginx-reload",
            "recycle"} <= set(HOOKS), HOOKS
    assert set(HOOKS) <= {name for name, _, _ in cli.COMMANDS}


@pytest.mark.parametrize("command", HOOKS)
def test_a_hooks_command_line_loads_no_operator_code(command: str):
    modules = imported(["-m", "reloader", command, "--help"])
    declaring = next(module for name, module, _ in cli.COMMANDS if name == command)
    assert f"reloader.{declaring}" in modules, sorted(modules)  # importtime sees the lazy import
    assert not modules & set(NOT_AT_PARSE), sorted(modules & set(NOT_AT_PARSE))


def test_the_full_help_still_lists_every_command():
    """`reloader --help` (not a hook) builds every command's parser: the import check above is not blind."""
    modules = imported(["-m", "reloader", "--help"])
    assert "reloader.verify" in modules and "reloader.commands" in modules, sorted(modules)
    assert "reloader.loadgen" not in modules, "the load generator is imported by a verify run only"


# The modules each hook's handler imports when it runs (beside reloader.cli and the declaring module).
RUN_PATHS = {
    "exec-reload": ["reloader.engine", "reloader.swap"],  # generation/hup; blue-green/rolling: instances-*
    "exec-started": ["reloader.engine", "reloader.swap"],
    "instances-start": ["reloader.fleet"],
    "instances-stop": ["reloader.fleet"],
    "setup": ["reloader.setup_commands"],
    "nginx-reload": ["reloader.nginx"],
    "recycle": ["reloader.recycle", "reloader.engine"],
}


@pytest.mark.parametrize("command", HOOKS)
def test_what_a_hook_runs_imports_no_operator_code(command: str):
    """pystemd is not on the host: reloader.bus, which every handler imports lazily, is left out here."""
    declaring = next(module for name, module, _ in cli.COMMANDS if name == command)
    code = "; ".join(f"import {m}" for m in ["reloader.cli", f"reloader.{declaring}", *RUN_PATHS[command]])
    modules = imported(["-c", code])
    assert set(RUN_PATHS[command]) <= modules
    assert not modules & set(OPERATOR_ONLY), sorted(modules & set(OPERATOR_ONLY))


@pytest.mark.parametrize("command", [name for name, _, _ in cli.COMMANDS])
def test_one_commands_parser_is_the_same_as_in_the_whole_command_line(command: str):
    """The lean parser `reloader COMMAND` builds takes exactly the options the whole command line has."""
    def sub_help(parser) -> str:
        (action,) = [a for a in parser._actions if a.dest == "command"]
        return action.choices[command].format_help()

    assert sub_help(cli.build_parser(command)) == sub_help(cli.build_parser())


def test_only_a_bare_command_takes_the_lean_parser():
    assert cli.command_in(["exec-reload", "x.toml"]) == "exec-reload"
    assert cli.command_in(["-v", "setup", "x.toml"]) == "setup"
    for argv in (["--help", "exec-reload"], ["--version"], ["exec-relaod", "x.toml"], []):
        assert cli.command_in(argv) is None, argv
