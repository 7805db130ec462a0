"""The operator's commands behind ``reloader COMMAND``, each with its command line beside it
(``parser_<command>``; reloader.cli lists which module declares which command). Each is thin: it calls the
module that does the work (reloader.install, reloader.build, reloader.swap / reloader.fleet, reloader.releases)
and reports. The hooks systemd runs are apart, in reloader.systemd_hooks; ``verify`` is in reloader.verify,
the toolkit (recycle, maintenance, pause, resume) in reloader.toolkit.

All systemd interaction goes through :mod:`reloader.bus` (D-Bus); nothing here runs ``systemctl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import registry
from .config import AppConfig, ConfigError, load
from .errors import Failed

FROM_HELP = ("build a new release RELEASES_ROOT/N from SRC (a directory, a tarball, a git ref of the current "
             "directory's repository or REPO_DIR@REF) with the [build] steps, then deploy it; a failed build "
             "leaves nothing behind")


# --- rollback, install, init, uninstall -----------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    """A verified deploy of the previous (or the named) proven release, through the strategy's own deploy
    (blue-green: onto the idle colour; rolling: across the instances). Blue-green without RELEASE instead
    switches back to the previous colour (during a deploy's bake, or after it)."""
    from . import fleet, proc, releases
    from .bus import Systemd, client_wait
    from .engine import Notifier, Refused, try_lock

    app = registry.app_for(args.name)
    if args.release or not app.strategy.instant_rollback:
        try:
            target = releases.rollback_target(app, args.release or "")
        except releases.BadRelease as e:
            raise ConfigError(f"rollback: {e}") from None
        print(f"{app.name}: rolling back to {target}")
        return _deploy(app, argparse.Namespace(timeout=0, json=False), target, action="rollback")
    lock = Path(app.deploy_lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f, Systemd() as sd:
        if not try_lock(f):
            # A deploy is running: ask it to switch back (it does before its switch or during its bake),
            # and wait for the reload job to end.
            request = Path(app.rollback_request)
            request.write_text("1\n")
            print(f"{app.name}: a deploy is running; asked it to switch back")
            proc.wait_for(lambda: sd.state(app.service).active_state != "reloading",
                          client_wait(app.reload_budget), interval=0.2)
            request.unlink(missing_ok=True)  # taken, or too late: never left for a later deploy
            st = sd.state(app.service)
            if "rolled back on operator request" not in st.status_text:
                raise Failed(f"{app.name}: rollback not applied: the deploy was past its bake (or was not a "
                             f"deploy); it reports: {st.status_text}; run `reloader rollback {app.name}` again")
            print(f"{app.name}: {st.status_text}")
            return 0
        try:
            summary = fleet.Fleet(app, sd, Notifier(app.name)).rollback()
        except Refused as e:
            raise Failed(f"{app.name}: rollback refused: {e}") from None
    print(f"{app.name}: rolled back; {summary}")
    return 0


def parser_rollback(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="verified reload onto the previous (or the named) proven release; "
                       "blue-green: switch NAME back to the previous colour")
    p.add_argument("name", metavar="NAME")
    p.add_argument("release", metavar="RELEASE", nargs="?", help="a release that was live before (blue-green "
                   "without RELEASE switches back to the previous colour)")
    p.set_defaults(func=cmd_rollback)




def cmd_install(args: argparse.Namespace) -> int:
    """Render CONFIG, install its files and units, start or reload it, check it through nginx (reloader.install)."""
    from . import install

    if getattr(args, "from_source", None):
        return _install_from(args)
    return install.install(args.config, dry_run=args.dry_run, allow_restart=args.restart,
                           notify_reload=args.notify_reload)


def parser_install(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="render CONFIG, install its units and nginx site, start or reload it")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    p.add_argument("--notify-reload", action="store_true",
                   help="render Type=notify-reload (systemd >= 253). The default Type=notify is more robust: "
                   "a reload helper killed mid-reload ends the reload at once, while under notify-reload "
                   "(systemd 257) the unit stays reloading until `systemctl restart`; see docs/how-a-reload-works.md")
    p.add_argument("--restart", action="store_true",
                   help="restart the running service when a change needs it (writable paths, user): a reload "
                   "cannot apply those; with socket_activation the socket holds connections meanwhile")
    p.add_argument("--from", dest="from_source", metavar="SRC", help=FROM_HELP)
    p.set_defaults(func=cmd_install)


def _install_from(args: argparse.Namespace) -> int:
    """``install CONFIG --from SRC``: build the next release (reloader.build), point current at it, install.
    If the install fails, current points where it did before (nothing of the new release goes live)."""
    from . import build, install

    app = load(args.config)
    if args.dry_run:
        raise ConfigError("--from with --dry-run: a dry run builds nothing; drop one of them")
    if os.geteuid() == 0:
        install._ensure_user(app)
    target = build.make_release(app, args.from_source)
    before = build.point_current(app, target)
    print(f"{app.name}: current -> {target}")
    try:
        return install.install(args.config, allow_restart=args.restart, notify_reload=args.notify_reload)
    except BaseException:
        if before is not None:
            from . import releases

            releases.point_current(app, before)
            print(f"{app.name}: current put back to {before}", file=sys.stderr)
        raise


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented TOML for an existing app's checkout (reloader.init); never overwrites."""
    from . import init

    path = init.init(args.directory, args.output or "", args.name or "")
    print(f"wrote {path}: review it, then `reloader check {path}` and `reloader install {path} --from "
          f"{args.directory}`")
    return 0


def parser_init(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="detect a Flask/Django/FastAPI app in DIR (default .) and write a commented "
                       "TOML for it (release layout, state_directory, build and setup steps); never overwrites")
    p.add_argument("directory", metavar="DIR", nargs="?", default=".")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write (default: NAME.toml here)")
    p.add_argument("--name", help="the app's name (default: DIR's name)")
    p.set_defaults(func=cmd_init)


def cmd_uninstall(args: argparse.Namespace) -> int:
    from . import install

    return install.uninstall(args.name)


def parser_uninstall(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="stop and disable NAME and remove exactly the files install wrote")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_uninstall)


# --- deploy / status ------------------------------------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    """Reload NAME; with --release DIR, point current at DIR first and put it back if DIR is refused."""
    from . import releases

    app = registry.app_for(args.name)
    if getattr(args, "from_source", None):
        from . import build

        if args.release:
            raise ConfigError("--from and --release: deploy either a new release built from a source or an "
                              "existing release directory")
        return _deploy(app, args, build.make_release(app, args.from_source))
    if not getattr(args, "release", None):
        return _deploy(app, args)
    try:
        target = releases.check_release(app, args.release)
    except releases.BadRelease as e:
        raise ConfigError(f"--release {e}") from None
    return _deploy(app, args, target)


def parser_deploy(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="reload NAME over D-Bus and report whether the new release is serving")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, default=0, help="seconds to wait for the reload job (default: "
                   "the app's TimeoutStartSec= + 30, so the command reports systemd's verdict)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--release", metavar="DIR", help="point current at DIR (a directory in the releases root) "
                   "and deploy it; current is put back if DIR is refused")
    p.add_argument("--from", dest="from_source", metavar="SRC", help=FROM_HELP)
    p.set_defaults(func=cmd_deploy)


def _deploy(app: AppConfig, args: argparse.Namespace, target: str = "", action: str = "deploy") -> int:
    """The reload job over D-Bus; with *target*, current points at it for the reload and is put back
    where it was if the reload refuses it (the operator's pointer never names a refused release).
    After a successful deploy of a release, keep_releases prunes the oldest release directories.
    Under the app's operator lock: not while an install rewrites its units, nor next to another deploy.
    The outcome is recorded with its performer, logged, measured and handed to the [hooks] (reloader.hooks)."""
    from . import after_switch, hooks, releases
    from .bus import Systemd, client_wait

    tty = sys.stderr.isatty()
    wait = client_wait(app.reload_budget)
    with registry.operator_lock(app, "deploy", wait), Systemd() as sd:
        before = sd.state(app.service)
        if before.load_state == "masked":
            raise Failed(f"{app.service} is masked; `systemctl unmask {app.service}` first")
        if before.load_state != "loaded":
            raise Failed(f"{app.service} is not loaded ({before.load_state}); run `reloader install`")
        if before.active_state != "active":
            raise Failed(f"{app.service} is {before.active_state}, not running: start it instead of deploying")
        if os.path.exists(app.pause_flag):  # reloader.pause: the bake's health checks would be held too
            raise Failed(f"{app.name} is paused; `reloader resume {app.name}` first, then deploy")
        records_before = releases.read(app)
        pointed_before = ""
        if target:
            try:
                pointed_before = releases.point_current(app, target)
            except releases.BadRelease as e:
                raise ConfigError(f"--release: {e}") from None
        last = [0.0]

        def progress(elapsed: float) -> None:
            if tty:
                status = sd.state(app.service).status_text
                print(f"\r\033[K{app.name}: {elapsed:5.1f} s  {status[:100]}", end="", file=sys.stderr, flush=True)
            elif elapsed - last[0] >= 5:
                last[0] = elapsed
                print(f"{app.name}: still reloading after {elapsed:.0f} s", file=sys.stderr, flush=True)

        started, started_wall = time.monotonic(), time.time()
        result = sd.reload_unit(app.service, timeout=args.timeout or wait, progress=progress)
        took = time.monotonic() - started
        if tty:
            print("\r\033[K", end="", file=sys.stderr)
        after = sd.state(app.service)
        ok = result == "done" and after.running and after.reload_result in ("success", "")
        notes = []
        if target and not ok:
            releases.point_current(app, pointed_before)
            notes.append(f"current put back to {pointed_before}")
        if target and ok and not app.multi_instance:
            notes += [f"pruned {path}" for path in releases.prune(app, app.keep_releases)]
        # [setup] after_switch failed after a successful switch: the release serves; exit 3 (reloader.after_switch).
        contract = after_switch.last(app) if ok and app.setup.after_switch else None
        contract_failed = bool(contract and contract["result"] == "failed" and contract["started"] >= started_wall)
        if contract_failed:
            notes.append(f"after_switch failed (the new release keeps serving, not rolled back): {contract['error']}")
        notes += hooks.after(app, hooks.outcome(app, action, ok, after.status_text, took, records_before, target))
    report = {
        "unit": app.service, "result": "success" if ok else "failed", "job": result,
        "reload_result": after.reload_result, "active_state": after.active_state, "sub_state": after.sub_state,
        "old_main_pid": before.main_pid, "new_main_pid": after.main_pid, "seconds": round(took, 2),
        "status": after.status_text, "current": releases.resolve_current(app), "notes": notes,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{app.name}: deploy {report['result']} in {took:.1f} s (job {result}, reload result "
              f"{after.reload_result or '?'}, {after.active_state}/{after.sub_state})")
        print(f"  MainPID {before.main_pid} -> {after.main_pid}")
        print(f"  status: {after.status_text}")
        for note in notes:
            print(f"  {note}")
    return (after_switch.EXIT_AFTER_SWITCH_FAILED if contract_failed else 0) if ok else 1


def cmd_releases(args: argparse.Namespace) -> int:
    """Every release directory of NAME with its state: live, previous, refused (why, when), never tried."""
    from . import releases

    app = registry.app_for(args.name)
    rows = releases.listing(app)
    # Blue-green/rolling: which instances each release is pinned on (a stopped colour keeps its pin).
    pins: dict[str, list[str]] = {}
    for instance in app.instance_names if app.multi_instance else ():
        try:
            pins.setdefault(os.readlink(app.instance_link(instance)), []).append(instance)
        except OSError:
            pass
    for row in rows:
        if pins.get(row["path"]):
            row["instances"] = pins[row["path"]]
    if args.json:
        print(json.dumps({"name": app.name, "root": releases.releases_root(app),
                          "current": releases.resolve_current(app), "releases": rows,
                          "analysis": releases.read(app).analysis or None}, indent=2))
        return 0
    current = releases.resolve_current(app)
    for row in rows:
        extra = ""
        if row["state"] == "refused":
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
            extra = f" at {when}: {row['reason']}"
        mark = "  <- current" if row["path"] == current else ""
        on = f" (pinned on {', '.join(row['instances'])})" if row.get("instances") else ""
        print(f"{row['release']:<24} {row['state']}{extra}{on}{mark}")
    if not rows:
        print(f"{app.name}: no release directories in {releases.releases_root(app)}")
    _print_analysis(releases.read(app).analysis)
    return 0


def parser_releases(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="NAME's releases: live, previous, refused (why, when), never tried")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_releases)


def _print_analysis(record: dict | None, indent: str = "") -> None:
    """The last deploy's traffic comparison (reloader.traffic), when there was one."""
    from . import traffic

    if record:
        print(f"{indent}last traffic comparison: {traffic.describe(record)}")


def cmd_status(args: argparse.Namespace) -> int:
    from . import proc, toolkit
    from .bus import Systemd

    names = [args.name] if args.name else registry.managed()
    rows = []
    with Systemd() as sd:
        for name in names:
            app = registry.app_for(name)
            st = sd.state(app.service)
            sock = sd.state(app.socket_unit) if app.socket_activation and not app.multi_instance else None
            row = {
                "name": name, "service": st.active_state + "/" + st.sub_state, "load_state": st.load_state,
                "socket": (sock.active_state + "/" + sock.sub_state) if sock else None,
                "main_pid": st.main_pid, "workers": len(proc.children(st.main_pid)) if st.main_pid else 0,
                "reload_result": st.reload_result, "status": st.status_text,
                "release": os.path.basename(os.path.realpath(app.working_directory)),
                "strategy": app.strategy.value,
            }
            row.update(_release_state(app))
            row.update(toolkit.status(app, st.main_pid))  # recycle, maintenance, pause, after_switch
            if app.multi_instance:
                row["instances"] = _instances(app, sd)
                row["live"] = [i["instance"] for i in row["instances"] if i["live"]]
                row["workers"] = sum(i["workers"] for i in row["instances"] if i["live"])
            rows.append(row)
    if args.json:
        print(json.dumps(rows if not args.name else rows[0], indent=2))
    else:
        if not rows:
            print("no apps managed by reloader (none in /etc/reloader)")
        for r in rows:
            print(f"{r['name']}: {r['service']} (socket {r['socket'] or 'none'}), MainPID {r['main_pid']}, "
                  f"{r['workers']} workers, release {r['release']}, last reload {r['reload_result'] or '-'}")
            if r.get("refused_release"):
                print(f"  refused: release {r['refused_release']}: {r['refused_reason']}")
            if r.get("pending"):
                print(f"  {r['pending']}")
            _print_analysis(r.get("analysis"), indent="  ")
            for i in r.get("instances", []):
                print(f"  {i['unit']}: {i['state']}{' (live)' if i['live'] else ''}, release {i['release'] or '-'}, "
                      f"MainPID {i['main_pid']}, {i['workers']} workers")
            if r["status"]:
                print(f"  {r['status']}")
            for line in toolkit.status_lines(r):
                print(line)
    bad = [r for r in rows if not r["service"].startswith("active")]
    return 1 if bad else 0


def parser_status(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="state of NAME (or of every managed app)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def _release_state(app: AppConfig) -> dict:
    """The live release (what serves), separately the last refused one and why, and what current names."""
    from . import releases

    records = releases.read(app)
    live = records.live
    # The refusal that matters is one after the live release went live (older ones are history).
    refused = max(((d, r) for d, r in records.refused.items() if r.time > (live.since if live else 0)),
                  key=lambda item: item[1].time, default=None)
    return {
        "release": live.name if live else os.path.basename(releases.resolve_current(app)),
        "live_release": live.release if live else None,
        "previous_release": records.previous.release if records.previous else None,
        "current": releases.resolve_current(app),
        "refused_release": os.path.basename(refused[0]) if refused else None,
        "refused_reason": refused[1].reason if refused else None,
        "pending": releases.pending(app, records) or None,
        "analysis": records.analysis or None,
    }


def _instances(app: AppConfig, sd: object) -> list[dict]:
    from . import proc
    from .fleet import Fleet

    fleet = Fleet(app, sd, None)  # type: ignore[arg-type]
    live = fleet.state()["live"]
    out = []
    for instance in app.instance_names:
        st = sd.state(app.instance_unit(instance))  # type: ignore[attr-defined]
        out.append({"instance": instance, "unit": app.instance_unit(instance), "live": instance in live,
                    "state": f"{st.active_state}/{st.sub_state}", "main_pid": st.main_pid,
                    "workers": len(proc.children(st.main_pid)) if st.main_pid else 0,
                    "release": os.path.basename(fleet.pinned(instance))})
    return out
