"""Stdlib-only HTTP load generator that proves (or disproves) zero failed requests during a deploy.

Why this exists: a zero-downtime reload is only zero-downtime if *every* request a client sends while the
reload happens succeeds.  This module hammers an endpoint from several threads, records the outcome of
every single request (with a monotonic timestamp so it can be lined up with reload events recorded via
:meth:`LoadGenerator.mark`), and reports failures by kind.  Nothing is silently retried: the only retry
performed is the one real HTTP clients (nginx, browsers) do transparently -- re-sending an idempotent
request when a *reused idle* keep-alive connection turns out to have been closed by the server before any
response byte arrived -- and even that is counted in its own, always reported ``keepalive_retries``
counter (or, with ``strict_keepalive``, counted as a failure).

It deliberately imports nothing but the standard library and :mod:`reloader.probe` (stdlib-only too), so
``python3 -m reloader.loadgen`` runs inside minimal containers with only Debian's ``python3``, even when
the rest of the package cannot be imported.

Limitations (stated so nobody over-trusts the numbers): plain HTTP/1.1 only (no TLS), GET only, and the
``timeout`` applies to each socket operation (connect, each read), like ``http.client`` does, not to the
request as a whole.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .probe import CountingSocket, UnixHTTPConnection

__all__ = [
    "HARD_MAX_DURATION",
    "LatencySummary",
    "LoadConfig",
    "LoadGenerator",
    "Record",
    "Report",
    "RequestStats",
    "Snapshot",
    "Target",
    "classify_exception",
    "main",
    "parse_target",
    "percentile",
]

#: Absolute upper bound on a run, so a forgotten generator can never run forever.
HARD_MAX_DURATION = 3600.0
#: Pause after a failed request so a dead server does not turn workers into busy loops.
ERROR_BACKOFF = 0.010
#: Bodies larger than this are not parsed for a ``"version"`` key (they are still read fully).
MAX_VERSION_BODY = 1 << 20
VERSION_HEADER = "X-App-Version"
USER_AGENT = "reloader-loadgen/1"

OK = "ok"
KEEPALIVE_RETRYABLE: tuple[type[BaseException], ...] = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
)


# --------------------------------------------------------------------------------------------------------
# Targets and connections
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where requests go: a TCP ``host:port`` or a unix socket path, plus the request path."""

    path: str
    host: str = "localhost"
    port: int = 80
    unix_socket: str | None = None

    def describe(self) -> str:
        """Render back to the URL syntax accepted by :func:`parse_target` (used in reports)."""
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


def parse_target(url: str) -> Target:
    """Parse ``http://host[:port]/path`` or ``unix:/path/to.sock[:/path]``.

    The unix form mirrors nginx's ``proxy_pass http://unix:/sock:/uri`` so the same string can be used to
    bypass nginx and talk to gunicorn directly.  Socket paths containing ``:`` are not supported.
    """
    if url.startswith("unix:"):
        rest = url[len("unix:"):]
        sock_path, sep, path = rest.partition(":")
        if not sock_path:
            raise ValueError(f"unix URL without socket path: {url!r}")
        path = path if sep and path else "/"
        if not path.startswith("/"):
            raise ValueError(f"unix URL request path must start with '/': {url!r}")
        return Target(path=path, unix_socket=sock_path)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// and unix: URLs are supported, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL without host: {url!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"bad port in URL {url!r}: {exc}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(path=path, host=parts.hostname, port=port)


class _CountingHTTPConnection(http.client.HTTPConnection):
    """TCP ``HTTPConnection`` whose socket is a :class:`CountingSocket`."""

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout, self.source_address)
        sock = CountingSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.settimeout(self.timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock


def _make_connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.unix_socket is not None:
        return UnixHTTPConnection(target.unix_socket, timeout)
    return _CountingHTTPConnection(target.host, target.port, timeout=timeout)


def classify_exception(exc: BaseException) -> str:
    """Map an exception to an outcome kind.  Order matters: ``RemoteDisconnected`` is a reset subclass."""
    if isinstance(exc, http.client.RemoteDisconnected):
        return "remote_disconnected"
    if isinstance(exc, ConnectionRefusedError):
        return "conn_refused"
    if isinstance(exc, ConnectionResetError):
        return "conn_reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"other:{type(exc).__name__}"


def _extract_version(resp: http.client.HTTPResponse, body: bytes) -> str | None:
    header = resp.getheader(VERSION_HEADER)
    if header:
        return header.strip()
    if not body or len(body) > MAX_VERSION_BODY or body.lstrip()[:1] != b"{":
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and "version" in doc and doc["version"] is not None:
        return str(doc["version"])
    return None


# --------------------------------------------------------------------------------------------------------
# Configuration, records, statistics
# --------------------------------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    """What load to generate.  Validated on construction so mistakes surface before a deploy starts."""

    url: str
    concurrency: int = 8
    keepalive_fraction: float = 0.5
    duration: float | None = None
    timeout: float = 10.0
    long_requests: int = 0
    long_path: str = "/slow?s=2"
    request_interval: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    expect_body_contains: str | None = None
    strict_keepalive: bool = False
    max_duration: float = HARD_MAX_DURATION
    max_records: int = 2_000_000

    def __post_init__(self) -> None:
        self.target: Target = parse_target(self.url)
        if not self.long_path.startswith("/"):
            raise ValueError(f"long_path must start with '/': {self.long_path!r}")
        if self.concurrency < 0 or self.long_requests < 0:
            raise ValueError("concurrency and long_requests must be >= 0")
        if self.concurrency + self.long_requests < 1:
            raise ValueError("need at least one worker (concurrency + long_requests >= 1)")
        if not 0.0 <= self.keepalive_fraction <= 1.0:
            raise ValueError("keepalive_fraction must be within 0..1")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")
        if self.request_interval < 0:
            raise ValueError("request_interval must be >= 0")
        if not 0 < self.max_duration <= HARD_MAX_DURATION:
            raise ValueError(f"max_duration must be within (0, {HARD_MAX_DURATION:g}]")
        if self.max_records < 0:
            raise ValueError("max_records must be >= 0")

    @property
    def keepalive_workers(self) -> int:
        """Number of regular workers using persistent connections (round half up)."""
        return min(self.concurrency, math.floor(self.concurrency * self.keepalive_fraction + 0.5))

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "concurrency": self.concurrency,
            "keepalive_fraction": self.keepalive_fraction,
            "keepalive_workers": self.keepalive_workers,
            "duration": self.duration,
            "timeout": self.timeout,
            "long_requests": self.long_requests,
            "long_path": self.long_path,
            "request_interval": self.request_interval,
            "headers": dict(self.headers),
            "expect_body_contains": self.expect_body_contains,
            "strict_keepalive": self.strict_keepalive,
            "max_duration": self.max_duration,
        }


@dataclass(slots=True)
class Record:
    """One request.  ``start`` is ``time.monotonic()``; ``latency`` in seconds includes any retry."""

    start: float
    latency: float
    kind: str
    version: str | None = None
    long: bool = False
    keepalive_retry: bool = False
    status: int | None = None

    @property
    def end(self) -> float:
        return self.start + self.latency

    @property
    def ok(self) -> bool:
        return self.kind == OK


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Exact nearest-rank percentile of already sorted values (``None`` for no values)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class LatencySummary:
    """Latency statistics in milliseconds (``None`` when there were no requests)."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None

    @classmethod
    def from_seconds(cls, latencies: Iterable[float]) -> LatencySummary:
        values = sorted(v * 1000.0 for v in latencies)
        if not values:
            return cls()
        return cls(
            count=len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=values[-1],
            mean=sum(values) / len(values),
        )

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {"count": self.count, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99),
                "max": r(self.max), "mean": r(self.mean)}


@dataclass
class RequestStats:
    """The one tally of request outcomes: the live counters of a run, each side of a :class:`Snapshot`
    and a :class:`Report`, and the stats of any time window.  ``failures`` maps outcome kind to count
    (never includes ``ok``); ``latency`` is summarised from records (see :meth:`from_records`)."""

    total: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    keepalive_retries: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    latency: LatencySummary = field(default_factory=LatencySummary)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> RequestStats:
        stats = cls()
        latencies: list[float] = []
        for rec in records:
            stats.add(rec)
            latencies.append(rec.latency)
        stats.latency = LatencySummary.from_seconds(latencies)
        return stats

    def add(self, rec: Record) -> None:
        """Count *rec* (latencies are summarised separately, from the records)."""
        self.total += 1
        if rec.kind == OK:
            self.ok += 1
        else:
            self.failures[rec.kind] = self.failures.get(rec.kind, 0) + 1
        if rec.keepalive_retry:
            self.keepalive_retries += 1
        if rec.version is not None:
            self.versions[rec.version] = self.versions.get(rec.version, 0) + 1

    def counts(self) -> RequestStats:
        """A copy of the counters without the latency (a snapshot that later requests do not change)."""
        return RequestStats(self.total, self.ok, dict(self.failures), self.keepalive_retries, dict(self.versions))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "failures": dict(sorted(self.failures.items())),
            "keepalive_retries": self.keepalive_retries,
            "versions": dict(sorted(self.versions.items())),
            "latency_ms": self.latency.to_dict(),
        }


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


class _RegularAndLong:
    """Counts over every request, from the ``regular`` and ``long`` :class:`RequestStats` a run keeps
    apart (long requests would skew the regular latency), so ``failed == 0`` covers both."""

    regular: RequestStats
    long: RequestStats

    @property
    def total(self) -> int:
        return self.regular.total + self.long.total

    @property
    def ok(self) -> int:
        return self.regular.ok + self.long.ok

    @property
    def failures(self) -> dict[str, int]:
        return _merge(self.regular.failures, self.long.failures)

    @property
    def failed(self) -> int:
        return self.regular.failed + self.long.failed

    @property
    def keepalive_retries(self) -> int:
        return self.regular.keepalive_retries + self.long.keepalive_retries

    @property
    def versions(self) -> dict[str, int]:
        return _merge(self.regular.versions, self.long.versions)


@dataclass(frozen=True)
class Snapshot(_RegularAndLong):
    """Point-in-time counters of a running generator (cheap; no latency math)."""

    regular: RequestStats
    long: RequestStats
    in_flight: int
    elapsed: float


_WHICH = ("all", "regular", "long")


@dataclass
class Report(_RegularAndLong):
    """Final result of a run.

    ``total``/``ok``/``failures`` cover *every* request, regular and long, so ``failed == 0`` really
    means nothing failed.  Requests still unfinished when :meth:`LoadGenerator.stop` gave up waiting are
    counted as failures of kind ``unfinished`` (an unknown outcome is not a success).  ``latency`` is for
    regular requests only; long requests have their own stats in ``long``.
    """

    url: str
    config: dict[str, Any]
    started: float
    ended: float
    started_wall: float
    strict_keepalive: bool
    regular: RequestStats
    long: RequestStats
    marks: list[tuple[str, float]]
    records_dropped: int = 0
    records: list[Record] = field(default_factory=list, repr=False)

    @classmethod
    def from_records(cls, records: list[Record], *, url: str = "", started: float = 0.0, ended: float = 0.0,
                     marks: Sequence[tuple[str, float]] = (), config: dict[str, Any] | None = None) -> Report:
        """A report of *records* alone (e.g. saved with ``--records``, or built by a test)."""
        return cls(url=url, config=dict(config or {}), started=started, ended=ended, started_wall=0.0,
                   strict_keepalive=bool((config or {}).get("strict_keepalive")),
                   regular=RequestStats.from_records(r for r in records if not r.long),
                   long=RequestStats.from_records(r for r in records if r.long), marks=list(marks),
                   records=list(records))

    @property
    def latency(self) -> LatencySummary:
        return self.regular.latency

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    def _select(self, which: str) -> Iterable[Record]:
        if which not in _WHICH:
            raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
        if which == "all":
            return self.records
        want_long = which == "long"
        return (r for r in self.records if r.long == want_long)

    def window(self, start: float, end: float, which: str = "all") -> RequestStats:
        """Stats for requests that *started* within ``[start, end]`` (monotonic seconds, inclusive).

        Use with :meth:`mark` timestamps, e.g. ``report.window(report.mark_time("reload-start"), ...)``.
        ``which`` selects "all", "regular" or "long" requests (mixing them skews latency percentiles).
        """
        return self.windows([(start, end)], which)

    def windows(self, spans: Iterable[tuple[float, float]], which: str = "all") -> RequestStats:
        """Stats for requests that started within any of *spans* (e.g. every reload of a run)."""
        spans = list(spans)
        return RequestStats.from_records(r for r in self._select(which)
                                         if any(start <= r.start <= end for start, end in spans))

    def first_seen(self, version: str, after: float = float("-inf"), which: str = "all") -> float | None:
        """Monotonic time the first response carrying ``version`` *completed* at or after ``after``."""
        ends = [r.end for r in self._select(which) if r.version == version and r.end >= after]
        return min(ends) if ends else None

    def last_seen(self, version: str, before: float = float("inf"), which: str = "all") -> float | None:
        """Monotonic time the last response carrying ``version`` completed at or before ``before``."""
        ends = [r.end for r in self._select(which) if r.version == version and r.end <= before]
        return max(ends) if ends else None

    def time_to_version(self, version: str, after: float) -> float | None:
        """Seconds from ``after`` (e.g. the reload-start mark) until ``version`` was first served."""
        seen = self.first_seen(version, after=after)
        return None if seen is None else seen - after

    @property
    def exposes_version(self) -> bool:
        """Some response named the version it was served by (header or JSON ``"version"``)."""
        return any(r.version is not None for r in self.records)

    def version_before(self, t: float) -> str | None:
        """The version of the last successful response that completed at or before *t*."""
        best: Record | None = None
        for r in self.records:
            if r.ok and r.version is not None and r.end <= t and (best is None or r.end > best.end):
                best = r
        return None if best is None else best.version

    def first_other_version(self, old: str | None, after: float) -> tuple[str, float] | None:
        """(version, completion time) of the first successful response completed at or after *after*
        whose version is not *old*: when a deploy's new code first answered."""
        best: Record | None = None
        for r in self.records:
            if (r.ok and r.version is not None and r.version != old and r.end >= after
                    and (best is None or r.end < best.end)):
                best = r
        return None if best is None or best.version is None else (best.version, best.end)

    def mark_time(self, label: str, last: bool = False) -> float | None:
        """Timestamp of the first (or last) mark with ``label``."""
        times = [t for name, t in self.marks if name == label]
        if not times:
            return None
        return times[-1] if last else times[0]

    def failure_records(self, limit: int | None = None) -> list[Record]:
        failed = [r for r in self.records if r.kind != OK]
        return failed if limit is None else failed[:limit]

    def first_failures(self, limit: int = 50) -> list[dict[str, Any]]:
        """The first failed requests, for a report: when (seconds after the start), how long, what."""
        return [{"start_rel": round(r.start - self.started, 6), "latency_ms": round(r.latency * 1000, 3),
                 "kind": r.kind, "long": r.long, "status": r.status}
                for r in self.failure_records(limit=limit)]

    def to_dict(self, include_records: bool = False) -> dict[str, Any]:
        rel = self.started

        def t(v: float | None) -> float | None:
            return None if v is None else round(v - rel, 6)

        doc: dict[str, Any] = {
            "url": self.url,
            "config": self.config,
            "started_monotonic": self.started,
            "ended_monotonic": self.ended,
            "started_wall": self.started_wall,
            "duration_s": round(self.duration, 6),
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "failures": dict(sorted(self.failures.items())),
            "keepalive_retries": self.keepalive_retries,
            "strict_keepalive": self.strict_keepalive,
            "requests_per_s": round(self.total / self.duration, 3) if self.duration > 0 else None,
            "latency_ms": self.latency.to_dict(),
            "regular": self.regular.to_dict(),
            "long": self.long.to_dict(),
            "versions": {
                v: {"count": n, "first_seen_rel": t(self.first_seen(v)),
                    "last_seen_rel": t(self.last_seen(v))}
                for v, n in sorted(self.versions.items())
            },
            "marks": [{"label": name, "t": ts, "rel": t(ts)} for name, ts in self.marks],
            "records_dropped": self.records_dropped,
            "first_failures": self.first_failures(50),
            "summary": self.summary_line(),
        }
        if include_records:
            doc["records"] = [
                {"start": r.start, "latency": r.latency, "kind": r.kind, "version": r.version,
                 "long": r.long, "keepalive_retry": r.keepalive_retry, "status": r.status}
                for r in self.records
            ]
        return doc

    def to_json(self, indent: int | None = 2, include_records: bool = False) -> str:
        return json.dumps(self.to_dict(include_records=include_records), indent=indent, sort_keys=False)

    def summary_line(self) -> str:
        """One human-readable line; failures and keep-alive retries are always shown, even when zero."""

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}ms"

        rate = self.total / self.duration if self.duration > 0 else 0.0
        fails = ",".join(f"{k}={v}" for k, v in sorted(self.failures.items())) or "none"
        parts = [
            f"{'FAIL' if self.failed else 'OK'} {self.url}: {self.total} requests in {self.duration:.1f}s "
            f"({rate:.1f}/s), ok={self.ok} failed={self.failed} [{fails}] "
            f"keepalive_retries={self.keepalive_retries}{' (strict)' if self.strict_keepalive else ''}",
            f"p50={ms(self.latency.p50)} p90={ms(self.latency.p90)} p99={ms(self.latency.p99)} "
            f"max={ms(self.latency.max)}",
        ]
        if self.long.total or self.config.get("long_requests"):
            parts.append(f"long {self.long.ok}/{self.long.total} ok")
        if self.versions:
            parts.append("versions " + ",".join(f"{v}={n}" for v, n in sorted(self.versions.items())))
        if self.records_dropped:
            parts.append(f"records_dropped={self.records_dropped}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------


class LoadGenerator:
    """Runs worker threads against ``config.url`` and collects every outcome.

    Lifecycle: :meth:`start` → (optionally :meth:`mark` / :meth:`snapshot`) → :meth:`stop`, or just
    :meth:`run`.  Workers stop by themselves at ``duration`` or ``max_duration`` (hard bound), so a
    generator that is never stopped still cannot run away.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self._target = config.target
        self._long_path = config.long_path
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._records: list[Record] = []
        self._dropped = 0
        # The authoritative counts (they survive record truncation); latency comes from the records.
        self._regular, self._long = RequestStats(), RequestStats()
        self._in_flight = 0
        self._marks: list[tuple[str, float]] = []
        self._started: float | None = None
        self._started_wall = 0.0
        self._deadline = 0.0
        self._closed = False
        self._report: Report | None = None
        self._stop_lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------------------

    @property
    def started(self) -> float | None:
        return self._started

    def start(self) -> None:
        """Start the worker threads (daemon threads, so they never keep a process alive)."""
        if self._started is not None:
            raise RuntimeError("LoadGenerator can only be started once")
        cfg = self.config
        self._started = time.monotonic()
        self._started_wall = time.time()
        limit = cfg.max_duration if cfg.duration is None else min(cfg.duration, cfg.max_duration)
        self._deadline = self._started + limit
        n_keepalive = cfg.keepalive_workers
        for i in range(cfg.concurrency):
            self._spawn(f"loadgen-{i}", keepalive=i < n_keepalive, path=self._target.path, long=False)
        for i in range(cfg.long_requests):
            # Long workers use a fresh connection per request: what matters is that an in-flight
            # request survives the reload, not connection reuse.
            self._spawn(f"loadgen-long-{i}", keepalive=False, path=self._long_path, long=True)

    def mark(self, label: str) -> float:
        """Record an event (e.g. "reload-start") on the same monotonic clock as requests; returns it."""
        ts = time.monotonic()
        with self._lock:
            self._marks.append((label, ts))
        return ts

    def snapshot(self) -> Snapshot:
        """Counters so far; safe to call from any thread while running."""
        with self._lock:
            return Snapshot(
                regular=self._regular.counts(),
                long=self._long.counts(),
                in_flight=self._in_flight,
                elapsed=0.0 if self._started is None else time.monotonic() - self._started,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run's deadline, a stop request, or ``timeout``; True if the run is over."""
        if self._started is None:
            raise RuntimeError("not started")
        remaining = self._deadline - time.monotonic()
        if timeout is not None:
            remaining = min(remaining, timeout)
        if remaining > 0:
            self._stop_event.wait(remaining)
        return self._stop_event.is_set() or time.monotonic() >= self._deadline

    def stop(self, join_timeout: float | None = None) -> Report:
        """Stop workers, wait for in-flight requests (at most ``join_timeout``), and build the report.

        Idempotent: later calls return the same report.  Default ``join_timeout`` is ``timeout + 2`` s, so
        a request only goes unfinished if it exceeded its own timeout; such requests count as failures.
        """
        with self._stop_lock:
            if self._report is not None:
                return self._report
            if self._started is None:
                raise RuntimeError("not started")
            self._stop_event.set()
            limit = self.config.timeout + 2.0 if join_timeout is None else join_timeout
            join_deadline = time.monotonic() + limit
            for th in self._threads:
                th.join(max(0.0, join_deadline - time.monotonic()))
            ended = time.monotonic()
            with self._lock:
                self._closed = True
                self._report = self._build_report(ended)
            return self._report

    def run(self) -> Report:
        """Start, block until ``duration`` (or :meth:`stop` from another thread / hard max), return report."""
        self.start()
        while not self.wait(1.0):
            pass
        return self.stop()

    # -- internals -------------------------------------------------------------------------------------

    def _spawn(self, name: str, keepalive: bool, path: str, long: bool) -> None:
        th = threading.Thread(target=self._worker, args=(keepalive, path, long), name=name, daemon=True)
        self._threads.append(th)
        th.start()

    def _should_run(self) -> bool:
        return not self._stop_event.is_set() and time.monotonic() < self._deadline

    def _worker(self, keepalive: bool, path: str, long: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while self._should_run():
                with self._lock:
                    self._in_flight += 1
                try:
                    rec, conn = self._one_request(conn, keepalive, path, long)
                except BaseException as exc:  # never lose a request, even on a bug in our own code
                    rec = Record(time.monotonic(), 0.0, f"other:{type(exc).__name__}", long=long)
                    conn = _close(conn)
                self._record(rec)
                if not rec.ok:
                    conn = _close(conn)
                    self._stop_event.wait(ERROR_BACKOFF)
                elif self.config.request_interval > 0:
                    self._stop_event.wait(self.config.request_interval)
        finally:
            _close(conn)

    def _record(self, rec: Record) -> None:
        with self._lock:
            # Decrement and count atomically, so a request is either in the report or "unfinished".
            self._in_flight -= 1
            if self._closed:  # finished after the report was built; it was counted as "unfinished"
                return
            (self._long if rec.long else self._regular).add(rec)
            if len(self._records) < self.config.max_records:
                self._records.append(rec)
            else:
                self._dropped += 1

    def _one_request(
        self, conn: http.client.HTTPConnection | None, keepalive: bool, path: str, long: bool
    ) -> tuple[Record, http.client.HTTPConnection | None]:
        cfg = self.config
        start = time.monotonic()
        retried = False
        try:
            if conn is None:
                conn = _make_connection(self._target, cfg.timeout)
            reused = conn.sock is not None
            if not reused:
                conn.connect()
            sock = conn.sock
            before = getattr(sock, "bytes_received", 0)
            try:
                status, version, body = self._exchange(conn, path, keepalive)
            except KEEPALIVE_RETRYABLE:
                silent = reused and getattr(sock, "bytes_received", 0) == before
                if not silent or cfg.strict_keepalive:
                    raise
                # The server closed an idle persistent connection; nginx and browsers re-send an
                # idempotent request on a new connection here.  We do too -- once -- and count it.
                retried = True
                conn.close()
                conn.connect()
                status, version, body = self._exchange(conn, path, keepalive)
        except Exception as exc:
            return Record(start, time.monotonic() - start, classify_exception(exc), long=long,
                          keepalive_retry=retried), _close(conn)
        latency = time.monotonic() - start
        if 200 <= status < 400:
            kind = OK
            expect = cfg.expect_body_contains
            if not long and expect is not None and expect.encode() not in body:
                kind = "body_mismatch"
        else:
            kind = f"http_{status}"
        if not keepalive:
            conn = _close(conn)
        return Record(start, latency, kind, version=version, long=long, keepalive_retry=retried,
                      status=status), conn

    def _exchange(self, conn: http.client.HTTPConnection, path: str, keepalive: bool
                  ) -> tuple[int, str | None, bytes]:
        headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
        if not keepalive:
            headers["Connection"] = "close"
        headers.update(self.config.headers)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, _extract_version(resp, body), body

    def _build_report(self, ended: float) -> Report:
        assert self._started is not None
        reg, lng = self._regular.counts(), self._long.counts()
        reg.latency = LatencySummary.from_seconds(r.latency for r in self._records if not r.long)
        lng.latency = LatencySummary.from_seconds(r.latency for r in self._records if r.long)
        unfinished = self._in_flight
        if unfinished:
            reg.failures["unfinished"] = reg.failures.get("unfinished", 0) + unfinished
            reg.total += unfinished
        return Report(
            url=self.config.url,
            config=self.config.to_dict(),
            started=self._started,
            ended=ended,
            started_wall=self._started_wall,
            strict_keepalive=self.config.strict_keepalive,
            regular=reg,
            long=lng,
            marks=list(self._marks),
            records_dropped=self._dropped,
            records=list(self._records),
        )


def _close(conn: http.client.HTTPConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    return None


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m reloader.loadgen",
        description="HTTP load generator that counts every failed request (exit 0: none failed, "
                    "1: failures or no requests at all, 2: usage error).",
    )
    p.add_argument("url", help="http://host:port/path or unix:/path/to.sock:/path")
    p.add_argument("--concurrency", "-c", type=int, default=8)
    p.add_argument("--keepalive-fraction", type=float, default=0.5)
    p.add_argument("--duration", "-d", type=float, default=None, help="seconds (default: until stopped)")
    p.add_argument("--max-duration", type=float, default=HARD_MAX_DURATION)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--long", type=int, default=0, dest="long_requests", help="extra long-request workers")
    p.add_argument("--long-path", default="/slow?s=2")
    p.add_argument("--interval", type=float, default=0.0, help="sleep between requests per worker")
    p.add_argument("--header", "-H", action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--expect-body", default=None, help="substring every 2xx/3xx body must contain")
    p.add_argument("--strict-keepalive", action="store_true",
                   help="count server-closed idle keep-alive connections as failures instead of retrying")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a summary line")
    p.add_argument("--until-file", default=None, help="run until this path exists, then report as JSON")
    p.add_argument("--out", default=None, help="write the JSON report to this file (atomically)")
    p.add_argument("--records", action="store_true", help="include every request record in the JSON")
    return p


def _parse_headers(parser: argparse.ArgumentParser, raw: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"bad --header {item!r}, expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 no failures, 1 failures or zero requests, 2 usage)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        config = LoadConfig(
            url=args.url,
            concurrency=args.concurrency,
            keepalive_fraction=args.keepalive_fraction,
            duration=args.duration,
            timeout=args.timeout,
            long_requests=args.long_requests,
            long_path=args.long_path,
            request_interval=args.interval,
            headers=_parse_headers(parser, args.header),
            expect_body_contains=args.expect_body,
            strict_keepalive=args.strict_keepalive,
            max_duration=args.max_duration,
        )
    except ValueError as exc:
        parser.error(str(exc))

    gen = LoadGenerator(config)
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    gen.start()
    while not stop_requested.is_set():
        if args.until_file is not None and os.path.exists(args.until_file):
            break
        if gen.wait(0.05):
            break
    report = gen.stop()

    as_json = args.json or args.until_file is not None or args.out is not None
    if as_json:
        text = report.to_json(include_records=args.records)
        if args.out:
            _write_atomic(args.out, text)
        else:
            print(text, flush=True)
        print(report.summary_line(), file=sys.stderr, flush=True)
    else:
        print(report.summary_line(), flush=True)
    if report.total == 0:
        print("loadgen: no requests completed; nothing was proven", file=sys.stderr, flush=True)
        return 1
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
