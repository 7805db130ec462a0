"""reloader.traffic on the host: the statistics, the verdicts and their wording, the bake's decisions on a
fake clock over a ready directory, the gunicorn hooks that publish the counters, and the [analysis] keys.
The same in a real systemd under load: tests/test_traffic_verdict.py."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import replace
from fractions import Fraction
from math import comb
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from configbed import cfg, rejected

from reloader import config, releases, traffic
from reloader.config import parse
from reloader.engine import Refused
from reloader.render import render
from reloader.traffic import Analysis, Regression, Stats, compare, fisher_greater, mann_whitney_greater

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flaskapp.toml"


def stats(latencies_ms: list[float], errors: int = 0) -> Stats:
    hist: dict[int, int] = {}
    for value in latencies_ms:
        k = traffic.bucket(value / 1000)
        hist[k] = hist.get(k, 0) + 1
    return Stats(len(latencies_ms), errors, hist)


# --- the statistics -----------------------------------------------------------------------------------------
def test_fisher_one_sided_equals_the_exact_hypergeometric_tail() -> None:
    for a, n1, b, n2 in [(3, 10, 0, 40), (0, 5, 2, 7), (5, 20, 5, 20), (7, 9, 1, 30), (1, 1, 0, 1)]:
        errors, total = a + b, n1 + n2
        exact = sum(Fraction(comb(errors, x) * comb(total - errors, n1 - x), comb(total, n1))
                    for x in range(a, min(errors, n1) + 1))
        assert fisher_greater(a, n1, b, n2) == pytest.approx(float(exact), rel=1e-9), (a, n1, b, n2)
    assert fisher_greater(0, 100, 0, 100) == 1.0
    # Large counts (the issue's example) stay finite and tiny.
    assert fisher_greater(373, 1204, 0, 1187) < 1e-100


def test_rank_test_sees_a_shift_not_a_few_outliers() -> None:
    rng = random.Random(7)
    old = [rng.lognormvariate(math.log(5), 0.4) for _ in range(800)]
    same = [rng.lognormvariate(math.log(5), 0.4) for _ in range(200)]
    slower = [v + 300 for v in same]
    outliers = same[:190] + [1000.0] * 10
    assert mann_whitney_greater(stats(slower).latency, stats(old).latency) < 1e-20
    assert mann_whitney_greater(stats(same).latency, stats(old).latency) > 0.01
    assert mann_whitney_greater(stats(outliers).latency, stats(old).latency) > 0.001
    assert mann_whitney_greater({}, stats(old).latency) == 1.0


def test_percentiles_from_the_log_histogram_are_within_ten_percent() -> None:
    rng = random.Random(3)
    values = sorted(rng.lognormvariate(math.log(20), 1.0) for _ in range(5000))
    s = stats(values)
    for p in (0.5, 0.95, 0.99):
        true = values[math.ceil(p * len(values)) - 1]
        assert s.percentile(p) == pytest.approx(true, rel=0.10), p
    assert Stats().percentile(0.95) == 0.0


def test_window_counts_since_the_snapshot_per_worker() -> None:
    before = {1: stats([5, 5], errors=1), 2: stats([7])}
    after = {1: stats([5, 5, 5, 300], errors=2), 3: stats([9])}  # 2 gone, 3 born
    w = traffic.window(after, before)
    assert (w.requests, w.errors) == (3, 1)
    assert sum(w.latency.values()) == 3


# --- the verdict ----------------------------------------------------------------------------------------------
APP = parse(cfg())


def test_the_issues_error_example_is_refused_in_its_words() -> None:
    new = Stats(1204, 373, stats([5.0] * 1204).latency)
    old = Stats(1187, 0, stats([5.0] * 1187).latency)
    regression = compare("7", new, old, APP, interim=False)
    assert str(regression) == ("release 7 answered 5xx to 31 % of 1,204 requests (old generation: 0 % of 1,187) "
                               "during the bake")


def test_a_slower_release_is_refused_with_both_percentiles() -> None:
    rng = random.Random(1)
    old = stats([rng.uniform(2, 8) for _ in range(400)])
    new = stats([rng.uniform(302, 308) for _ in range(25)])
    regression = compare("8", new, old, APP, interim=True)
    assert isinstance(regression, Regression)
    text = str(regression)
    assert re.fullmatch(r"release 8 answered slower: p95 (2[89]\d|3[0-3]\d) ms, p50 \d+ ms over 25 requests \(old "
                        r"generation: p95 [78]\.\d ms, p50 [4-6]\.\d ms over 400\) during the bake", text), text


@pytest.mark.parametrize("new, old, why", [
    (Stats(200, 3, {}), Stats(800, 8, {}), "1.5 % against 1 %: not significant"),
    (Stats(4, 4, {}), Stats(800, 0, {}), "4 requests are too few to judge"),
    (Stats(5000, 55, {}), Stats(20000, 40, {}), "significant, but below the 1-point margin"),
])
def test_what_is_not_an_error_regression(new: Stats, old: Stats, why: str) -> None:
    assert compare("9", new, old, APP, interim=False) is None, why


def test_a_cold_canary_is_not_judged_slower_on_its_first_requests() -> None:
    """Seen in a loaded test bed: a good release's canary, 0.6 s into the bake, 7 requests at p50 60 ms and p95
    170 ms against the old generation's 21 and 51 ms. Early looks judge the median only, on 20 requests."""
    rng = random.Random(4)
    old = stats([rng.lognormvariate(math.log(21), 0.5) for _ in range(51)])
    cold = stats([30, 45, 55, 60, 70, 150, 170])
    assert compare("6", cold, old, APP, interim=True) is None
    assert compare("6", stats([60.0] * 19 + [170.0]), old, APP, interim=True) is None


def test_slower_but_under_the_floor_or_by_a_few_outliers_is_not_a_regression() -> None:
    rng = random.Random(2)
    old = stats([rng.uniform(2, 8) for _ in range(400)])
    assert compare("9", stats([rng.uniform(20, 40) for _ in range(200)]), old, APP, interim=False) is None
    outliers = stats([rng.uniform(2, 8) for _ in range(180)] + [900.0] * 20)  # p95 jumps; the ranks barely move
    assert compare("9", outliers, old, APP, interim=False) is None


def test_good_releases_are_not_refused_by_repeated_looks() -> None:
    """200 deploys of an unchanged release with a 1 % background error rate and lognormal latencies, each
    looked at 60 times as its canary's requests come in: the interim p-value keeps false refusals rare."""
    rng = random.Random(11)
    refused = 0
    def served(n: int) -> Stats:
        return stats([rng.lognormvariate(math.log(8), 0.6) for _ in range(n)],
                     errors=sum(rng.random() < 0.01 for _ in range(n)))

    for _ in range(200):
        new, old = Stats(), Stats()
        for look in range(60):
            new, old = new + served(5), old + served(20)
            if compare("g", new, old, APP, interim=look < 59):
                refused += 1
                break
    assert refused <= 4, f"{refused} of 200 good releases refused"


# --- the bake's decisions ------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def publish(ready: Path, master: int, worker: int, s: Stats) -> None:
    (ready / str(master)).mkdir(parents=True, exist_ok=True)
    (ready / str(master) / f"stats-{worker}").write_text(json.dumps(
        {"requests": s.requests, "5xx": s.errors, "latency": {str(k): v for k, v in s.latency.items()}}))


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config.AppConfig, "ready_dir", property(lambda self: str(tmp_path)))
    said: list[str] = []

    def make(baseline: dict[int, Stats] | None = None, **analysis: Any) -> Analysis:
        app = parse(cfg(gunicorn={"workers": 4}, analysis=analysis))
        return Analysis(app, "5", 100, 200, canary=1, workers=4, say=said.append, clock=clock, baseline=baseline)

    clock = Clock()
    return SimpleNamespace(ready=tmp_path, clock=clock, make=make, said=said)


def test_a_good_canary_passes_after_bake_seconds_and_min_requests(bed) -> None:
    publish(bed.ready, 100, 101, stats([5.0] * 1000))  # the old generation's history before the window
    a = bed.make(min_requests=50)
    publish(bed.ready, 100, 101, stats([5.0] * 1100))
    publish(bed.ready, 200, 201, stats([5.0] * 60))
    bed.clock.t += 1.0
    assert a.look() is False, "bake_seconds (2) not over yet"
    bed.clock.t += 1.5
    assert a.look() is True and a.verdict == "passed"
    assert a.old_stats.requests == 100 and a.new_stats.requests == 60
    assert a.share == pytest.approx(60 / 160)
    assert a.outcome.startswith("traffic passed after 2.5 s: new 60 requests, 5xx 0 %")
    assert "canary 1 of 4 workers served 38 % of the requests" in a.outcome
    record = a.record()
    assert record["new"]["requests"] == 60 and record["old"]["p95_ms"] > 0 and record["verdict"] == "passed"


def test_the_old_generation_is_counted_from_the_reloads_start_the_share_from_the_canarys(bed) -> None:
    at_start = {101: stats([5.0] * 1000)}
    publish(bed.ready, 100, 101, stats([5.0] * 1400))  # 400 served while the new generation booted
    a = bed.make(baseline=at_start, min_requests=20)
    publish(bed.ready, 100, 101, stats([5.0] * 1480))
    publish(bed.ready, 200, 201, stats([5.0] * 20))
    bed.clock.t += 2.0
    assert a.look() is True
    assert (a.old_stats.requests, a.new_stats.requests, a.share) == (480, 20, 0.2)


def test_a_failing_canary_is_refused_before_bake_seconds(bed) -> None:
    a = bed.make()
    publish(bed.ready, 100, 101, stats([5.0] * 80))
    publish(bed.ready, 200, 201, stats([5.0] * 20, errors=6))
    bed.clock.t += 0.5
    with pytest.raises(Regression, match=r"release 5 answered 5xx to 30 % of 20 requests \(old generation: 0 % of 80"):
        a.look()
    assert a.verdict == "refused"


def test_low_traffic_proceeds_saying_why_or_refuses(bed) -> None:
    a = bed.make()
    publish(bed.ready, 100, 101, stats([5.0] * 8))
    publish(bed.ready, 200, 201, stats([5.0] * 2))
    bed.clock.t += 1.0
    assert a.look() is False
    bed.clock.t += 1.0  # bake_seconds over; at 1 request/s the canary cannot reach 100 within 30 s
    assert a.look() is True and a.verdict == "not enough traffic"
    assert bed.said == ["not enough traffic to compare: 2 requests to the new generation in 2 s ([analysis] "
                        "min_requests = 100); proceeding on the health checks alone"]
    b = bed.make(low_traffic="refuse")
    bed.clock.t += 2.0
    with pytest.raises(Refused, match='not enough traffic to compare: 2 requests .* low_traffic = "refuse"'):
        b.look()


def test_a_slow_canary_under_busy_traffic_is_waited_for_and_judged(bed) -> None:
    """Seen in the test bed: a release adding 300 ms had served 4 requests when bake_seconds were over;
    at its own pace it could not reach min_requests, but the traffic was there: it is slow, not idle."""
    rng = random.Random(5)
    a = bed.make()
    publish(bed.ready, 100, 101, stats([rng.uniform(5, 40) for _ in range(300)]))
    publish(bed.ready, 200, 201, stats([rng.uniform(300, 340) for _ in range(4)]))
    bed.clock.t += 2.0
    assert a.look() is False, "still judging"
    publish(bed.ready, 100, 101, stats([rng.uniform(5, 40) for _ in range(1000)]))
    publish(bed.ready, 200, 201, stats([rng.uniform(300, 340) for _ in range(20)]))
    bed.clock.t += 5.0
    with pytest.raises(Regression, match="answered slower"):
        a.look()


def test_an_old_generation_without_statistics_is_said_not_judged(bed) -> None:
    a = bed.make()
    publish(bed.ready, 200, 201, stats([5.0] * 300))
    bed.clock.t += 2.0
    assert a.look() is True
    assert "published no request statistics" in bed.said[0]


def test_the_analysis_is_recorded_and_kept_across_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.AppConfig, "state_dir", property(lambda self: str(tmp_path)))
    app = parse(cfg())
    releases.record_analysis(app, {"release": "3", "verdict": "passed"})
    releases.record_live(app, releases.Release(str(tmp_path / "3")))
    releases.record_refused(app, str(tmp_path / "4"), "no")
    assert releases.read(app).analysis == {"release": "3", "verdict": "passed"}
    line = traffic.describe({"release": "3", "verdict": "refused", "seconds": 3.1, "share": 0.21, "time": 0,
                             "new": {"requests": 1204, "5xx": 373, "p95_ms": 6.0},
                             "old": {"requests": 1187, "5xx": 0, "p95_ms": 5.1}})
    assert "refused after 3.1 s; new generation 1,204 requests, 5xx 31 %, p95 6.0 ms; old 1,187" in line


# --- the hooks in the rendered gunicorn config -----------------------------------------------------------------
def hooks(app: config.AppConfig, ready: Path) -> dict[str, Any]:
    source = next(f.content for f in render(app) if f.name.endswith(".gunicorn.conf.py"))
    ns: dict[str, Any] = {}
    exec(compile(source, "gunicorn.conf.py", "exec"), ns)
    ns["_READY_DIR"] = str(ready)
    return ns


class SlottedRequest:
    """Like gunicorn's asgi CallbackRequest: __slots__, so a hook cannot add an attribute to it."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


def test_the_hooks_publish_what_the_helper_reads_at_most_every_half_second(tmp_path: Path) -> None:
    ns = hooks(config.load(EXAMPLE), tmp_path)
    writes: list[str] = []
    mark = ns["_mark"]
    ns["_mark"] = lambda master, name, text: (writes.append(name), mark(master, name, text))
    worker = SimpleNamespace(pid=11, ppid=10)
    for i in range(2000):
        req = SimpleNamespace(path="/health" if i % 10 == 0 else "/")
        ns["pre_request"](worker, req)
        ns["post_request"](worker, req, {}, SimpleNamespace(status_code=500 if i % 4 == 1 else 200))
    ns["_PUBLISHED"][0] = 0.0  # as if 0.5 s passed: the next request publishes
    req = SimpleNamespace(path="/")
    ns["pre_request"](worker, req)
    ns["post_request"](worker, req, {}, SimpleNamespace(status_code=None))  # the app raised: gunicorn sends 500
    # gunicorn's asgi worker: resp.status (an int), or no resp at all without its access log.
    for resp in (SimpleNamespace(status=503), SimpleNamespace(status=200), None):
        req = SlottedRequest("/")
        ns["pre_request"](worker, req)
        ns["post_request"](worker, req, None, resp)
    ns["_PUBLISHED"][0] = 0.0
    req = SimpleNamespace(path="/")
    ns["pre_request"](worker, req)
    ns["post_request"](worker, req, {}, SimpleNamespace(status_code=200))
    assert len(writes) <= 4, writes  # not a write per request
    got = traffic.read_workers(tmp_path, 10)[11]
    assert got.requests == 1805 and got.errors == 502
    assert sum(got.latency.values()) == 1805 and got.percentile(0.99) < 50


def test_a_users_post_request_hook_is_chained_whatever_its_arity(tmp_path: Path) -> None:
    hook_file = tmp_path / "hooks.py"
    hook_file.write_text("seen = []\ndef post_request(worker, req):\n    seen.append(req.path)\n")
    app = replace(config.load(EXAMPLE), gunicorn_config_file=str(hook_file))
    ns = hooks(app, tmp_path)
    req = SimpleNamespace(path="/x")
    ns["pre_request"](SimpleNamespace(pid=1, ppid=2), req)
    ns["post_request"](SimpleNamespace(pid=1, ppid=2), req, {}, SimpleNamespace(status_code=200))
    assert ns["_USER"]["seen"] == ["/x"]


def test_without_the_analysis_no_statistics_are_counted(tmp_path: Path) -> None:
    app = replace(config.load(EXAMPLE), analysis=config.AnalysisConfig(enabled=False))
    assert "post_request" not in hooks(app, tmp_path)
    assert app.reload_budget < config.load(EXAMPLE).reload_budget  # no analysis timeout in the budget


# --- the keys ----------------------------------------------------------------------------------------------------
def test_analysis_keys_default_and_parse() -> None:
    a = parse(cfg()).analysis
    assert (a.enabled, a.canary_workers, a.min_requests, a.timeout, a.low_traffic) == (True, 1, 100, 30.0, "proceed")
    a = parse(cfg(gunicorn={"workers": 4}, analysis={"canary_workers": 2, "low_traffic": "refuse",
                                                        "latency_floor_ms": 50})).analysis
    assert (a.canary_workers, a.low_traffic, a.latency_floor_ms) == (2, "refuse", 50.0)


@pytest.mark.parametrize("data, fragment", [
    (cfg(analysis={"low_traffic": "wait"}), "[analysis] low_traffic: 'wait' is not valid: use \"proceed\" or"),
    (cfg(analysis={"canary_workers": 3}), "[analysis] canary_workers: 3 is more than [gunicorn] workers (2)"),
    (cfg(analysis={"error_pvalue": 0.9}), "[analysis] error_pvalue: 0.9 is out of range"),
    (cfg(analysis={"min_request": 10}), "[analysis] min_request: unknown key; did you mean 'min_requests'?"),
    (cfg(analysis={"enabled": "yes"}), "[analysis] enabled: must be true or false"),
    (cfg(analysis={"min_requests": 10}, reload={"strategy": "hup"}),
     "[analysis] min_requests: does not apply to strategy = 'hup'"),
])
def test_analysis_keys_reject_bad_values(data: dict, fragment: str) -> None:
    assert fragment in rejected(data)
