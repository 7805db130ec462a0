"""The commands systemd runs as the units' hooks: ``exec-reload`` (the service's and the controller's
``ExecReload=``), ``exec-started`` (``ExecStartPost=``), ``instances-start``/``-stop`` (the controller's
``ExecStart=``/``ExecStop=``), ``nginx-reload`` (nginx.service's ``ExecReload=``, via a drop-in) and ``setup``
(NAME-setup.service's ``ExecStart=``), each with its command line beside it.

Apart from the operator's commands (reloader.commands, reloader.verify, reloader.toolkit) on purpose: a hook
runs on every reload, and `reloader exec-reload` imports this module only (reloader.cli), so it never loads
the operator's code (the load generator, the release builder, the installer) on its way.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import load
from .errors import Failed


def cmd_exec_reload(args: argparse.Namespace) -> int:
    """``ExecReload=`` of an app's service: swap generations (see reloader.swap)."""
    from .engine import Notifier
    from .swap import Swap

    app = load(args.config)
    if app.multi_instance:
        from . import fleet

        return fleet.run(app, "deploy")
    notifier = Notifier(app.name)
    bus = None

    def main_pid_from_bus() -> int:
        nonlocal bus
        from .bus import Systemd

        if bus is None:
            bus = Systemd(timeout=30)
        return bus.main_pid(app.service)

    try:
        main_pid = int(os.environ.get("MAINPID") or 0) or main_pid_from_bus()
    except ValueError:
        main_pid = main_pid_from_bus()
    try:
        return Swap(app, main_pid, notifier, main_pid_from_bus).run(notify_reload=args.notify_reload)
    finally:
        if bus is not None:
            bus.close()


def parser_exec_reload(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="(systemd hook) the app service's ExecReload=")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--notify-reload", action="store_true", help="the unit is Type=notify-reload")
    p.set_defaults(func=cmd_exec_reload)


def cmd_exec_started(args: argparse.Namespace) -> int:
    """``ExecStartPost=`` of an app's service: record the first live release, report what serves."""
    from .engine import Notifier
    from .swap import report_start

    app = load(args.config)
    try:
        main_pid = int(os.environ.get("MAINPID") or 0)
    except ValueError:
        main_pid = 0
    if not main_pid:
        raise Failed("exec-started runs as the service's ExecStartPost= (no $MAINPID)")
    return report_start(app, main_pid, Notifier(app.name))


def parser_exec_started(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="(systemd hook) the app service's ExecStartPost=")
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(func=cmd_exec_started)


def cmd_instances(args: argparse.Namespace) -> int:
    """``ExecStart=``/``ExecStop=`` of a blue-green/rolling controller unit: bring the instances up or down."""
    from . import fleet

    return fleet.run(load(args.config), args.action)


def parser_instances(sub: argparse._SubParsersAction, name: str) -> None:
    hook = {"instances-start": "ExecStart=", "instances-stop": "ExecStop="}[name]
    p = sub.add_parser(name, help=f"(systemd hook) blue-green/rolling controller's {hook}")
    p.add_argument("config", metavar="CONFIG")
    p.set_defaults(func=cmd_instances, action=name.removeprefix("instances-"))


def cmd_nginx_reload(_args: argparse.Namespace) -> int:
    """``ExecReload=`` of nginx.service (reloader's drop-in): ``nginx -t``, HUP, wait for the worker turnover."""
    from . import nginx

    return nginx.exec_reload()


def parser_nginx_reload(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="(systemd hook) nginx.service's ExecReload=: test, reload, verify")
    p.set_defaults(func=cmd_nginx_reload)


def cmd_setup(args: argparse.Namespace) -> int:
    """``ExecStart=`` of NAME-setup.service (and usable by hand): run the [setup] commands in a release."""
    from . import setup_commands

    app = load(args.config)
    release = args.release or os.path.realpath(app.working_directory)
    try:
        if not os.environ.get("INVOCATION_ID"):  # by hand: as the service runs them (setup_commands.by_hand)
            return setup_commands.by_hand(app, args.config, release, after_switch=args.after_switch)
        setup_commands.run(app, release, lambda text: print(f"reloader: {app.name}: {text}", file=sys.stderr,
                                                            flush=True), after_switch=args.after_switch)
    except setup_commands.SetupFailed as e:
        raise Failed(f"{app.name}: {e}") from None
    return 0


def parser_setup(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="run the [setup] commands of CONFIG in a release (NAME-setup.service's "
                       "ExecStart=; the service's ExecReload= runs them on every deploy)")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--release", metavar="DIR", help="the release directory (default: working_directory resolved)")
    p.add_argument("--after-switch", action="store_true", help="run the [setup] after_switch commands instead "
                   "(e.g. again by hand after one failed; a deploy runs them once the old generation retired)")
    p.set_defaults(func=cmd_setup)
