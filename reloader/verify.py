"""``reloader verify NAME``: prove, on the live host, that reloading NAME loses no request.

It drives HTTP load through the app's own nginx site (keep-alive and new connections, plus a few long
requests), measures a steady-state baseline, then reloads the service N times over D-Bus while the load
runs, waiting for each reload job and re-reading the unit afterwards. The report says how many requests
failed and how (HTTP status, refused, reset, timeout), the latency before and during the reloads, how
long each reload took until a new version answered (when the app exposes one: a JSON ``"version"`` key
or an ``X-App-Version`` header), and whether every reload succeeded.

verify ships nothing: it reloads whatever release is current. Ship first, then verify, to measure a real
deploy. It assumes nothing about the app beyond its configured health path.

Exit status: 0 no request and no reload failed; 1 something failed (or nothing could be measured);
2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Failed, UsageError
from .probe import target_of, url_status

if TYPE_CHECKING:  # the load generator is imported only by a verify run: systemd's hooks share this CLI
    from .loadgen import LoadGenerator, Report

#: Requests that start within this many seconds of the load starting are not part of the baseline
#: (connection set-up, nginx upstream keep-alive warm-up).
WARMUP = 0.5


# --- results --------------------------------------------------------------------------------------------
@dataclass
class ReloadResult:
    n: int
    start: float
    end: float = 0.0
    ok: bool = False
    job: str = ""
    reload_result: str = ""
    state: str = ""
    old_main_pid: int = 0
    new_main_pid: int = 0
    status: str = ""
    error: str = ""
    old_version: str | None = None
    new_version: str | None = None
    time_to_new_version: float | None = None
    version_note: str = ""
    window: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "ok": self.ok, "result": "success" if self.ok else "failed", "job": self.job,
            "reload_result": self.reload_result, "state": self.state, "seconds": round(self.seconds, 3),
            "old_main_pid": self.old_main_pid, "new_main_pid": self.new_main_pid, "status": self.status,
            "error": self.error, "old_version": self.old_version, "new_version": self.new_version,
            "time_to_new_version_s": None if self.time_to_new_version is None
            else round(self.time_to_new_version, 3),
            "version_note": self.version_note, "window": self.window,
        }


def _window(report: Report, start: float, end: float) -> dict[str, Any]:
    """One reload's window: every request that started in it; rate and latency of the regular ones."""
    every, regular = report.window(start, end), report.window(start, end, "regular")
    return {
        "requests": every.total, "failed": every.failed, "failures": dict(sorted(every.failures.items())),
        "keepalive_retries": every.keepalive_retries,
        "requests_per_s": round(regular.total / max(end - start, 1e-9), 1), "latency_ms": regular.latency.to_dict(),
    }


def analyse(report: Report, reloads: list[ReloadResult], baseline: tuple[float, float]) -> dict[str, Any]:
    """Fill in each reload's window and version timing; return the whole verdict as a dict."""
    exposes_version = report.exposes_version
    for i, rl in enumerate(reloads):
        rl.window = _window(report, rl.start, rl.end)
        if not exposes_version:
            rl.version_note = "n/a (the app exposes no version)"
            continue
        rl.old_version = report.version_before(rl.start)
        # A new version must show up before the next reload starts (or the load ends).
        limit = reloads[i + 1].start if i + 1 < len(reloads) else report.ended
        seen = report.first_other_version(rl.old_version, rl.start)
        if seen is not None and seen[1] <= limit:
            rl.new_version, t = seen
            rl.time_to_new_version = t - rl.start
            rl.version_note = f"{rl.old_version} -> {rl.new_version}"
        else:
            rl.version_note = f"unchanged ({rl.old_version}): nothing new shipped, or the reload failed"
    base = report.window(*baseline, "regular")
    during = report.windows(((rl.start, rl.end) for rl in reloads), "regular")
    during_seconds = sum(rl.seconds for rl in reloads)
    failed_reloads = [rl.n for rl in reloads if not rl.ok]
    doc = {
        "url": report.url,
        "duration_s": round(report.duration, 3),
        "total": report.total,
        "ok": report.ok,
        "failed": report.failed,
        "failures": dict(sorted(report.failures.items())),
        "keepalive_retries": report.keepalive_retries,
        "long": {"total": report.long.total, "failed": report.long.failed},
        "versions": dict(sorted(report.versions.items())),
        "exposes_version": exposes_version,
        "steady": {"requests_per_s": round(base.total / max(baseline[1] - baseline[0], 1e-9), 1),
                   "latency_ms": base.latency.to_dict()},
        "during_reloads": {"requests_per_s": round(during.total / during_seconds, 1) if during_seconds else None,
                           "latency_ms": during.latency.to_dict()},
        "reloads": [rl.to_dict() for rl in reloads],
        "reloads_ok": sum(1 for rl in reloads if rl.ok),
        "reloads_failed": failed_reloads,
        "first_failures": report.first_failures(20),
    }
    doc["passed"] = report.failed == 0 and not failed_reloads and report.total > 0
    return doc


# --- progress -----------------------------------------------------------------------------------------
class Progress:
    """One rewritten line on a TTY; otherwise a plain line per event (and every 5 s while waiting)."""

    def __init__(self, gen: LoadGenerator, stream: Any = None) -> None:
        self.gen = gen
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_plain = 0.0
        self.phase = "starting"

    def tick(self, _elapsed: float = 0.0) -> None:
        if not self.tty:
            now = time.monotonic()
            if now - self._last_plain >= 5:
                self._last_plain = now
                self.event(self._line())
            return
        self.stream.write("\r\033[K" + self._line()[:150])
        self.stream.flush()

    def _line(self) -> str:
        s = self.gen.snapshot()
        fails = ",".join(f"{k}={v}" for k, v in sorted(s.failures.items())) or "0"
        return (f"verify: {s.elapsed:6.1f} s  {self.phase}  requests {s.total}  failed {fails}  "
                f"retries {s.keepalive_retries}  in flight {s.in_flight}")

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- the command ----------------------------------------------------------------------------------------
def _sleep_with_progress(seconds: float, progress: Progress) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))
        progress.tick()


def run_verify(args: argparse.Namespace) -> dict[str, Any]:
    from . import registry
    from .bus import Systemd, client_wait

    app = registry.app_for(args.name)
    host_port, host = target_of(app.nginx.listen[0], app.nginx.server_name)
    path = args.path or app.health_path
    long_path = args.long_path or app.health_path
    url = f"http://{host_port}{path}"
    headers = {"Host": host} if host else {}
    status, why = url_status(url, headers, args.timeout)
    if not 200 <= status < 400:
        raise Failed(f"{app.name}: {url} (Host {host or '-'}) answered "
                     f"{status if status else why} before any reload; fix the app first")
    timeout = client_wait(app.reload_budget)
    from .loadgen import LoadConfig, LoadGenerator  # here, not at the top (see there)

    config = LoadConfig(url=url, concurrency=args.concurrency, keepalive_fraction=0.5,
                        timeout=args.timeout, long_requests=args.long, long_path=long_path, headers=headers,
                        strict_keepalive=args.strict_keepalive,
                        max_duration=min(3600.0, args.duration + args.reloads * (timeout + args.gap) + 60))
    reloads: list[ReloadResult] = []
    with registry.operator_lock(app, "verify", timeout), Systemd() as sd:
        before = sd.state(app.service)
        if before.load_state != "loaded" or before.active_state != "active":
            raise Failed(f"{app.service} is {before.load_state}/{before.active_state}: verify needs it running")
        gen = LoadGenerator(config)
        progress = Progress(gen)
        progress.event(f"verify: {app.name}: load on {url} (Host {host or '-'}), {args.concurrency} workers + "
                       f"{args.long} long ({long_path}); {args.duration:g} s baseline, then {args.reloads} reloads")
        gen.start()
        started = gen.started or time.monotonic()
        try:
            progress.phase = "baseline"
            _sleep_with_progress(args.duration, progress)
            baseline = (started + min(WARMUP, args.duration / 2), time.monotonic())
            for n in range(1, args.reloads + 1):
                progress.phase = f"reload {n}/{args.reloads}"
                old = sd.state(app.service)
                rl = ReloadResult(n=n, start=gen.mark(f"reload-{n}-start"), old_main_pid=old.main_pid)
                reloads.append(rl)
                try:
                    rl.job = sd.reload_unit(app.service, timeout=timeout, progress=progress.tick)
                except Failed as e:
                    rl.job, rl.error = "error", str(e)
                rl.end = gen.mark(f"reload-{n}-end")
                after = sd.state(app.service)
                rl.reload_result, rl.new_main_pid, rl.status = after.reload_result, after.main_pid, after.status_text
                rl.state = f"{after.active_state}/{after.sub_state}"
                rl.ok = rl.job == "done" and after.running and after.reload_result in ("success", "")
                if not rl.ok and not rl.error:
                    rl.error = (f"job {rl.job}, reload result {after.reload_result or '?'}, {rl.state}: "
                                f"{after.status_text}")
                progress.event(f"verify: reload {n}/{args.reloads} {'ok' if rl.ok else 'FAILED'} in "
                               f"{rl.seconds:.1f} s (MainPID {rl.old_main_pid} -> {rl.new_main_pid})"
                               + ("" if rl.ok else f": {rl.error}"))
                if not rl.ok and not args.keep_going:
                    progress.event("verify: stopping after a failed reload (use --keep-going to continue)")
                    break
                progress.phase = "settling"
                _sleep_with_progress(args.gap, progress)
        finally:
            report = gen.stop()
            progress.done()
    doc = analyse(report, reloads, baseline)
    doc.update({"app": app.name, "unit": app.service, "strategy": app.strategy.value, "host": host,
                "path": path, "long_path": long_path, "reloads_requested": args.reloads})
    return doc


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def format_text(doc: dict[str, Any]) -> str:
    fails = ", ".join(f"{k}={v}" for k, v in doc["failures"].items()) or "none"
    s, d = doc["steady"], doc["during_reloads"]
    lines = [
        f"{doc['app']}: verify {'PASSED' if doc['passed'] else 'FAILED'} ({doc['url']}, Host "
        f"{doc['host'] or '-'}, strategy {doc['strategy']})",
        f"  requests: {doc['total']} in {doc['duration_s']:.1f} s, failed {doc['failed']} ({fails}), "
        f"keep-alive retries {doc['keepalive_retries']}, long {doc['long']['total']} "
        f"(failed {doc['long']['failed']})",
        f"  latency steady:  p50 {_ms(s['latency_ms']['p50'])}, p99 {_ms(s['latency_ms']['p99'])}, "
        f"{s['requests_per_s']} req/s",
        f"  latency reloads: p50 {_ms(d['latency_ms']['p50'])}, p99 {_ms(d['latency_ms']['p99'])}, "
        f"{d['requests_per_s']} req/s",
        f"  reloads: {doc['reloads_ok']} of {doc['reloads_requested']} ok",
    ]
    for rl in doc["reloads"]:
        ttv = rl["time_to_new_version_s"]
        w = rl["window"]
        lines.append(
            f"    #{rl['n']}: {rl['result']} in {rl['seconds']:.2f} s, MainPID {rl['old_main_pid']} -> "
            f"{rl['new_main_pid']}, new version after {'n/a' if ttv is None else f'{ttv:.2f} s'} "
            f"[{rl['version_note']}], {w['requests']} requests ({w['failed']} failed), "
            f"p99 {_ms(w['latency_ms']['p99'])}")
        if not rl["ok"]:
            lines.append(f"        {rl['error']}")
    for f in doc["first_failures"][:5]:
        lines.append(f"  failure at +{f['start_rel']:.3f} s: {f['kind']} after {f['latency_ms']:.0f} ms"
                     f"{' (long)' if f['long'] else ''}")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.reloads < 0 or args.concurrency < 0 or args.long < 0 or args.duration <= 0 or args.gap < 0:
        raise UsageError("--reloads, --concurrency, --long and --gap must be >= 0 and --duration > 0")
    if args.concurrency + args.long < 1:
        raise UsageError("need at least one load worker (--concurrency or --long)")
    doc = run_verify(args)
    print(json.dumps(doc, indent=2) if args.json else format_text(doc), flush=True)
    return 0 if doc["passed"] else 1


def parser_verify(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="reload NAME N times under HTTP load through nginx; report every "
                       "failed request, the latency, and each reload's result")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reloads", type=int, default=3, metavar="N", help="reloads to perform (default 3)")
    p.add_argument("--concurrency", type=int, default=8, metavar="C",
                   help="load workers, half on keep-alive connections, half on new ones (default 8)")
    p.add_argument("--duration", type=float, default=5.0, metavar="S",
                   help="seconds of steady-state load before the first reload: the baseline (default 5)")
    p.add_argument("--gap", type=float, default=1.0, metavar="S",
                   help="seconds of load after each reload before the next one / the end (default 1)")
    p.add_argument("--long", type=int, default=2, metavar="N",
                   help="extra workers sending requests to --long-path on new connections (default 2)")
    p.add_argument("--path", default=None, help="path of the regular requests (default: the health path)")
    p.add_argument("--long-path", default=None,
                   help="path of the long requests (default: the health path; e.g. /slow?s=2)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request socket timeout (default 10 s)")
    p.add_argument("--strict-keepalive", action="store_true",
                   help="count server-closed idle keep-alive connections as failures instead of retrying")
    p.add_argument("--keep-going", action="store_true", help="keep reloading after a reload failed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)


__all__ = ["analyse", "cmd_verify", "parser_verify"]
