"""The traffic analysis of blue-green and rolling on the host (reloader.fleet + reloader.traffic): the fleet
engine runs for real against tests/fakes.py's process table and bus, routes are real symlinks in a tmp dir,
and a small traffic model stands in for nginx: every 0.2 s of the bake (each health check) it sends requests
along the routes by the upstream's weights, and each instance's workers publish counters as the gunicorn
hooks do (how its pinned release answers: *bad* releases 30 % 500s, *slow* ones 300 ms more).
The same under real load through nginx in a real systemd: tests/test_traffic_fleet.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from configbed import cfg
from fakes import FakeNotifier, FakeSystemd, ProcessTable, in_tmp, preflight_that, two_releases

from reloader import releases, traffic
from reloader.config import AppConfig, parse
from reloader.engine import Refused
from reloader.render import upstream

REQUESTS_PER_LOOK = 60


class Host:
    """An app of two colours (or three rolling instances, 2 workers each), every instance on release 1;
    ``deploy(kind)`` ships release 2 answering as *kind* ("good", "bad", "slow") and deploys it."""

    def __init__(self, root: Path, strategy: str = "blue-green", **analysis: Any) -> None:
        srv, self.old_release, self.new_release = two_releases(root)
        self.app: AppConfig = in_tmp(parse(cfg(
            {"working_directory": str(srv / "current"), "virtualenv": str(srv / "venv")},
            gunicorn={"workers": 2}, reload={"strategy": strategy, "bake_seconds": 0.4, "ready_timeout": 10},
            analysis={"min_requests": 40, "timeout": 3, **analysis})), root)
        self.table = ProcessTable(self.app, workers=1)
        self.sd = FakeSystemd(self.app, self.table)
        self.n = FakeNotifier(0)
        self.behaviour = {self.old_release: "good", self.new_release: "good"}
        self.traffic = True
        self.served: dict[int, traffic.Stats] = {}  #: master -> what it answered
        fleet = self.fleet()
        for instance in self.app.instance_names:
            fleet.pin(instance, self.old_release)
        fleet.bring_up()

    def fleet(self) -> Any:
        from reloader.fleet import Fleet

        def health(app: AppConfig, socket_path: str = "", **_: Any) -> tuple[int, str]:
            self.sd.connect(socket_path)
            if self.traffic:
                self.send(REQUESTS_PER_LOOK)
            return 200, ""

        return Fleet(self.app, self.sd, self.n, processes=self.table,  # type: ignore[arg-type]
                     health=health, checker=preflight_that(self.table))

    def send(self, n: int) -> None:
        """*n* requests spread over the routes by the upstream's weights, as nginx's round robin does."""
        fleet = self.fleet()
        weights = [(int(w), slot) for slot, w in re.findall(r"routes/(\w+)\.sock weight=(\d+) max_fails=0;$",
                                                            upstream(self.app), re.M)]
        total = sum(w for w, _ in weights)
        for weight, slot in weights:
            instance = fleet.routed(slot)
            master = self.sd.mains.get(self.app.instance_unit(instance), 0)
            if not master:
                continue
            count = n * weight // total
            kind = self.behaviour[fleet.pinned(instance)]
            latency = 305.0 if kind == "slow" else 5.0
            served = traffic.Stats(count, round(0.3 * count) if kind == "bad" else 0,
                                   {traffic.bucket(latency / 1000): count})
            self.served[master] = self.served.get(master, traffic.Stats()) + served
            directory = Path(self.app.instance_ready_dir(instance)) / str(master)
            s = self.served[master]
            (directory / f"stats-{master * 100}").write_text(json.dumps(
                {"requests": s.requests, "5xx": s.errors, "latency": {str(k): v for k, v in s.latency.items()}}))

    def deploy(self, kind: str = "good") -> tuple[str, BaseException | None]:
        self.behaviour[self.new_release] = kind
        try:
            return self.fleet().deploy(), None
        except Exception as e:
            return "", e

    def routes(self) -> dict[str, str]:
        fleet = self.fleet()
        return {slot: fleet.routed(slot) for slot in (*self.app.route_slots, "canary")}

    def analysis(self) -> dict:
        return releases.read(self.app).analysis


REFUSED = (r"release 2 answered 5xx to \d+ % of [\d,]+ requests \(old generation: 0 % of [\d,]+\) during the bake; "
           r"still serving release 1 \({}\)")


def test_the_upstream_weighs_the_canary_route_like_canary_workers() -> None:
    bg = parse(cfg(gunicorn={"workers": 4}, reload={"strategy": "blue-green"}))
    assert bg.canary_route and bg.canary_weights == (4, 1)
    text = upstream(bg)
    assert re.search(r"^server unix:\S+/routes/live\.sock weight=4 max_fails=0;$", text, re.M), text
    assert re.search(r"^server unix:\S+/routes/canary\.sock weight=1 max_fails=0;$", text, re.M), text
    half = parse(cfg(gunicorn={"workers": 4}, reload={"strategy": "blue-green"}, analysis={"canary_workers": 0}))
    assert half.canary_weights == (4, 4)
    off = parse(cfg(reload={"strategy": "rolling"}, analysis={"enabled": False}))
    assert not off.canary_route and "canary" not in upstream(off) and "weight=" not in upstream(off)


def test_blue_green_a_bad_release_is_judged_through_the_canary_and_never_goes_live(tmp_path: Path) -> None:
    host = Host(tmp_path)
    assert host.routes() == {"live": "blue", "canary": "blue"}
    _, failure = host.deploy("bad")
    assert isinstance(failure, traffic.Regression), failure
    assert re.fullmatch(REFUSED.format("blue"), str(failure)), str(failure)
    assert host.routes() == {"live": "blue", "canary": "blue"}
    assert host.sd.running() == ["blue"], "the new colour is stopped"
    assert releases.read(host.app).live.release == host.old_release
    assert host.new_release in releases.read(host.app).refused
    record = host.analysis()
    assert record["verdict"] == "refused" and record["release"] == "2" and record["new"]["5xx"] > 0
    # The canary route weighs 1 against the live route's 2 workers: a third of the requests.
    assert record["share"] == pytest.approx(1 / 3, abs=0.05), record
    assert any(s.startswith("canary open: green serves 1 of every 3 requests beside blue") for s in host.n.statuses)


def test_blue_green_a_slower_release_is_refused_with_the_latency_comparison(tmp_path: Path) -> None:
    host = Host(tmp_path)
    _, failure = host.deploy("slow")
    assert isinstance(failure, traffic.Regression), failure
    assert re.fullmatch(r"release 2 answered slower: p95 [23]\d\d ms, p50 [23]\d\d ms over [\d,]+ requests "
                        r"\(old generation: p95 [\d.]+ ms, p50 [\d.]+ ms over [\d,]+\) during the bake; still serving "
                        r"release 1 \(blue\)", str(failure)), str(failure)
    assert host.routes() == {"live": "blue", "canary": "blue"}


def test_blue_green_a_good_release_passes_then_goes_live_with_the_canary(tmp_path: Path) -> None:
    host = Host(tmp_path)
    summary, failure = host.deploy("good")
    assert failure is None, failure
    assert host.routes() == {"live": "green", "canary": "green"} and host.sd.running() == ["green"]
    assert re.search(r"; traffic passed after [\d.]+ s: new \d+ requests, 5xx 0 %, p95 [\d.]+ ms; old \d+, 5xx 0 %, "
                     r"p95 [\d.]+ ms; canary route to green \(weight 1 of 3\) served \d+ % of the requests$",
                     summary), summary
    assert host.analysis()["verdict"] == "passed" and host.analysis()["new"]["requests"] >= 40


def test_blue_green_a_canary_left_on_the_idle_colour_by_a_killed_deploy_is_taken_back(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fleet().point("canary", "green")  # a deploy SIGKILLed while judging green
    host.traffic = False
    host.behaviour[host.new_release] = "good"
    assert host.fleet().deploy()
    assert host.routes() == {"live": "green", "canary": "green"}


@pytest.mark.parametrize("low_traffic", ["proceed", "refuse"])
def test_blue_green_low_traffic_is_said_and_proceeds_or_refuses(tmp_path: Path, low_traffic: str) -> None:
    host = Host(tmp_path, low_traffic=low_traffic)
    host.traffic = False
    summary, failure = host.deploy("bad")
    if low_traffic == "proceed":
        assert failure is None, failure
        assert "not enough traffic to compare: 0 requests to the new generation" in summary, summary
        assert host.routes()["live"] == "green"
        assert any("proceeding on the health checks alone" in s for s in host.n.statuses), host.n.statuses
    else:
        assert isinstance(failure, Refused), failure
        assert re.fullmatch(r"not enough traffic to compare: 0 requests .* low_traffic = \"refuse\"; still serving "
                            r"release 1 \(blue\)", str(failure)), str(failure)
        assert host.routes() == {"live": "blue", "canary": "blue"} and host.sd.running() == ["blue"]
    assert host.analysis()["verdict"] == "not enough traffic"


def test_rolling_a_bad_release_is_refused_on_its_first_instance_which_goes_back(tmp_path: Path) -> None:
    host = Host(tmp_path, "rolling")
    assert host.routes() == {"1": "1", "2": "2", "3": "3", "canary": "1"}
    _, failure = host.deploy("bad")
    assert isinstance(failure, traffic.Regression), failure
    assert re.fullmatch(REFUSED.format("instances 1, 2, 3"), str(failure)), str(failure)
    fleet = host.fleet()
    assert {i: fleet.pinned(i) for i in host.app.instance_names} == dict.fromkeys("123", host.old_release)
    assert host.routes() == {"1": "1", "2": "2", "3": "3", "canary": "1"}
    assert host.sd.running() == ["1", "2", "3"]
    record = host.analysis()
    # Judged against instances 2 and 3 (2 workers each) while instance 1's own route pointed at 2: 1 of 7.
    assert record["verdict"] == "refused" and record["share"] == pytest.approx(1 / 7, abs=0.04), record
    assert host.new_release in releases.read(host.app).refused


def test_rolling_a_good_release_is_judged_once_then_rolls(tmp_path: Path) -> None:
    host = Host(tmp_path, "rolling")
    summary, failure = host.deploy("good")
    assert failure is None, failure
    fleet = host.fleet()
    assert {i: fleet.pinned(i) for i in host.app.instance_names} == dict.fromkeys("123", host.new_release)
    assert host.routes() == {"1": "1", "2": "2", "3": "3", "canary": "1"}
    assert "canary route to instance 1 (weight 1 of 7)" in summary, summary
    opened = [s for s in host.n.statuses if s.startswith("canary open:")]
    assert opened == [opened[0]] and opened[0].startswith("canary open: 1 serves 1 of every 7 requests beside 2, 3")
