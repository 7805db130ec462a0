"""How long commands wait, and for whom: the reload budget and the operator lock.

A reload may take as long as its steps' timeouts add up to (pre-flight, setup commands, the new workers'
boot, a bake of up to an hour, the old generation draining; per instance when rolling). The unit's
TimeoutStartSec= and every client's wait for the reload job use that one number (AppConfig.reload_budget),
so `reloader deploy` never reports a failure while the reload carries on.
"""

from __future__ import annotations

import re

from reloader.bus import client_wait
from reloader.config import AppConfig, parse
from reloader.render import render


def config(reload: dict | None = None, setup: dict | None = None) -> AppConfig:
    data: dict = {"app": {"name": "flaskapp", "working_directory": "/srv/flaskapp/current",
                          "virtualenv": "/srv/flaskapp/venv", "wsgi": "app:app"}}
    if reload:
        data["reload"] = reload
    if setup:
        data["setup"] = setup
    return parse(data)


def timeout_start_sec(app: AppConfig) -> int:
    """TimeoutStartSec= of the rendered unit `systemctl reload NAME` runs (service or controller)."""
    unit = next(f for f in render(app) if f.name == f"{app.name}.service")
    return int(re.search(r"^TimeoutStartSec=(\d+)$", unit.content, re.M).group(1))


def test_the_reload_budget_counts_the_bake_the_setup_and_every_instance() -> None:
    base = config()
    assert config({"bake_seconds": 300}).reload_budget == base.reload_budget - 2 + 300
    assert config({"bake_seconds": 0.5}).reload_budget == base.reload_budget - 2 + 1, "a started second counts"
    with_setup = config(setup={"commands": ["true"], "timeout": 600})
    assert with_setup.reload_budget == base.reload_budget + 600
    three, six = config({"strategy": "rolling"}), config({"strategy": "rolling", "instances": 6})
    per_instance = three.ready_timeout + three.graceful_timeout + 60
    assert six.reload_budget - three.reload_budget == 3 * per_instance
    assert config({"strategy": "blue-green"}).reload_budget == base.preflight_timeout + 2 + 2 * per_instance
    for app in (base, config({"bake_seconds": 300}), with_setup, three, six, config({"strategy": "blue-green"})):
        assert timeout_start_sec(app) == app.reload_budget, app.strategy
        # A client waits longer than the unit, to report systemd's verdict on a reload that overran.
        assert client_wait(app.reload_budget) > app.reload_budget
    long_bake = config({"bake_seconds": 300})
    old_fixed_deadline = long_bake.ready_timeout + long_bake.preflight_timeout + long_bake.graceful_timeout + 60
    assert client_wait(long_bake.reload_budget) > 300 + long_bake.preflight_timeout > old_fixed_deadline
