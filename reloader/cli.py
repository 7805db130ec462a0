"""The ``reloader`` command: thin argument parsing over the modules that do the work, and ``render`` / ``check``.

Exit codes: 0 ok, 1 the operation failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only what every command needs is imported here: `systemctl reload` starts this CLI as its ExecReload=
# helper, and the new version's first answer waits for its start-up.
from . import __version__
from .config import AppConfig, ConfigError, load
from .errors import Failed, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --- render / check ------------------------------------------------------------------------------------
def cmd_render(args: argparse.Namespace) -> int:
    from .render import render, write_tree

    app = load(args.config)
    files = render(app, notify_reload=args.notify_reload)
    if args.output is None:
        for f in files:
            print(f"# ---- {f.name} -> {f.install_path}")
            print(f.content, end="")
        return EXIT_OK
    for path in write_tree(files, Path(args.output)):
        print(path)
    return EXIT_OK


def parser_render(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="render the units, gunicorn config and nginx site of CONFIG")
    p.add_argument("config", metavar="CONFIG", help="the app's TOML config")
    p.add_argument("-o", "--output", metavar="DIR", help="write the files under DIR (all or nothing); "
                   "without it, print them")
    p.add_argument("--notify-reload", action="store_true",
                   help="render Type=notify-reload (systemd >= 253) instead of Type=notify")
    p.set_defaults(func=cmd_render)


def cmd_check(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from . import nginx
    from .render import render, write_tree
    from .run import run

    app = load(args.config)
    files = render(app)
    problems = []
    with tempfile.TemporaryDirectory(prefix="reloader-check-") as tmp:
        write_tree(files, Path(tmp))
        units = [str(Path(tmp) / f.name) for f in files if f.name.endswith((".service", ".socket"))]
        if shutil.which("systemd-analyze"):
            # verify resolves ExecStart= binaries: missing ones are real problems on the target host only.
            r = run(["systemd-analyze", "verify", "--man=no", *units], check=False)
            unbuilt = False
            for line in (r.stdout + r.stderr).splitlines():
                # Before the first --from, the virtualenv its build creates cannot hold gunicorn yet.
                if _venv_built_by_from(app) and f"{app.virtualenv}/" in line:
                    unbuilt = True
                elif line.strip():
                    problems.append(f"systemd-analyze: {line.strip()}")
            if r.returncode != 0 and not problems and not unbuilt:
                problems.append(f"systemd-analyze verify failed with status {r.returncode}")
        else:
            print("check: systemd-analyze not found; unit files not verified", file=sys.stderr)
        site = next(f for f in files if f.name.endswith(".nginx.conf"))
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            site_path = Path(tmp) / site.name
            if app.multi_instance:
                # Test against the rendered upstream include, not whatever is (or isn't) installed.
                site_path.write_text(site.content.replace(app.upstream_path,
                                                          str(Path(tmp) / f"{app.name}.upstream.conf")))
            problems.extend(f"nginx -t: {line}" for line in nginx.test_site(site_path))
        else:
            print("check: nginx not found; nginx site not tested", file=sys.stderr)
    problems.extend(_check_virtualenv(app))
    sandboxed = "" if problems else _check_in_sandbox(app, problems)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        raise Failed(f"{args.config}: {len(problems)} problem(s) in the rendered files")
    print(f"{args.config}: ok ({len(files)} files render and verify{sandboxed})")
    return EXIT_OK


def parser_check(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="validate CONFIG, systemd-analyze verify the units, nginx -t the site")
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(func=cmd_check)


def _check_in_sandbox(app: AppConfig, problems: list[str]) -> str:
    """The first start's pre-flight in the unit's sandbox (reloader.firststart), when this host can run
    it; returns what was checked, for the ok line (or says on stderr why it was not)."""
    from . import firststart

    why_not = firststart.unavailable(app)
    if why_not:
        print(f"check: the app was not pre-flighted in its sandbox: {why_not}", file=sys.stderr)
        return ""
    import_only = bool(app.setup.commands)  # the health path may need the setup commands' migrations
    try:
        status = firststart.preflight(app, import_only=import_only)
    except Failed as e:
        problems.append(str(e))
        return ""
    return (f"; {app.wsgi} imports in {app.service}'s sandbox as {app.user}" if import_only else
            f"; in {app.service}'s sandbox as {app.user}, {app.health_path} answers {status}")


def _venv_built_by_from(app: AppConfig) -> bool:
    """The virtualenv does not exist yet, and the first ``--from`` build creates it ([build] requirements)."""
    return (bool(app.build.requirements) and app.virtualenv.startswith(app.working_directory.rstrip("/") + "/")
            and not Path(app.python).exists())


def _check_virtualenv(app: AppConfig) -> list[str]:
    """Import the worker class (and check the gunicorn settings) with the app's own interpreter."""
    import json

    from .config import OWNED_SETTINGS
    from .run import run

    if _venv_built_by_from(app):
        print(f"check: {app.virtualenv} does not exist yet ([build] requirements creates it in each release "
              "built with --from); the worker class and the app were not checked", file=sys.stderr)
        return []
    if not Path(app.python).exists():
        key = "[app] virtualenv" if app.virtualenv else "[app] gunicorn"
        return [f"{key}: {app.python} does not exist on this host; create the virtualenv (with gunicorn) first"]
    spec = {"worker_class": app.worker_class, "settings": [name for name, _ in app.gunicorn_settings],
            "config_file": app.gunicorn_config_file, "owned": OWNED_SETTINGS}
    script = Path(__file__).with_name("venv_check.py")
    try:
        r = run([app.python, str(script), json.dumps(spec)], check=False, timeout=120, cwd="/",
                what="the virtualenv check")
    except Failed as e:
        return [str(e)]
    found = [line for line in r.stdout.splitlines() if line.strip()]
    if r.returncode != 0 and not found:
        found = [f"{app.python} failed checking the worker class: {(r.stderr.strip().splitlines() or ['?'])[-1]}"]
    return found


# --- parser ----------------------------------------------------------------------------------------------
# Which module declares each command (its handler and, beside it, its command line), in `--help` order. A
# command imports only its own module: the hooks systemd runs on every reload (reloader.systemd_hooks) never
# load the operator's commands (the load generator behind `verify`, the builder, the installer).
COMMANDS: tuple[tuple[str, str, str], ...] = (
    # name, module, the module's function adding its parser
    ("render", "cli", "parser_render"),
    ("check", "cli", "parser_check"),
    ("install", "commands", "parser_install"),
    ("init", "commands", "parser_init"),
    ("setup", "systemd_hooks", "parser_setup"),
    ("deploy", "commands", "parser_deploy"),
    ("reload", "commands", "parser_deploy"),
    ("releases", "commands", "parser_releases"),
    ("status", "commands", "parser_status"),
    ("uninstall", "commands", "parser_uninstall"),
    ("exec-reload", "systemd_hooks", "parser_exec_reload"),
    ("exec-started", "systemd_hooks", "parser_exec_started"),
    ("rollback", "commands", "parser_rollback"),
    ("instances-start", "systemd_hooks", "parser_instances"),
    ("instances-stop", "systemd_hooks", "parser_instances"),
    ("nginx-reload", "systemd_hooks", "parser_nginx_reload"),
    ("verify", "verify", "parser_verify"),
    ("recycle", "toolkit", "parser_recycle"),
    ("maintenance", "toolkit", "parser_maintenance"),
    ("pause", "toolkit", "parser_pause"),
    ("resume", "toolkit", "parser_resume"),
)


def command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names, when nothing before it but ``-v`` could need the whole parser (``--help``,
    ``--version``, a typo): then only that command's module is imported."""
    for arg in argv:
        if arg in ("-v", "--verbose"):
            continue
        return arg if any(arg == name for name, _, _ in COMMANDS) else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (``command``) the global options and that one command only."""
    parser = argparse.ArgumentParser(
        prog="reloader",
        description="Zero-downtime, verified `systemctl reload` for Gunicorn apps behind nginx under systemd.",
    )
    parser.add_argument("--version", action="version", version=f"reloader {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command reloader runs (stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, function in COMMANDS:
        if command is None or name == command:
            # __import__, not importlib.import_module: the import statement's own path, which
            # `python3 -X importtime` reports (it does not see importlib's).
            declaring = __import__(f"{__package__}.{module}", fromlist=[function])
            getattr(declaring, function)(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="reloader: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, UsageError) as e:
        print(f"reloader: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Failed as e:
        print(f"reloader: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"reloader: {e.filename or ''}: {e.strerror or e}".lstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("reloader: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
