"""Host-only tests for :mod:`reloader.loadgen` against in-process ``http.server`` servers.

Why: the load generator is the instrument that proves "zero failed requests" during a reload, so the
instrument itself must be proven to count honestly -- successes, HTTP errors, refused connections,
server-closed keep-alive connections -- before any deploy result built on it can be trusted.
Every test is bounded: waits poll a condition against a deadline instead of sleeping blindly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from reloader.loadgen import (
    LatencySummary,
    LoadConfig,
    LoadGenerator,
    Record,
    Report,
    RequestStats,
    Snapshot,
    parse_target,
    percentile,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RETRYABLE_KINDS = {"remote_disconnected", "conn_reset", "other:BrokenPipeError"}


# --------------------------------------------------------------------------------------------------------
# Test servers
# --------------------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    """Knobs shared between a test and its server's handler threads."""

    version: str = "v1"
    fail: bool = False
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """Routes: ``/`` JSON version, ``/slow?s=N``, ``/500``, ``/drop`` (close keep-alive after response
    without announcing it), ``/hangup`` (close without any response), ``/partial`` (truncated body),
    ``/header`` (version in ``X-App-Version`` only)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _version_body(self) -> bytes:
        return json.dumps({"version": self.server.state.version}).encode()  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        with state.lock:
            state.requests += 1
        url = urlsplit(self.path)
        if url.path == "/":
            if state.fail:
                self._send(500, b'{"error": "fail"}')
            else:
                self._send(200, self._version_body())
        elif url.path == "/slow":
            time.sleep(float(parse_qs(url.query).get("s", ["0.3"])[0]))
            self._send(200, self._version_body())
        elif url.path == "/500":
            self._send(500, b'{"error": "boom"}')
        elif url.path == "/drop":
            self._send(200, self._version_body())
            self.close_connection = True  # closes after the response, but told the client keep-alive
        elif url.path == "/hangup":
            self.close_connection = True
        elif url.path == "/partial":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            self.close_connection = True
        elif url.path == "/header":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("X-App-Version", state.version)
            self.end_headers()
            self.wfile.write(b"hi")
        else:
            self._send(404, b"{}")


@dataclass
class Server:
    url: str
    state: ServerState
    _srv: socketserver.BaseServer
    _thread: threading.Thread
    _stopped: bool = False

    def stop(self) -> None:
        """Stop accepting: the listening socket is closed, so new connections are refused."""
        if not self._stopped:
            self._stopped = True
            self._srv.shutdown()
            self._srv.server_close()
            self._thread.join(5)


def _serve(srv: socketserver.BaseServer, url: str, state: ServerState) -> Server:
    srv.state = state  # type: ignore[attr-defined]
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    return Server(url=url, state=state, _srv=srv, _thread=th)


@pytest.fixture
def server() -> Iterator[Server]:
    state = ServerState()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    s = _serve(srv, f"http://127.0.0.1:{srv.server_address[1]}", state)
    try:
        yield s
    finally:
        s.stop()


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@pytest.fixture
def unix_server() -> Iterator[Server]:
    tmp = tempfile.mkdtemp(prefix="lg-", dir="/tmp")  # short path: sun_path is limited to 108 bytes
    path = os.path.join(tmp, "app.sock")
    srv = _UnixHTTPServer(path, Handler)
    s = _serve(srv, f"unix:{path}", ServerState())
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` until true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def run_until(cfg: LoadConfig, pred: Callable[[Snapshot], bool], timeout: float = 5.0,
              between: Callable[[LoadGenerator], None] | None = None) -> Report:
    """Start a generator, wait until ``pred(snapshot)``, stop it and return the report."""
    gen = LoadGenerator(cfg)
    gen.start()
    try:
        wait_until(lambda: pred(gen.snapshot()), timeout, what=f"{cfg.url}: {pred.__doc__ or 'snapshot'}")
        if between is not None:
            between(gen)
    finally:
        report = gen.stop()
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------
# Pure units
# --------------------------------------------------------------------------------------------------------


def test_parse_target() -> None:
    t = parse_target("http://127.0.0.1:8080/health?x=1")
    assert (t.host, t.port, t.path, t.unix_socket) == ("127.0.0.1", 8080, "/health?x=1", None)
    assert parse_target("http://example").port == 80
    assert parse_target("http://example").path == "/"
    u = parse_target("unix:/run/app/gunicorn.sock:/api/v")
    assert (u.unix_socket, u.path) == ("/run/app/gunicorn.sock", "/api/v")
    assert parse_target("unix:/run/app.sock").path == "/"
    assert parse_target("unix:/run/app.sock:").path == "/"
    for bad in ("https://x/", "ftp://x/", "unix:", "http:///nohost", "unix:/s.sock:nopath"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        LoadConfig("http://x/", keepalive_fraction=1.5)
    with pytest.raises(ValueError):
        LoadConfig("http://x/", concurrency=0)
    with pytest.raises(ValueError):
        LoadConfig("http://x/", timeout=0)
    with pytest.raises(ValueError):
        LoadConfig("http://x/", max_duration=10_000)
    with pytest.raises(ValueError):
        LoadConfig("http://x/", long_path="slow")
    assert LoadConfig("http://x/", concurrency=8, keepalive_fraction=0.5).keepalive_workers == 4
    assert LoadConfig("http://x/", concurrency=1, keepalive_fraction=0.5).keepalive_workers == 1
    assert LoadConfig("http://x/", concurrency=3, keepalive_fraction=0.0).keepalive_workers == 0


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 90) == 9.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 100) == 10.0
    assert percentile(values, 0) == 1.0
    assert percentile([], 50) is None
    s = LatencySummary.from_seconds([0.003, 0.001, 0.002])
    assert (s.count, s.p50, s.max) == (3, 2.0, 3.0)


def _synthetic_report(records: list[Record]) -> Report:
    return Report.from_records(records, url="http://x/", started=100.0, ended=110.0,
                               marks=[("reload-start", 103.0), ("reload-end", 105.0)])


def test_window_and_first_seen_exact() -> None:
    records = [
        Record(101.0, 0.010, "ok", version="v1"),
        Record(103.0, 0.020, "ok", version="v1"),  # on the window start: included
        Record(104.0, 0.500, "conn_refused"),
        Record(104.5, 0.040, "ok", version="v2", keepalive_retry=True),
        Record(105.0, 0.030, "http_502"),  # on the window end: included
        Record(106.0, 0.010, "ok", version="v2"),
    ]
    report = _synthetic_report(records)
    w = report.window(report.mark_time("reload-start") or 0, report.mark_time("reload-end") or 0)
    assert (w.total, w.ok, w.failed, w.keepalive_retries) == (4, 2, 2, 1)
    assert w.failures == {"conn_refused": 1, "http_502": 1}
    assert w.latency.p50 == pytest.approx(30.0)
    assert w.latency.max == pytest.approx(500.0)
    assert report.window(105.5, 200).failed == 0
    assert report.first_seen("v2", after=103.0) == pytest.approx(104.54)
    assert report.time_to_version("v2", 103.0) == pytest.approx(1.54)
    assert report.last_seen("v1") == pytest.approx(103.02)
    assert report.first_seen("v3") is None
    assert report.failed == 2
    doc = json.loads(report.to_json(include_records=True))
    assert doc["failed"] == 2 and len(doc["records"]) == 6
    assert doc["versions"]["v2"]["first_seen_rel"] == pytest.approx(4.54)
    line = report.summary_line()
    assert line.startswith("FAIL") and "conn_refused=1" in line and "keepalive_retries=1" in line


def test_regular_and_long_are_one_tally_each_and_add_up() -> None:
    records = [
        Record(101.0, 0.010, "ok", version="v1"),
        Record(101.5, 2.000, "ok", version="v1", long=True),
        Record(103.0, 0.020, "conn_reset", keepalive_retry=True),
        Record(104.0, 2.500, "http_502", long=True),
        Record(106.0, 0.010, "ok", version="v2"),
        Record(107.0, 0.010, "ok", version="v2", long=True),
    ]
    report = _synthetic_report(records)
    assert isinstance(report.regular, RequestStats) and isinstance(report.long, RequestStats)
    assert (report.regular.total, report.long.total, report.total) == (3, 3, 6)
    assert report.failures == {"conn_reset": 1, "http_502": 1} and report.failed == 2
    assert report.versions == {"v1": 2, "v2": 2} and report.keepalive_retries == 1
    assert report.latency.max == pytest.approx(20.0)  # the regular requests' only
    both = report.windows([(100.0, 101.2), (105.0, 106.5)], "regular")
    assert (both.total, both.ok, both.versions) == (2, 2, {"v1": 1, "v2": 1})
    assert report.version_before(105.0) == "v1"  # the long v1 response completed at 103.5
    assert report.first_other_version("v1", 104.0) == ("v2", pytest.approx(106.01))
    assert report.first_other_version("v2", 104.0) is None
    doc = report.to_dict()
    assert (doc["total"], doc["regular"]["total"], doc["long"]["failed"]) == (6, 3, 1)
    assert [f["kind"] for f in report.first_failures()] == ["conn_reset", "http_502"]


# --------------------------------------------------------------------------------------------------------
# Against live servers
# --------------------------------------------------------------------------------------------------------


def test_all_ok(server: Server) -> None:
    cfg = LoadConfig(server.url + "/", concurrency=4, keepalive_fraction=0.5, timeout=5)
    report = run_until(cfg, lambda s: s.total >= 200)
    assert report.total >= 200
    assert report.failed == 0 and report.failures == {}
    assert report.ok == report.total
    assert report.keepalive_retries == 0
    assert report.versions == {"v1": report.total}
    assert report.latency.p50 is not None and report.latency.max is not None
    assert report.latency.p50 <= report.latency.p90 <= report.latency.p99 <= report.latency.max
    assert report.summary_line().startswith("OK ")
    assert json.loads(report.to_json())["failed"] == 0


def test_http_500_counted(server: Server) -> None:
    report = run_until(LoadConfig(server.url + "/500", concurrency=2), lambda s: s.total >= 20)
    assert report.ok == 0
    assert report.failures == {"http_500": report.total}
    assert report.failed == report.total >= 20


def test_server_stop_yields_conn_refused(server: Server) -> None:
    def stop_server(gen: LoadGenerator) -> None:
        server.stop()
        wait_until(lambda: gen.snapshot().failures.get("conn_refused", 0) >= 5, what="conn_refused")

    cfg = LoadConfig(server.url + "/", concurrency=4, keepalive_fraction=0.5, timeout=2)
    report = run_until(cfg, lambda s: s.ok >= 50, between=stop_server)
    assert report.ok >= 50
    assert report.failures.get("conn_refused", 0) >= 5
    assert report.failed == sum(report.failures.values())
    assert report.total == report.ok + report.failed


def test_errors_do_not_spin() -> None:
    """Against a closed port every request fails instantly; the 10 ms backoff must bound the rate."""
    cfg = LoadConfig(f"http://127.0.0.1:{free_port()}/", concurrency=2, duration=0.5)
    report = LoadGenerator(cfg).run()
    assert report.failures.get("conn_refused", 0) == report.total > 0
    assert report.total < 2 * 0.5 / 0.010 * 1.5 + 10


def test_version_switch_first_seen(server: Server) -> None:
    marks: dict[str, float] = {}

    def switch(gen: LoadGenerator) -> None:
        marks["switch"] = gen.mark("switch")
        server.state.version = "v2"
        wait_until(lambda: gen.snapshot().versions.get("v2", 0) >= 20, what="v2 served")

    cfg = LoadConfig(server.url + "/", concurrency=3)
    report = run_until(cfg, lambda s: s.versions.get("v1", 0) >= 20, between=switch)
    t = marks["switch"]
    assert report.mark_time("switch") == t
    first_v2 = report.first_seen("v2", after=t)
    assert first_v2 is not None and first_v2 >= t
    assert report.first_seen("v2") == first_v2  # v2 was never served before the switch
    assert report.first_seen("v1", after=report.ended) is None
    ttv = report.time_to_version("v2", t)
    assert ttv is not None and 0 <= ttv < 5
    assert report.versions["v1"] >= 20 and report.versions["v2"] >= 20
    assert report.failed == 0


def test_window_stats_live(server: Server) -> None:
    marks: dict[str, float] = {}

    def fail_for_a_while(gen: LoadGenerator) -> None:
        server.state.fail = True
        marks["fail-on"] = gen.mark("fail-on")
        wait_until(lambda: gen.snapshot().failures.get("http_500", 0) >= 20, what="500s")
        marks["fail-on-end"] = gen.mark("fail-on-end")
        server.state.fail = False
        marks["fail-off"] = gen.mark("fail-off")
        n = gen.snapshot().ok
        wait_until(lambda: gen.snapshot().ok >= n + 50, what="recovery")

    cfg = LoadConfig(server.url + "/", concurrency=3)
    report = run_until(cfg, lambda s: s.ok >= 20, between=fail_for_a_while)
    during = report.window(marks["fail-on"], marks["fail-on-end"])
    assert during.failures.get("http_500", 0) >= 10
    assert set(during.failures) == {"http_500"}
    after = report.window(marks["fail-off"], float("inf"))
    assert after.total >= 50 and after.failed == 0
    everything = report.window(float("-inf"), float("inf"))
    assert (everything.total, everything.failed) == (report.total, report.failed)


def test_keepalive_server_close_is_counted_as_retry(server: Server) -> None:
    """/drop closes every persistent connection after one response without saying so."""
    cfg = LoadConfig(server.url + "/drop", concurrency=2, keepalive_fraction=1.0)
    report = run_until(cfg, lambda s: s.keepalive_retries >= 10)
    assert report.failed == 0, report.failures
    assert report.keepalive_retries >= 10
    assert report.ok == report.total
    assert "keepalive_retries=" in report.summary_line()
    assert json.loads(report.to_json())["keepalive_retries"] == report.keepalive_retries


def test_keepalive_server_close_is_failure_when_strict(server: Server) -> None:
    cfg = LoadConfig(server.url + "/drop", concurrency=2, keepalive_fraction=1.0, strict_keepalive=True)
    report = run_until(cfg, lambda s: s.failed >= 10)
    assert report.keepalive_retries == 0
    assert report.failed >= 10
    assert set(report.failures) <= RETRYABLE_KINDS, report.failures


def test_close_on_fresh_connection_is_never_retried(server: Server) -> None:
    """Only *reused* idle connections qualify for the transparent retry."""
    cfg = LoadConfig(server.url + "/hangup", concurrency=2, keepalive_fraction=1.0)
    report = run_until(cfg, lambda s: s.failed >= 10)
    assert report.keepalive_retries == 0 and report.ok == 0
    assert set(report.failures) <= RETRYABLE_KINDS, report.failures


def test_close_after_response_bytes_is_never_retried(server: Server) -> None:
    cfg = LoadConfig(server.url + "/partial", concurrency=2, keepalive_fraction=1.0)
    report = run_until(cfg, lambda s: s.failed >= 10)
    assert report.keepalive_retries == 0 and report.ok == 0
    assert set(report.failures) == {"other:IncompleteRead"}


def test_version_header_and_body_expectation(server: Server) -> None:
    report = run_until(LoadConfig(server.url + "/header", concurrency=1), lambda s: s.total >= 5)
    assert report.versions == {"v1": report.total} and report.failed == 0
    cfg = LoadConfig(server.url + "/", concurrency=1, expect_body_contains="v9")
    report = run_until(cfg, lambda s: s.total >= 5)
    assert report.failures == {"body_mismatch": report.total}


def test_long_requests(server: Server) -> None:
    cfg = LoadConfig(server.url + "/", concurrency=1, long_requests=2, long_path="/slow?s=0.3")
    report = run_until(cfg, lambda s: s.long.ok >= 2)
    assert report.long.total >= 2 and report.long.ok == report.long.total and report.long.failed == 0
    assert report.long.latency.p50 is not None and report.long.latency.p50 >= 300
    assert report.latency.p50 is not None and report.latency.p50 < 300  # regular latency excludes long
    assert report.total == report.regular.total + report.long.total
    assert "long " in report.summary_line()


def test_unfinished_requests_are_failures(server: Server) -> None:
    gen = LoadGenerator(LoadConfig(server.url + "/slow?s=3", concurrency=2))
    gen.start()
    wait_until(lambda: gen.snapshot().in_flight == 2 and server.state.requests >= 2, what="in flight")
    report = gen.stop(join_timeout=0.2)
    assert report.failures == {"unfinished": 2}
    assert report.total == 2
    assert gen.stop() is report  # idempotent


def test_duration_stops_by_itself(server: Server) -> None:
    t0 = time.monotonic()
    report = LoadGenerator(LoadConfig(server.url + "/", concurrency=2, duration=0.5)).run()
    assert 0.5 <= time.monotonic() - t0 < 3
    assert report.total > 0 and report.failed == 0
    assert 0.45 < report.duration < 3


def test_unix_socket(unix_server: Server) -> None:
    report = run_until(LoadConfig(unix_server.url + ":/", concurrency=2), lambda s: s.total >= 50)
    assert report.failed == 0 and report.versions == {"v1": report.total}
    cfg = LoadConfig(unix_server.url + ":/drop", concurrency=2, keepalive_fraction=1.0)
    report = run_until(cfg, lambda s: s.keepalive_retries >= 5)
    assert report.failed == 0 and report.keepalive_retries >= 5


def test_unix_socket_missing() -> None:
    report = LoadGenerator(LoadConfig("unix:/nonexistent/app.sock:/", concurrency=1, duration=0.2)).run()
    assert report.ok == 0 and report.failures == {"other:FileNotFoundError": report.total}


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reloader.loadgen", *args],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_cli_until_file_exit_0(server: Server, tmp_path: Path) -> None:
    until, out = tmp_path / "stop", tmp_path / "report.json"
    proc = _cli(server.url + "/", "--concurrency", "2", "--until-file", str(until), "--out", str(out))
    try:
        wait_until(lambda: server.state.requests >= 50 or proc.poll() is not None, what="CLI load")
        until.touch()
        _, stderr = proc.communicate(timeout=8)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["failed"] == 0 and doc["total"] >= 50 and doc["versions"]["v1"]["count"] == doc["total"]
    assert stderr.startswith("OK ")


def test_cli_failures_exit_1(server: Server) -> None:
    proc = _cli(server.url + "/500", "--concurrency", "1", "--duration", "0.3", "--json")
    try:
        stdout, _ = proc.communicate(timeout=8)
    finally:
        proc.kill()
    assert proc.returncode == 1
    doc = json.loads(stdout)
    assert doc["failures"] == {"http_500": doc["total"]} and doc["total"] > 0


def test_cli_summary_exit_0(server: Server) -> None:
    proc = _cli(server.url + "/", "--concurrency", "1", "--duration", "0.3", "--long", "1",
                "--long-path", "/slow?s=0.1")
    try:
        stdout, _ = proc.communicate(timeout=8)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert stdout.startswith("OK ") and "long " in stdout


def test_cli_usage_errors_exit_2() -> None:
    for args in (["https://x/"], ["http://x/", "--keepalive-fraction", "2"], ["http://x/", "-H", "nocolon"],
                 []):
        proc = _cli(*args)
        try:
            proc.communicate(timeout=8)
        finally:
            proc.kill()
        assert proc.returncode == 2, args
