"""How long commands wait, and for whom: the reload budget and the operator lock.

A reload may take as long as its steps' timeouts add up to (pre-flight, setup commands, the new workers'
boot, a bake of up to an hour, the old generation draining; per instance when rolling). The unit's
TimeoutStartSec= and every client's wait for the reload job use that one number (AppConfig.reload_budget),
so `reloader deploy` never reports a failure while the reload carries on. And an `install` racing a
`deploy` of the same app waits for it (the operator lock) instead of rewriting the units under it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import appbed
import testbed

from reloader.bus import client_wait
from reloader.config import AppConfig, parse
from reloader.render import render


def config(reload: dict | None = None, setup: dict | None = None, analysis: dict | None = None) -> AppConfig:
    data: dict = {"app": {"name": "flaskapp", "working_directory": "/srv/flaskapp/current",
                          "virtualenv": "/srv/flaskapp/venv", "wsgi": "app:app"}}
    if reload:
        data["reload"] = reload
    if setup:
        data["setup"] = setup
    if analysis:
        data["analysis"] = analysis
    return parse(data)


def timeout_start_sec(app: AppConfig) -> int:
    """TimeoutStartSec= of the rendered unit `systemctl reload NAME` runs (service or controller)."""
    unit = next(f for f in render(app) if f.name == f"{app.name}.service")
    return int(re.search(r"^TimeoutStartSec=(\d+)$", unit.content, re.M).group(1))


def test_the_reload_budget_counts_the_bake_the_setup_and_every_instance() -> None:
    base = config()
    # The bake lasts bake_seconds, or (traffic analysis, on by default) up to [analysis] timeout (30 s).
    assert config({"bake_seconds": 300}).reload_budget == base.reload_budget - 30 + 300
    assert config(analysis={"timeout": 60}).reload_budget == base.reload_budget - 30 + 60
    assert config(analysis={"enabled": False}).reload_budget == base.reload_budget - 30 + 2
    assert (config({"bake_seconds": 0.5}, analysis={"enabled": False}).reload_budget
            == base.reload_budget - 30 + 1), "a started second counts"
    with_setup = config(setup={"commands": ["true"], "timeout": 600})
    assert with_setup.reload_budget == base.reload_budget + 600
    three, six = config({"strategy": "rolling"}), config({"strategy": "rolling", "instances": 6})
    per_instance = three.ready_timeout + three.graceful_timeout + 60
    assert six.reload_budget - three.reload_budget == 3 * per_instance
    # Blue-green is judged by the traffic analysis too (its canary route), so its bake may last up to 30 s.
    assert config({"strategy": "blue-green"}).reload_budget == base.preflight_timeout + 30 + 2 * per_instance
    assert (config({"strategy": "blue-green"}, analysis={"enabled": False}).reload_budget
            == base.preflight_timeout + 2 + 2 * per_instance)
    for app in (base, config({"bake_seconds": 300}), with_setup, three, six, config({"strategy": "blue-green"})):
        assert timeout_start_sec(app) == app.reload_budget, app.strategy
        # A client waits longer than the unit, to report systemd's verdict on a reload that overran.
        assert client_wait(app.reload_budget) > app.reload_budget
    long_bake = config({"bake_seconds": 300})
    old_fixed_deadline = long_bake.ready_timeout + long_bake.preflight_timeout + long_bake.graceful_timeout + 60
    assert client_wait(long_bake.reload_budget) > 300 + long_bake.preflight_timeout > old_fixed_deadline


# --- in a real systemd ------------------------------------------------------------------------------------
#: Short step timeouts, so the deadline `deploy` had before the budget (ready + preflight + graceful + 60 s)
#: is 78 s, and a bake longer than that.
QUICK = "preflight_timeout = 5\nready_timeout = 10\n"
OLD_DEADLINE = 10 + 5 + 3 + 60
LONG_BAKE = OLD_DEADLINE + 4


def lock_holder(c: testbed.Container) -> str:
    return c.run("cat /run/reloader/flaskapp.lock 2>/dev/null || true").stdout.strip()


def test_a_deploy_longer_than_the_old_deadline_succeeds_and_an_install_waits_for_it(
        container: testbed.Container) -> None:
    """A bake longer than the client's old fixed deadline: `reloader deploy` waits it out and reports
    success. An `install` of a new config started meanwhile waits for that deploy (saying for whom),
    writes nothing while it runs, then applies its change with a reload of its own."""
    app = appbed.App(container)
    c = container
    first = app.variant(gunicorn="workers = 2\ngraceful_timeout = 3", reload=QUICK + f"bake_seconds = {LONG_BAKE}")
    r = app.install(first)
    assert r.returncode == 0, r.stdout + r.stderr
    assert app.wait_version("v1"), app.journal()
    budget = 5 + 10 + LONG_BAKE + 3 + 30
    shown = c.run(["systemctl", "show", "-P", "TimeoutStartUSec", "flaskapp.service"]).stdout.strip()
    assert shown == f"{budget // 60}min {budget % 60}s", (shown, budget)
    old_pid = int(app.props()["MainPID"])

    app.ship("v2")
    deploy = c.popen(["reloader", "deploy", "flaskapp", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    deadline = time.monotonic() + 30
    while app.props()["ActiveState"] != "reloading" or "deploy" not in lock_holder(c):
        assert deploy.poll() is None and time.monotonic() < deadline, "the deploy never started reloading"
        time.sleep(0.2)
    assert re.fullmatch(r"`reloader deploy flaskapp` \(pid \d+\)", lock_holder(c)), lock_holder(c)

    # An install of a changed config (one more worker, a short bake) while the deploy bakes.
    second = app.variant(gunicorn="workers = 3\ngraceful_timeout = 3", reload=QUICK + "bake_seconds = 1",
                         path="/root/flaskapp2.toml")
    written = ["/etc/reloader/flaskapp.toml", "/etc/reloader/flaskapp.gunicorn.conf.py",
               "/etc/systemd/system/flaskapp.service"]
    before = c.run(["sha256sum", *written]).stdout
    install = c.popen(["reloader", "install", second], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    polls = 0
    while deploy.poll() is None:
        assert install.poll() is None, "install did not wait for the running deploy"
        assert c.run(["sha256sum", *written]).stdout == before, "install wrote files while the deploy ran"
        polls += 1
        time.sleep(1)
    out, err = deploy.communicate()
    assert deploy.returncode == 0, out + err + app.journal()
    report = json.loads(out)
    assert report["result"] == "success" and report["seconds"] > OLD_DEADLINE, report
    assert report["old_main_pid"] == old_pid != report["new_main_pid"], report
    assert polls > 10, f"the install overlapped the deploy for {polls} s only"
    print(f"deploy with a {LONG_BAKE} s bake: {report['seconds']} s (old client deadline {OLD_DEADLINE} s); "
          f"install waited {polls} polls")

    out, err = install.communicate(timeout=300)
    assert install.returncode == 0, out + err + app.journal()
    assert re.search(r"flaskapp: waiting for `reloader deploy flaskapp` \(pid \d+\) to finish", err), err
    assert "reloading the running service" in out, out
    assert c.run(["sha256sum", *written]).stdout != before
    assert app.version() == "v2"
    main = int(app.props()["MainPID"])
    assert main != report["new_main_pid"] and len(c.run(["ps", "--no-headers", "--ppid", str(main)]).stdout
                                                     .splitlines()) == 3
    assert lock_holder(c) == "", "the lock still names a holder after both commands ended"
