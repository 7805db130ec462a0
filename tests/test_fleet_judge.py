"""The canary's judgement at the balancer (ansible/roles/haproxy/files/haproxy-server ``judge``), on the host
with HAProxy's ``show stat`` answers faked: the numbers and the verdicts, in milliseconds.  The same
judgement against a real HAProxy under load is in tests/test_ansible_fleet.py."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "ansible/roles/haproxy/files/haproxy-server"
loader = importlib.machinery.SourceFileLoader("haproxy_server", str(SCRIPT))
spec = importlib.util.spec_from_loader("haproxy_server", loader)
assert spec is not None
hs = importlib.util.module_from_spec(spec)
sys.modules["haproxy_server"] = hs  # dataclasses look the module up by name
loader.exec_module(hs)

FIELDS = ["pxname", "svname", "status", "weight", "scur", "qcur", "rtime",
          "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other"]


def stat(servers: dict[str, tuple[str, int, int, int]]) -> str:
    """A ``show stat`` answer: server -> (status, 2xx, 5xx, rtime ms), plus the FRONTEND/BACKEND rows."""
    lines = ["# " + ",".join(FIELDS), ",".join(["web", "FRONTEND", "OPEN"] + ["0"] * (len(FIELDS) - 3))]
    for name, (status, ok, bad, rtime) in servers.items():
        row = {"pxname": "web", "svname": name, "status": status, "weight": "100", "rtime": str(rtime),
               "hrsp_2xx": str(ok), "hrsp_5xx": str(bad)}
        lines.append(",".join(row.get(f, "0") for f in FIELDS))
    lines.append(",".join(["web", "BACKEND", "UP"] + ["0"] * (len(FIELDS) - 3)))
    return "\n".join(lines) + "\n"


def run_judge(monkeypatch: pytest.MonkeyPatch, answers: list[str], window: float = 0.05,
              limits: object = None, exclude: tuple[str, ...] = (), sent: list[str] | None = None) -> tuple[str, dict]:
    feed = iter(answers)
    last = [answers[-1]]

    def command(sock: str, line: str) -> str:
        if line.startswith("set weight "):
            (sent if sent is not None else []).append(line)
            return ""
        assert line == "show stat"
        last[0] = next(feed, last[0])
        return last[0]

    monkeypatch.setattr(hs, "command", command)
    return hs.judge("/nonexistent", "web", ["app1"], window, limits or hs.Limits(), poll=0.01, exclude=exclude,
                    weight=10)


def test_a_canary_as_good_as_the_others_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 100, 0, 20), "app2": ("UP", 1000, 1, 20), "app3": ("UP", 1000, 0, 20)})
    after = stat({"app1": ("UP", 150, 0, 22), "app2": ("UP", 1500, 1, 20), "app3": ("UP", 1500, 0, 21)})
    sent: list[str] = []
    reason, numbers = run_judge(monkeypatch, [before, after], sent=sent)
    assert reason == ""
    assert numbers["canary"]["responses"] == 50 and numbers["others"]["responses"] == 1000
    assert numbers["reference"] == ["app2", "app3"]
    assert sent == ["set weight web/app1 10%", "set weight web/app1 100%"]  # a small share, then all of it


def test_a_canary_answering_500_to_30_percent_fails_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 100, 0, 20), "app2": ("UP", 1000, 0, 20), "app3": ("UP", 1000, 0, 20)})
    after = stat({"app1": ("UP", 135, 15, 20), "app2": ("UP", 1500, 1, 20), "app3": ("UP", 1500, 0, 20)})
    sent: list[str] = []
    reason, numbers = run_judge(monkeypatch, [before, after], window=60, sent=sent)  # ends early: certain
    assert sent == ["set weight web/app1 10%", "set weight web/app1 0%"]  # no new request until rolled back
    assert reason.startswith("5xx regression: the canary answered 15 5xx of 50 (30.0 %), the others 1 of 1001")
    assert numbers["window_s"] < 5


def test_one_stray_5xx_is_not_a_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 0, 0, 20), "app2": ("UP", 0, 0, 20)})
    after = stat({"app1": ("UP", 19, 1, 20), "app2": ("UP", 20, 0, 20)})
    assert run_judge(monkeypatch, [before, after])[0] == ""


def test_a_slow_canary_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 0, 0, 20), "app2": ("UP", 0, 0, 20)})
    after = stat({"app1": ("UP", 40, 0, 400), "app2": ("UP", 400, 0, 30)})
    reason, _ = run_judge(monkeypatch, [before, after])
    assert reason == "latency regression: the canary's response time is 400 ms, the others' 30 ms (limit 2 x + 50 ms)"


def test_a_canary_without_traffic_is_not_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 0, 0, 20), "app2": ("UP", 0, 0, 20)})
    after = stat({"app1": ("UP", 3, 0, 20), "app2": ("UP", 300, 0, 20)})
    reason, _ = run_judge(monkeypatch, [before, after])
    assert reason.startswith("not judged: the canary answered 3 requests in the window, fewer than 10")
    assert run_judge(monkeypatch, [before, after], limits=hs.Limits(min_requests=0))[0] == ""


def test_drained_down_and_excluded_servers_are_no_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    before = stat({"app1": ("UP", 0, 0, 20), "app2": ("DOWN", 0, 0, 20), "app3": ("UP", 0, 0, 20),
                   "app4": ("DRAIN", 0, 0, 20), "app5": ("UP", 0, 0, 20)})
    after = stat({"app1": ("UP", 50, 0, 20), "app2": ("DOWN", 0, 50, 20), "app3": ("UP", 50, 0, 20),
                  "app4": ("DRAIN", 0, 0, 20), "app5": ("UP", 0, 50, 20)})
    reason, numbers = run_judge(monkeypatch, [before, after], exclude=("app5",))
    assert reason == "" and numbers["reference"] == ["app3"]


def test_an_unknown_canary_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hs, "command", lambda sock, line: stat({"app2": ("UP", 0, 0, 20)}))
    with pytest.raises(hs.Unknown, match="backend 'web' has no server app1"):
        hs.judge("/nonexistent", "web", ["app1"], 1, hs.Limits())
