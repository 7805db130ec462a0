#!/usr/bin/env python3
"""Measure ``Type=notify`` against ``Type=notify-reload`` on systemd 257 (Debian 13), to decide the default.

Run on the test host, as root (boots two trixie containers of tests/testbed.py, one per type, ~10 min):

    sudo python3 bench/notify_reload.py [TYPE...]  # prints and writes bench/notify_reload.json

In each container the example app is installed (``reloader install``, with ``--notify-reload`` for the
second type) with short timeouts (``preflight_timeout = 30``, ``ready_timeout = 8``, ``graceful_timeout =
10``, so ``TimeoutStartSec=80``), under light load through nginx, and then:

* ``refused``: a release that fails to import. How long ``systemctl reload`` takes, its exit status,
  ``ReloadResult``, the version served afterwards.
* ``slow, valid``: a release whose import takes 5 s (pre-flight and workers both import it): succeeds?
* ``slower than ready_timeout``: a 12 s import (the pre-flight passes, the workers miss ready_timeout).
* ``slower than TimeoutStartSec``: a drop-in sets ``TimeoutStartSec=5`` and the import takes 3 s (3 s
  pre-flight + 3 s workers + 2 s bake > 5 s): carried by the helper's ``EXTEND_TIMEOUT_USEC``?
* ``helper SIGKILLed``: the helper is SIGKILLed once the new master exists. How long the unit stays
  ``reloading`` after the kill, when and with which status ``systemctl reload`` returns, which version
  answers meanwhile, ``ReloadResult``, and how long the next reload takes.

The load (2 clients + 1 long request) runs through it all and its failed requests are reported.
This is a measurement, not a test: it asserts nothing and exits 0 unless the bed itself breaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import appbed  # noqa: E402
import testbed  # noqa: E402

SLOW = "\nimport time\ntime.sleep({s})\n"
DROPIN = "/etc/systemd/system/flaskapp.service.d/timeout.conf"


def timed_reload(app: appbed.App) -> dict[str, Any]:
    t0 = time.monotonic()
    r = app.reload(timeout=400)
    took = time.monotonic() - t0
    p = app.props()
    return {"rc": r.returncode, "seconds": round(took, 1), "reload_result": p["ReloadResult"],
            "state": f"{p['ActiveState']}/{p['SubState']}", "version": app.version(),
            "status": p["StatusText"][:120]}


def killed_helper(app: appbed.App, version: str, watch: float) -> dict[str, Any]:
    """SIGKILL the ExecReload= helper once the new master exists; watch the unit for up to *watch* s.

    A unit still reloading then is recovered the way an operator would: `systemctl restart` (the socket
    unit holds the listening socket, so no connection is refused)."""
    app.ship(version, extra=SLOW.format(s=4))
    t_start = time.monotonic()
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while app.c.run("test -s /run/flaskapp/gunicorn.pid.2", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise testbed.TestbedError("the new master never appeared:\n" + app.journal(30))
        time.sleep(0.1)
    helper = app.props()["ControlPID"]
    app.c.run(["kill", "-KILL", str(helper)])
    t_kill = time.monotonic()
    served: dict[str, int] = {}
    returned = rc = None
    settled = None
    while time.monotonic() - t_kill < watch:
        if returned is None and reload.poll() is not None:
            returned, rc = time.monotonic() - t_kill, reload.returncode
        state = app.props()["ActiveState"]
        if settled is None and state != "reloading":
            settled = time.monotonic() - t_kill
        v = app.version()
        served[v] = served.get(v, 0) + 1
        if settled is not None and returned is not None:
            break
        time.sleep(0.5)
    p = app.props()
    after = {"reload_result": p["ReloadResult"], "state": f"{p['ActiveState']}/{p['SubState']}",
             "version": app.version()}
    out: dict[str, Any] = {
        "kill_after_s": round(t_kill - t_start, 1),
        "reloading_after_kill_s": round(settled, 1) if settled is not None else f"still after {watch:.0f}",
        "systemctl_reload_returned_after_kill_s": round(returned, 1) if returned is not None else None,
        "systemctl_reload_rc": rc, "served_while_reloading": served, "after": after,
        "reload_timed_out_messages": app.c.run("journalctl -u flaskapp --no-pager | grep -c 'Reload operation "
                                               "timed out'", check=False).stdout.strip()}
    app.ship(f"{version}-next")
    if settled is None:
        t0 = time.monotonic()
        second = app.c.run(["timeout", "15", "systemctl", "reload", "flaskapp"], check=False, timeout=60)
        out["another_reload_meanwhile"] = {"rc": second.returncode, "seconds": round(time.monotonic() - t0, 1)}
        t0 = time.monotonic()
        restart = app.systemctl("restart", "flaskapp")
        out["recovery_restart"] = {"rc": restart.returncode, "seconds": round(time.monotonic() - t0, 1)}
        reload.wait(timeout=60)
        out["systemctl_reload_rc"] = reload.returncode
        app.wait_version(f"{version}-next")
    out["next_reload"] = timed_reload(app)
    return out


def measure(service_type: str) -> dict[str, Any]:
    flags = ["--notify-reload"] if service_type == "notify-reload" else []
    with testbed.boot("trixie") as c:
        app = appbed.App(c)
        config = app.variant(gunicorn="graceful_timeout = 10", reload="preflight_timeout = 30\nready_timeout = 8")
        r = app.install(config, *flags)
        if r.returncode != 0 or not app.wait_version("v1"):
            raise testbed.TestbedError(f"install failed: {r.stdout}{r.stderr}\n{app.journal()}")
        unit = c.read_file("/etc/systemd/system/flaskapp.service")
        timeout_start = c.run(["systemctl", "show", "-P", "TimeoutStartUSec", "flaskapp"]).stdout.strip()
        load = app.start_load(concurrency=2, long=1, long_path="/slow?s=1")
        out: dict[str, Any] = {"type": next(line for line in unit.splitlines() if line.startswith("Type=")),
                               "systemd": c.run("systemctl --version | head -1").stdout.strip(),
                               "TimeoutStartSec": timeout_start}
        app.ship(code="import nosuchmodule\n")
        out["refused"] = timed_reload(app)
        app.ship("v2", extra=SLOW.format(s=5))
        out["slow, valid (5 s import)"] = timed_reload(app)
        app.ship("v3", extra=SLOW.format(s=12))
        out["slower than ready_timeout (12 s import)"] = timed_reload(app)
        c.write_file(DROPIN, "[Service]\nTimeoutStartSec=5\n")
        c.run(["systemctl", "daemon-reload"])
        app.ship("v4", extra=SLOW.format(s=3))
        out["slower than TimeoutStartSec=5 (3 s import)"] = timed_reload(app)
        c.run(["rm", DROPIN])
        c.run(["systemctl", "daemon-reload"])
        timeout_usec = c.run(["python3", "-c", "from pystemd.systemd1 import Unit; u = Unit(b'flaskapp.service'); "
                              "u.load(); print(u.Service.TimeoutStartUSec)"]).stdout
        out["helper SIGKILLed"] = killed_helper(app, "v5", watch=2 * int(timeout_usec) / 1e6 + 20)
        report = app.stop_load(load)
        out["load"] = {"total": report["total"], "failed": report["failed"], "failures": report["failures"],
                       "long": report["long"]}
        return out


def main() -> int:
    types = sys.argv[1:] or ["notify", "notify-reload"]
    path = HERE / "notify_reload.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for t in types:
        results[t] = measure(t)
        path.write_text(json.dumps(results, indent=2) + "\n")  # each type as soon as it is measured
        print(json.dumps({t: results[t]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
