"""After a deploy (host tests): the [hooks] get the facts as environment, the performer is recorded in
releases.json, and the metrics file is valid Prometheus text format (checked by a strict parser of the
exposition format written here: prometheus_client is not a dependency)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from configbed import cfg

from reloader import commands, config, hooks, registry, releases
from reloader.config import parse

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)( -?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)')


def parse_prometheus(text: str) -> dict[str, dict]:
    """The text exposition format, strictly: HELP/TYPE once per family and before its samples, known
    types, label syntax and escapes, float values, no duplicate series, a final newline. Returns
    {family: {"type", "help", "samples": {frozenset(labels): value}}}; raises AssertionError."""
    assert text.endswith("\n"), "the file must end with a newline"
    families: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        assert line.strip() == line and line, f"line {n}: blank or padded: {line!r}"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, name, rest = line[2:6], *line[7:].split(" ", 1)
            assert re.fullmatch(_NAME, name), f"line {n}: bad metric name {name!r}"
            family = families.setdefault(name, {"samples": {}})
            assert kind.lower() not in family, f"line {n}: second {kind} for {name}"
            assert not family["samples"], f"line {n}: {kind} after samples of {name}"
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), f"line {n}: type {rest}"
            family[kind.lower()] = rest
            continue
        assert not line.startswith("#"), f"line {n}: unknown comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"line {n}: not a sample: {line!r}"
        name, _, raw_labels, value = m.group(1), m.group(2), m.group(3) or "", m.group(4)
        labels = {}
        pos = 0
        while pos < len(raw_labels):
            lm = _LABEL.match(raw_labels, pos)
            assert lm, f"line {n}: bad labels {raw_labels!r}"
            assert lm.group(1) not in labels, f"line {n}: label {lm.group(1)} twice"
            labels[lm.group(1)] = lm.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
            pos = lm.end()
        number = float(value)  # ValueError for anything but a float, +Inf, -Inf, NaN
        assert name in families and "type" in families[name], f"line {n}: sample of {name} without TYPE"
        if families[name]["type"] == "counter":
            assert name.endswith("_total") and number >= 0 and not math.isnan(number), f"line {n}: bad counter"
        key = frozenset(labels.items())
        assert key not in families[name]["samples"], f"line {n}: duplicate series"
        families[name]["samples"][key] = number
    return families


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "releases"
    for n in (1, 2, 3):
        (root / str(n)).mkdir(parents=True)
    (tmp_path / "current").symlink_to(root / "2")
    (tmp_path / "prom").mkdir()
    monkeypatch.setattr(config, "STATE_DIR", tmp_path / "state")
    out = tmp_path / "hook.env"
    grab = f"sh -c 'env | grep ^RELOADER_ | sort > {out}.'\"$RELOADER_RESULT\""
    return parse(cfg({"working_directory": str(tmp_path / "current")},
                     hooks={"after_deploy": [grab], "after_refusal": [grab, "sh -c 'echo no pager >&2; exit 3'"],
                            "after_rollback": [grab]},
                     metrics={"textfile_directory": str(tmp_path / "prom")}))


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_hooks_get_the_facts_and_the_performer_is_recorded(app, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "releases"
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    releases.record_live(app, releases.Release(str(root / "1")))
    before = releases.read(app)
    releases.record_live(app, releases.Release(str(root / "2")))  # what the helper records on success
    notes = hooks.after(app, hooks.outcome(app, "deploy", True, "serving release 2", 3.25, before, str(root / "2")))
    env = read_env(tmp_path / "hook.env.success")
    assert env["RELOADER_APP"] == "myapp" and env["RELOADER_ACTION"] == "deploy"
    assert (env["RELOADER_RELEASE"], env["RELOADER_PREVIOUS"]) == ("2", "1")
    assert (env["RELOADER_RESULT"], env["RELOADER_DURATION"], env["RELOADER_PERFORMER"]) == ("success", "3.25",
                                                                                             "alice")
    assert env["RELOADER_REASON"] == "serving release 2" and int(env["RELOADER_TIME"]) > 0
    assert any(n.startswith("hook ") and n.endswith(" ran") for n in notes), notes

    # A refusal: the after_refusal hooks, the one that fails is reported, not fatal.
    before = releases.read(app)
    releases.record_refused(app, str(root / "3"), "ModuleNotFoundError: x (app.py:1)")
    notes = hooks.after(app, hooks.outcome(app, "deploy", False, "reload refused: ModuleNotFoundError: x (app.py:1)",
                                           1.5, before, str(root / "3")))
    env = read_env(tmp_path / "hook.env.refused")
    assert (env["RELOADER_RESULT"], env["RELOADER_RELEASE"], env["RELOADER_PREVIOUS"]) == ("refused", "3", "2")
    assert "ModuleNotFoundError" in env["RELOADER_REASON"]
    assert "hook \"sh -c 'echo no pager >&2; exit 3'\" failed with exit status 3: no pager" in notes

    data = json.loads((Path(app.state_dir) / "releases.json").read_text())
    assert [(h["action"], h["result"], h["release"], h["performer"]) for h in data["history"]] == [
        ("deploy", "success", "2", "alice"), ("deploy", "refused", "3", "alice")]
    assert data["counts"] == {"deploy/success": 1, "deploy/refused": 1}
    assert data["live"]["release"] == str(root / "2"), "the helper's records are untouched"
    releases.record_live(app, releases.Release(str(root / "1")))  # the helper rewrites the file: history stays
    assert len(json.loads((Path(app.state_dir) / "releases.json").read_text())["history"]) == 2


def test_the_metrics_file_is_valid_prometheus_text(app, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    assert hooks.write_metrics(app) == str(tmp_path / "prom" / "reloader_myapp.prom"), "before any deploy too"
    releases.record_live(app, releases.Release(str(root / "1")))
    for result, took in (("success", 2.0), ("refused", 1.0), ("success", 4.5)):
        releases.record_outcome(app, {"action": "deploy", "result": result, "release": "2", "duration": took,
                                      "time": 1700000000.0, "performer": "bob", "previous": "1", "reason": "",
                                      "app": "myapp"})
    releases.record_outcome(app, {"action": "rollback", "result": "success", "release": "1", "duration": 3.0,
                                  "time": 1700000100.0, "performer": "bob", "previous": "2", "reason": "",
                                  "app": "myapp"})
    path = Path(hooks.write_metrics(app))
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["reloader_myapp.prom"], "no temp file left"
    m = parse_prometheus(path.read_text())
    deploys = m["reloader_deploys_total"]["samples"]
    assert deploys[frozenset({"app": "myapp", "action": "deploy", "result": "success"}.items())] == 2
    assert deploys[frozenset({"app": "myapp", "action": "deploy", "result": "refused"}.items())] == 1
    assert deploys[frozenset({"app": "myapp", "action": "rollback", "result": "success"}.items())] == 1
    assert m["reloader_refusals_total"]["samples"] == {frozenset({"app": "myapp"}.items()): 1}
    assert m["reloader_last_deploy_duration_seconds"]["samples"] == {frozenset({"app": "myapp"}.items()): 3.0}
    assert m["reloader_last_deploy_success"]["samples"] == {frozenset({"app": "myapp"}.items()): 1}
    info = m["reloader_live_release_info"]
    assert info["type"] == "gauge" and info["samples"] == {
        frozenset({"app": "myapp", "release": "1", "previous": ""}.items()): 1}


def test_the_parser_is_strict() -> None:
    good = '# HELP a_total x\n# TYPE a_total counter\na_total{app="q\\"x"} 1\n'
    assert parse_prometheus(good)["a_total"]["samples"] == {frozenset({"app": 'q"x'}.items()): 1}
    for bad in (good[:-1], good.replace("counter", "countr"), good + 'a_total{app="q\\"x"} 2\n',
                good.replace("} 1", "} one"), good.replace('app="', "app=\""[:-1]), 'a_total 1\n',
                good + "# TYPE a_total counter\n", good.replace("} 1", "} -1")):
        with pytest.raises((AssertionError, ValueError)):
            parse_prometheus(bad)
    assert hooks._label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_deploy_runs_the_hooks_with_systemds_verdict(app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """commands._deploy hands the outcome to the hooks: a fake bus answers the reload job as refused."""
    from reloader import bus

    root = tmp_path / "releases"
    releases.record_live(app, releases.Release(str(root / "2")))
    app = replace(app, strategy=config.Strategy.GENERATION)
    monkeypatch.setattr(registry, "app_for", lambda name: app)

    class State:
        def __init__(self, **kw: object) -> None:
            self.__dict__.update(load_state="loaded", active_state="active", sub_state="running", main_pid=10,
                                 status_text="", reload_result="success", running=True)
            self.__dict__.update(kw)

    class FakeBus:
        calls = 0

        def __init__(self, *a: object, **kw: object) -> None:
            pass

        def __enter__(self) -> FakeBus:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def state(self, unit: str) -> State:
            FakeBus.calls += 1
            if FakeBus.calls == 1:
                return State()
            return State(status_text="reload refused: boom (app.py:1)", reload_result="exit-code")

        def reload_unit(self, unit: str, **kw: object) -> str:
            releases.record_refused(app, str(root / "3"), "boom (app.py:1)")  # what the helper does
            return "failed"

    monkeypatch.setattr(bus, "Systemd", FakeBus)
    monkeypatch.setattr(registry, "operator_lock", lambda *a, **kw: contextlib.nullcontext())
    rc = commands._deploy(app, argparse.Namespace(timeout=5, json=True), str(root / "3"))
    assert rc == 1
    env = read_env(tmp_path / "hook.env.refused")
    assert (env["RELOADER_RESULT"], env["RELOADER_RELEASE"], env["RELOADER_PREVIOUS"]) == ("refused", "3", "2")
    assert env["RELOADER_REASON"] == "reload refused: boom (app.py:1)"
    assert os.readlink(app.working_directory) == str(root / "2"), "current put back"
