"""The operator toolkit's commands, beyond the deploy: ``reloader recycle``, ``maintenance``, ``pause`` and
``resume`` (each with its command line beside it), and what ``reloader status`` shows of them.

Thin, like reloader.commands: each calls the module that does the work (reloader.recycle,
reloader.maintenance, reloader.pause) and reports in one line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import asdict

from . import registry
from .config import AppConfig, ConfigError
from .errors import Failed


def _master(app: AppConfig) -> int:
    """The app's running gunicorn master (systemd's MainPID); Failed when the service is not running."""
    from .bus import Systemd

    with Systemd() as sd:
        st = sd.state(app.service)
    # Reloading: a recycle then waits for the reload's lock and acts on the master it hands over to.
    if not (st.running or st.active_state == "reloading") or not st.main_pid:
        raise Failed(f"{app.service} is {st.active_state}/{st.sub_state}, not running: nothing to act on")
    return st.main_pid


def _single_master(app: AppConfig, command: str) -> None:
    if app.multi_instance:
        raise ConfigError(f"{command}: not supported with strategy {app.strategy.value!r} yet (it works on the "
                          "single master of strategies \"generation\" and \"hup\")")


# --- recycle --------------------------------------------------------------------------------------------
def cmd_recycle(args: argparse.Namespace) -> int:
    """Replace the workers of NAME surge first (reloader.recycle)."""
    from . import recycle
    from .engine import Refused

    app = registry.app_for(args.name)
    _single_master(app, "recycle")
    if args.surge is not None and not 1 <= args.surge <= 512:
        raise ConfigError(f"recycle: --surge {args.surge} is out of range; allowed 1..512")
    if args.over_memory and not app.max_worker_memory:
        raise ConfigError(f"recycle --over-memory: {app.config_path} sets no [gunicorn] max_worker_memory")
    if args.over_memory:
        from .bus import Systemd

        with Systemd() as sd:
            st = sd.state(app.service)
        if not (st.running or st.active_state == "reloading"):  # the timer of a stopped app: nothing to check
            print(f"{app.name}: {app.service} is not running; nothing to recycle")
            return 0
    else:
        _master(app)  # running, or a clear error before waiting for the lock
    try:
        outcome = recycle.recycle(app, lambda: _master(app), surge=args.surge or 0, memory=args.over_memory)
    except Refused as e:
        raise Failed(f"{app.name}: recycle not started: {e}") from None
    if args.json:
        print(json.dumps(asdict(outcome)))
    elif outcome.result != "ok":
        pass
    elif args.over_memory and not outcome.over_memory:
        print(f"{app.name}: no worker above max_worker_memory ({app.max_worker_memory})")
    else:
        print(f"{app.name}: recycled {len(outcome.replaced)} worker(s) of master {outcome.master} in "
              f"{outcome.seconds:.1f} s, "
              f"never fewer than {outcome.workers} ready")
    if outcome.result != "ok":
        raise Failed(f"{app.name}: recycle failed: {outcome.error}")
    return 0


def parser_recycle(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="replace every worker of NAME, the replacement ready before the old one "
                       "retires (never fewer than `workers` ready)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--surge", type=int, default=None, metavar="S",
                   help="workers replaced at a time (default: [reload] recycle_surge, 1)")
    p.add_argument("--over-memory", action="store_true",
                   help="only the workers above [gunicorn] max_worker_memory (and every older one: TTOU "
                   "retires the oldest); what NAME-recycle.timer runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recycle)




# --- maintenance ----------------------------------------------------------------------------------------
def cmd_maintenance(args: argparse.Namespace) -> int:
    """Switch NAME's maintenance mode on or off in its nginx site, without an nginx reload (reloader.maintenance)."""
    from . import maintenance
    from .render import NGINX_SITE_DIR

    app = registry.app_for(args.name)
    if args.action == "off" and (args.message is not None or args.page is not None or args.retry_after is not None):
        raise ConfigError("maintenance off: --message, --page and --retry-after only go with `on`")
    if args.action == "on":
        page, source = maintenance.page_for(args.message, args.page)
        retry_after = maintenance.check_retry_after(
            maintenance.DEFAULT_RETRY_AFTER if args.retry_after is None else args.retry_after)
    site = f"{NGINX_SITE_DIR}/{app.name}.conf"
    if not maintenance.site_supports(app, site):
        raise Failed(f"{app.name}: the installed nginx site {site} has no maintenance mode (installed by an older "
                     f"reloader?); run `reloader install {app.config_path}` first")
    with registry.operator_lock(app, f"maintenance {args.action}", 30):
        if args.action == "on":
            maintenance.turn_on(app, page, source, retry_after, args.message)
        elif not maintenance.turn_off(app):
            print(f"{app.name}: maintenance was not on")
            return 0
    status, retry = maintenance.probe(app)
    if args.action == "on":
        if status != 503 or retry != str(retry_after):
            raise Failed(f"{app.name}: maintenance switched on, but {app.health_path} through nginx answered "
                         f"{status or retry} (Retry-After {retry or 'missing'}); is nginx running this site?")
        print(f"{app.name}: maintenance on: nginx answers 503 with Retry-After {retry_after} and the page from "
              f"{source}; the app keeps running (`reloader maintenance {app.name} off` ends it)")
    else:
        print(f"{app.name}: maintenance off: {app.health_path} through nginx answers {status or retry}")
    return 0


def parser_maintenance(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="NAME's nginx site answers 503 with Retry-After and a page (on) or "
                       "proxies to the app again (off), without an nginx reload; the app keeps running")
    p.add_argument("name", metavar="NAME")
    p.add_argument("action", choices=("on", "off"))
    p.add_argument("--message", metavar="TEXT", help="the page's message (HTML-escaped)")
    p.add_argument("--page", metavar="FILE", help="a complete HTML page to serve instead (UTF-8, at most 1 MB)")
    p.add_argument("--retry-after", type=int, metavar="S", help="the Retry-After header, in seconds (default "
                   "300)")
    p.set_defaults(func=cmd_maintenance)




# --- pause / resume -------------------------------------------------------------------------------------
def cmd_pause(args: argparse.Namespace) -> int:
    """Hold NAME's new requests until `reloader resume` or --max seconds (reloader.pause)."""
    from . import pause

    app = registry.app_for(args.name)
    seconds = pause.check(app, args.max)
    pause.ready_for(app, _master(app))
    flag = pause.pause(app, seconds)
    print(f"{app.name}: paused: new requests wait (in-flight ones finish) until `reloader resume {app.name}`; "
          f"after {flag['max']} s they are answered 503 with Retry-After {flag['retry_after']}")
    return 0


def parser_pause(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="NAME's new requests wait (in-flight ones finish) until `reloader resume`; "
                       "past --max seconds they are answered 503 with Retry-After")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--max", type=int, metavar="S", help="the pause's maximum (default 30 s, at most nginx's "
                   "proxy_read_timeout - 5)")
    p.set_defaults(func=cmd_pause)




def cmd_resume(args: argparse.Namespace) -> int:
    from . import pause

    app = registry.app_for(args.name)
    was = pause.resume(app)
    if not was["paused"]:
        print(f"{app.name}: was not paused")
    else:
        took = time.time() - (was.get("since") or time.time())
        print(f"{app.name}: resumed after {took:.1f} s; held requests go on now"
              + (" (it was past its maximum: requests got 503 since)" if was["past_max"] else ""))
    return 0


def parser_resume(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="end NAME's pause: the held requests are served")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_resume)




# --- status ---------------------------------------------------------------------------------------------
def status(app: AppConfig, main_pid: int) -> dict:
    """The toolkit's part of ``reloader status --json`` for one app."""
    from . import after_switch, drain, maintenance, pause, recycle

    out: dict = {"maintenance": maintenance.state(app)}
    if app.pausable:
        out["pause"] = pause.state(app)
    if not app.multi_instance:
        out["recycle"] = recycle.status(app, main_pid)
        # [reload] drain_timeout: the retiring generation still holding connections, if any.
        out["drain"] = drain.state(app) if app.drain_timeout else None
        out["after_switch"] = {"commands": [shlex.join(c) for c in app.setup.after_switch],
                               "last": after_switch.last(app)} if app.setup.after_switch else None
    return out


def status_lines(row: dict) -> list[str]:
    """The toolkit's lines of the human ``reloader status``."""
    out = []
    m = row.get("maintenance") or {}
    if m.get("on"):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["since"])) if m.get("since") else "?"
        out.append(f"  MAINTENANCE ON since {since}: nginx answers 503, Retry-After {m.get('retry_after')}")
    paused = row.get("pause") or {}
    if paused.get("paused"):
        until = time.strftime("%H:%M:%S", time.localtime(paused["until"]))
        out.append("  PAUSED: " + ("past its maximum, answering 503" if paused["past_max"] else
                                   f"new requests wait (at most until {until})"))
    draining = row.get("drain")
    if draining:
        until = time.strftime("%H:%M:%S", time.localtime(draining["deadline"] or 0))
        out.append(f"  DRAINING: old master {draining['old_master']}, {draining['connections']} connection(s) open, "
                   f"{draining['memory_bytes'] / 2**20:.0f} MB; TERM at {until} at the latest")
    contract = (row.get("after_switch") or {}).get("last")
    if contract and contract["result"] != "ok":
        out.append(f"  after_switch FAILED for release {contract['release']} (it serves; not rolled back): "
                   f"{contract['error']}")
    rec = row.get("recycle") or {}
    last = rec.get("last")
    if rec.get("max_worker_memory") or last:
        limit = f"max_worker_memory {rec['max_worker_memory']}" if rec.get("max_worker_memory") else "no memory limit"
        sizes = ", ".join(f"{mb:.0f}" for mb in rec.get("worker_rss_mb", {}).values())
        text = f"  recycle: {limit}; worker RSS (MB): {sizes or '-'}"
        if last:
            text += (f"; last recycle ({last['trigger']}): {last['result']}, {len(last['replaced'])} replaced"
                     + (f": {last['error']}" if last.get("error") else ""))
        out.append(text)
    return out
