"""Verified by real traffic: during the bake, the new generation is judged against the old one on the
same requests, in the same seconds, and a release that answers more 5xx or answers slower is refused.

Both generations accept on the same socket while the new one bakes, which makes the bake a controlled A/B
experiment for free. The gunicorn config's ``pre_request``/``post_request`` hooks count, per worker and in
memory, the requests it served (``health_path`` excluded), the 5xx among them and a log-scaled latency
histogram, and publish them at most every :data:`PUBLISH_SECONDS` (never a write per request) to

    READY_DIR/MASTER/stats-WORKER   {"requests": int, "5xx": int, "latency": {"BUCKET": count, ...}}

BUCKET is ``int(log2(1 + microseconds) * 4)``: four buckets per doubling, so a percentile read from the
histogram is within ~9 % of the true one. The template (templates/gunicorn.conf.py.j2) writes this format
in the app's virtualenv, where this module cannot be imported: change both together.

The canary (``[analysis] canary_workers``): the new generation's workers load the app behind the gate;
only that many get a ticket (``gate-open-PID``) first, so while it is judged the new release serves about
canary / (workers + canary) of the requests. Once it passed, the gate opens for all.

The verdict (:func:`compare`): the 5xx rate by a one-sided Fisher exact test plus a minimum effect; the
latency by p50 and p95 ratios with an absolute floor, confirmed by a one-sided Mann-Whitney rank test on
the histograms (a few slow outliers do not move it, a shifted distribution does). A regression refuses as
soon as it is significant (interim looks use a stricter p-value), so a bad canary costs few requests; a
pass needs ``bake_seconds`` and ``min_requests``. See docs/traffic-analysis.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import AppConfig
from .engine import Refused

#: How often a worker publishes its counters at most (the template's constants): a canary being judged
#: every 0.1 s, so a bad one is caught after few requests.
PUBLISH_SECONDS = 0.5
CANARY_PUBLISH_SECONDS = 0.1
#: Interim looks (before the pass criteria are met) test at p-value / INTERIM_FACTOR: repeated looks at
#: the same data would otherwise refuse good releases more often than the configured p-value says.
INTERIM_FACTOR = 20
#: Fewer new requests than this are never judged (percentiles and rank tests need a few).
MIN_LOOK = 5
#: Latency is judged early (an interim look) only on this many requests and by the median alone: a new
#: worker's first requests are slower (cold caches, lazy imports), and a tail of a few is noise.
MIN_LATENCY_LOOK = 20
#: How often the bake reads the counters.
LOOK_SECONDS = 0.2
#: Blue-green/rolling: how often a young instance (the one a deploy judges) publishes its counters, and
#: how often the fleet's bake reads them. Its share comes from nginx's weights, not from a worker count, so
#: on a busy site it serves many requests per second: looking sooner costs fewer of them.
FLEET_LOOK_SECONDS = 0.05


class Regression(Refused):
    """The new generation did worse than the old one; the message is the whole sentence, naming the release."""


# --- statistics of one generation ------------------------------------------------------------------------
def bucket(seconds: float) -> int:
    """The histogram bucket of a latency (the template computes the same)."""
    return int(math.log2(1 + seconds * 1e6) * 4)


def bucket_ms(k: int) -> float:
    """A bucket's representative latency in ms: the geometric middle of its bounds."""
    return (2 ** ((k + 0.5) / 4) - 1) / 1000


@dataclass(frozen=True)
class Stats:
    """Requests, 5xx and the latency histogram (bucket → count) of a set of workers."""

    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict) -> Stats:
        return cls(int(doc.get("requests", 0)), int(doc.get("5xx", 0)),
                   {int(k): int(v) for k, v in (doc.get("latency") or {}).items()})

    def __add__(self, other: Stats) -> Stats:
        hist = dict(self.latency)
        for k, v in other.latency.items():
            hist[k] = hist.get(k, 0) + v
        return Stats(self.requests + other.requests, self.errors + other.errors, hist)

    def __sub__(self, other: Stats) -> Stats:
        """What was counted since *other* (an earlier snapshot of the same worker)."""
        hist = {k: v - other.latency.get(k, 0) for k, v in self.latency.items()}
        return Stats(self.requests - other.requests, self.errors - other.errors,
                     {k: v for k, v in hist.items() if v > 0})

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def percentile(self, p: float) -> float:
        """The *p* (0..1) latency percentile in ms, from the histogram (0.0 without requests)."""
        total = sum(self.latency.values())
        if not total:
            return 0.0
        rank, seen = max(1, math.ceil(p * total)), 0
        for k in sorted(self.latency):
            seen += self.latency[k]
            if seen >= rank:
                return bucket_ms(k)
        return bucket_ms(max(self.latency))

    def to_dict(self) -> dict:
        return {"requests": self.requests, "5xx": self.errors, "p50_ms": round(self.percentile(0.5), 1),
                "p95_ms": round(self.percentile(0.95), 1), "p99_ms": round(self.percentile(0.99), 1)}


def read_workers(ready_dir: Path, master: int) -> dict[int, Stats]:
    """The counters each worker of *master* published (cumulative since it booted)."""
    directory = ready_dir / str(master)
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("stats-") and name[6:].isdigit():
            try:
                out[int(name[6:])] = Stats.from_json(json.loads((directory / name).read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                continue  # replaced meanwhile (it is written atomically) or gone with its worker
    return out


#: Where a set of workers publishes: (a ready directory, a master). A generation is one; the instances of
#: blue-green and rolling (each its own runtime directory and master) are one each.
Source = tuple[Path, int]


def read_sources(sources: Sequence[Source]) -> dict[int, Stats]:
    """The counters of every worker of every (ready directory, master) in *sources* (PIDs are unique)."""
    out: dict[int, Stats] = {}
    for directory, master in sources:
        out.update(read_workers(directory, master))
    return out


def window(now: dict[int, Stats], since: dict[int, Stats]) -> Stats:
    """What a generation served between two snapshots; a worker gone meanwhile (and its file with it)
    no longer counts, one born meanwhile counts from zero."""
    total = Stats()
    for pid, stats in now.items():
        total = total + (stats - since.get(pid, Stats()))
    return total


# --- tests ------------------------------------------------------------------------------------------------
def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(a: int, n1: int, b: int, n2: int) -> float:
    """One-sided Fisher exact test: the probability of *a* or more errors among *n1* requests of the new
    generation, if both generations had the same error rate and together made a + b errors in n1 + n2
    requests (the hypergeometric tail). Small: the new generation's rate is really higher."""
    if n1 <= 0 or n2 < 0:
        return 1.0
    total, errors = n1 + n2, a + b
    denominator = _log_comb(total, n1)
    p = 0.0
    for x in range(a, min(errors, n1) + 1):
        p += math.exp(_log_comb(errors, x) + _log_comb(total - errors, n1 - x) - denominator)
    return min(1.0, p)


def mann_whitney_greater(new: dict[int, int], old: dict[int, int]) -> float:
    """One-sided Mann-Whitney U test on two latency histograms: small when the new generation's
    latencies tend to be larger. Ties (one bucket) take their average rank; normal approximation with
    the tie correction and a continuity correction."""
    n1, n2 = sum(new.values()), sum(old.values())
    total = n1 + n2
    if not n1 or not n2:
        return 1.0
    rank_sum, below, ties = 0.0, 0, 0.0
    for k in sorted(set(new) | set(old)):
        t = new.get(k, 0) + old.get(k, 0)
        rank_sum += new.get(k, 0) * (below + (t + 1) / 2)
        below += t
        ties += t ** 3 - t
    u = rank_sum - n1 * (n1 + 1) / 2
    variance = n1 * n2 / 12 * ((total + 1) - ties / (total * (total - 1))) if total > 1 else 0.0
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- the verdict ------------------------------------------------------------------------------------------
def pct(rate: float) -> str:
    """31 %, 0.4 %, 0 %: whole percents, one decimal below 10 %."""
    if rate == 0:
        return "0 %"
    return f"{rate * 100:.1f} %" if rate < 0.1 else f"{rate * 100:.0f} %"


def ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def compare(release: str, new: Stats, old: Stats, app: AppConfig, *, interim: bool) -> Regression | None:
    """The regression the new generation shows against the old one, or None. *interim*: a look before the
    pass criteria are met, held to a stricter p-value (see :data:`INTERIM_FACTOR`)."""
    a = app.analysis
    if new.requests < MIN_LOOK or old.requests < MIN_LOOK:
        return None
    scale = INTERIM_FACTOR if interim else 1
    if (new.error_rate - old.error_rate >= a.error_margin
            and fisher_greater(new.errors, new.requests, old.errors, old.requests) < a.error_pvalue / scale):
        return Regression(f"release {release} answered 5xx to {pct(new.error_rate)} of {new.requests:,} requests "
                          f"(old generation: {pct(old.error_rate)} of {old.requests:,}) during the bake")
    if interim and new.requests < MIN_LATENCY_LOOK:
        return None
    slower = [p for p in ((0.5,) if interim else (0.5, 0.95))
              if new.percentile(p) >= a.latency_ratio * old.percentile(p)
              and new.percentile(p) - old.percentile(p) >= a.latency_floor_ms]
    if slower and mann_whitney_greater(new.latency, old.latency) < a.latency_pvalue / scale:
        return Regression(f"release {release} answered slower: p95 {ms(new.percentile(0.95))}, p50 "
                          f"{ms(new.percentile(0.5))} over {new.requests:,} requests (old generation: p95 "
                          f"{ms(old.percentile(0.95))}, p50 {ms(old.percentile(0.5))} over {old.requests:,}) "
                          "during the bake")
    return None


def summary(new: Stats, old: Stats) -> str:
    """The comparison in one short clause, for STATUS= and the journal."""
    return (f"new {new.requests:,} requests, 5xx {pct(new.error_rate)}, p95 {ms(new.percentile(0.95))}; "
            f"old {old.requests:,}, 5xx {pct(old.error_rate)}, p95 {ms(old.percentile(0.95))}")


class Analysis:
    """The bake's comparison of the new generation (master *new*) with the old one (master *old*).

    ``look()`` is called every :data:`LOOK_SECONDS` of the bake: it raises :class:`Regression` (or
    :class:`Refused` on low traffic with ``low_traffic = "refuse"``) and returns True once the bake may
    end; ``outcome`` is then the verdict's short form and ``record()`` its listing entry."""

    def __init__(self, app: AppConfig, release: str, old: int | Sequence[Source], new: int | Sequence[Source], *,
                 canary: int, workers: int, say: Callable[[str], None], baseline: dict[int, Stats] | None = None,
                 clock: Callable[[], float] = time.monotonic, expected_share: float = 0.0, who: str = "",
                 old_name: str = "") -> None:
        """*old*, *new*: a master in the app's ready directory (strategy "generation"), or the sources of
        several instances (blue-green, rolling). *baseline*: the old side's counters when the reload
        started (see :meth:`measure`). *expected_share*: of all requests, what the new side should get
        (default: canary workers beside the old generation's); *who*: the new side in the outcome (default:
        the canary workers); *old_name*: the old side when it published nothing (default: its master)."""
        self.app, self.release = app, release
        self.canary, self.workers, self.say, self.clock = canary, workers, say, clock
        self.ready_dir = Path(app.ready_dir)
        self.old_sources = [(self.ready_dir, old)] if isinstance(old, int) else list(old)
        self.new_sources = [(self.ready_dir, new)] if isinstance(new, int) else list(new)
        self.old_name = old_name or "the old generation (master " + ", ".join(str(m) for _, m in self.old_sources) + ")"
        self.expected_share = expected_share or canary / (canary + app.workers)
        self.who = who or (f"canary {canary} of {workers} workers" if canary < workers else "new generation")
        self.since_open = read_sources(self.old_sources)
        self.since = self.since_open if baseline is None else baseline
        self.started = clock()
        self.verdict = ""  #: "passed", "refused", "not enough traffic" once decided
        self.outcome = ""
        self.new_stats, self.old_stats = Stats(), Stats()
        self.seconds = 0.0
        self.old_published = True  #: the old generation's workers publish statistics (its config has the hooks)
        self.old_since_open = 0

    @property
    def limit(self) -> float:
        """The longest the bake waits for traffic (AppConfig.bake_limit, which the reload budget counts)."""
        return self.app.bake_limit

    def measure(self) -> tuple[Stats, Stats]:
        """The new generation's requests since its canary opened, against the old generation's since the
        reload started: it served all of them while the new one booted, the same traffic seconds earlier,
        and a larger baseline makes a bad canary significant after fewer of its requests."""
        self.seconds = self.clock() - self.started
        old = read_sources(self.old_sources)
        self.old_published = bool(old)
        self.new_stats = window(read_sources(self.new_sources), {})
        self.old_stats = window(old, self.since)
        self.old_since_open = window(old, self.since_open).requests
        return self.new_stats, self.old_stats

    @property
    def share(self) -> float:
        """The share of the requests the new generation served while its canary was open."""
        served = self.new_stats.requests + self.old_since_open
        return self.new_stats.requests / served if served else 0.0

    def look(self) -> bool:
        a, bake = self.app.analysis, self.app.bake_seconds
        new, old = self.measure()
        enough = new.requests >= a.min_requests and old.requests >= MIN_LOOK
        final = self.seconds >= bake and enough
        # Past bake_seconds, give up on traffic that cannot reach min_requests by the limit: at the pace of
        # all requests times the canary's expected share (canary / (canary + old workers)), or its own if
        # higher. Not at the canary's own pace alone: a slow canary takes fewer requests, which is no
        # reason to stop judging it.
        pace = 0.0
        if self.seconds > 0:
            pace = max(new.requests, (new.requests + self.old_since_open) * self.expected_share) / self.seconds
        hopeless = self.seconds >= bake and new.requests + pace * (self.limit - self.seconds) < a.min_requests
        blind = self.seconds >= bake and not self.old_published and new.requests > 0
        out_of_time = self.seconds >= self.limit or hopeless or blind
        regression = compare(self.release, new, old, self.app, interim=not (final or out_of_time))
        if regression:
            self.decide("refused")
            raise regression
        if final:
            self.decide("passed")
            return True
        if not out_of_time:
            return False
        self.decide("not enough traffic")
        if blind:
            why = (f"not enough traffic to compare: {self.old_name} published no request statistics (it was "
                   "started by a gunicorn config without them; the next deploy compares)")
        else:
            why = (f"not enough traffic to compare: {new.requests:,} request{'s' if new.requests != 1 else ''} "
                   f"to the new generation in {self.seconds:.0f} s ([analysis] min_requests = {a.min_requests})")
        self.outcome = why
        if a.low_traffic == "refuse":
            raise Refused(f"{why}; [analysis] low_traffic = \"refuse\"")
        self.say(f"{why}; proceeding on the health checks alone")
        return True

    def decide(self, verdict: str) -> None:
        self.verdict = verdict
        self.outcome = (f"traffic {verdict} after {self.seconds:.1f} s: {summary(self.new_stats, self.old_stats)}; "
                        f"{self.who} served {pct(self.share)} of the requests")

    def record(self) -> dict:
        """The comparison for releases.json (``reloader releases`` / ``status`` show it)."""
        return {"release": self.release, "verdict": self.verdict, "seconds": round(self.seconds, 1),
                "canary_workers": self.canary, "workers": self.workers, "share": round(self.share, 3),
                "new": self.new_stats.to_dict(), "old": self.old_stats.to_dict(), "time": time.time(),
                "outcome": self.outcome}


def open_canary(ready_dir: Path, master: int, workers: list[int]) -> None:
    """Let only *workers* of the gated *master* accept: their own gate tickets."""
    for pid in workers:
        path = ready_dir / str(master) / f"gate-open-{pid}"
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise Refused(f"cannot open the gate of worker {pid} ({path}): {e.strerror}") from None


def describe(record: dict) -> str:
    """The last deploy's comparison in one line (``reloader releases`` / ``status``)."""
    new, old = record.get("new") or {}, record.get("old") or {}

    def side(s: dict) -> str:
        n = int(s.get("requests", 0))
        rate = int(s.get("5xx", 0)) / n if n else 0.0
        return f"{n:,} requests, 5xx {pct(rate)}, p95 {ms(float(s.get('p95_ms', 0)))}"

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("time", 0))))
    return (f"release {record.get('release')} at {when}: {record.get('verdict')} after {record.get('seconds')} s; "
            f"new generation {side(new)}; old {side(old)}; new share {pct(float(record.get('share', 0)))}")
