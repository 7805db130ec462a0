"""The demo: boot a real systemd, install the example app with reloader, deploy under load, refuse a bad release.

Run it with ``sudo bash examples/demo`` on a Debian 12 machine (it installs what it needs on the host,
builds the container image on first use, and removes the container when done). ``--suite trixie`` runs
it in a Debian 13 container (systemd 257, nginx 1.26, Python 3.13) instead of Debian 12.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import appbed  # noqa: E402
import testbed  # noqa: E402

DEPLOYS = 3


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def sh(app: appbed.App, cmd: str) -> str:
    r = app.c.run(cmd, check=False, timeout=600)
    out = (r.stdout + r.stderr).rstrip()
    print("\n".join(f"    {line}" for line in out.splitlines()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--suite", default="bookworm", choices=("bookworm", "trixie"),
                        help="the Debian release in the container: bookworm (12, default) or trixie (13)")
    suite = parser.parse_args(argv).suite
    started = time.monotonic()
    say(f"booting systemd in a Debian {suite} container (the image is built once, ~2 min)")
    testbed.ensure_image(suite)
    with testbed.boot(suite) as c:
        app = appbed.App(c)
        print("    " + c.run("systemctl --version | head -1; nginx -v 2>&1; python3 --version").stdout
              .strip().replace("\n", "  |  "))
        say("reloader install examples/flaskapp.toml")
        r = app.install()
        print("\n".join(f"    {line}" for line in r.stdout.splitlines()[-3:]))
        sh(app, "systemctl status flaskapp --no-pager | head -12")
        say("GET / through nginx")
        sh(app, "curl -s -H 'Host: flaskapp.example' http://127.0.0.1/")

        say("reloader verify: 3 reloads under load through nginx (the first one deploys v2)")
        app.ship("v2")
        verify = app.c.run(["reloader", "verify", "flaskapp", "--reloads", "3", "--long", "2",
                            "--long-path", "/slow?s=2", "--path", "/", "--duration", "3"], check=False, timeout=600)
        print("\n".join(f"    {line}" for line in verify.stdout.splitlines()))
        print(f"    verify exit status {verify.returncode}; now serving {app.version()}")

        say(f"{DEPLOYS} more deploys of new code under load (6 clients + 2 long requests in flight)")
        load = app.start_load(concurrency=6, long=2, long_path="/slow?s=2")
        time.sleep(1)
        for n in range(3, DEPLOYS + 3):
            app.ship(f"v{n}")
            out = app.c.run(["reloader", "deploy", "flaskapp", "--json"], check=False, timeout=600)
            report = json.loads(out.stdout)
            print(f"    deploy v{n}: {report['result']} in {report['seconds']} s, MainPID "
                  f"{report['old_main_pid']} -> {report['new_main_pid']}, now serving {app.version()}")

        say("deploying a broken release (import error): refused, old version keeps serving")
        app.ship(code="import nosuchmodule\n")
        out = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=600)
        print("\n".join(f"    {line}" for line in out.stdout.splitlines()))
        print(f"    exit status {out.returncode}; still serving {app.version()}")
        sh(app, "systemctl status flaskapp --no-pager | sed -n '1,6p'")

        report = app.stop_load(load)
        say("summary")
        failed = report["failed"]
        print(f"    {report['summary']}")
        print(f"    failed requests: {failed}  |  in-flight long requests: {report['long']['ok']}/"
              f"{report['long']['total']} ok  |  demo took {time.monotonic() - started:.0f} s")
        ok = failed == 0 and out.returncode != 0 and verify.returncode == 0
        print("    RESULT: zero failed requests, broken release refused" if ok else "    RESULT: FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
