"""`reloader verify NAME` in a real systemd: reloads under load through nginx and tells the truth.

Host-side unit tests of the pure parts, then container tests with the example app (fixture ``app``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from appbed import App

from reloader.cli import main
from reloader.loadgen import Record, Report
from reloader.probe import target_of
from reloader.verify import ReloadResult, analyse


def test_target_of_listen_and_server_name() -> None:
    assert target_of("80", ("flaskapp.example", "_")) == ("127.0.0.1:80", "flaskapp.example")
    assert target_of("0.0.0.0:8080", ("_",)) == ("127.0.0.1:8080", None)
    assert target_of("10.0.0.5:81", ("a.example",)) == ("10.0.0.5:81", "a.example")
    assert target_of("[::]:80", ("*.example.com",)) == ("[::1]:80", "verify.example.com")


def _report(records: list[Record], end: float) -> Report:
    return Report.from_records(records, url="http://127.0.0.1:80/health", ended=end)


def test_analyse_times_the_new_version_and_flags_failures() -> None:
    recs = [Record(t / 10, 0.01, "ok", version="v1") for t in range(0, 50)]
    recs += [Record(5.0 + t / 10, 0.01, "ok", version="v2") for t in range(0, 30)]
    recs.append(Record(4.95, 0.02, "conn_refused"))
    first, second = ReloadResult(1, start=4.0, end=5.5, ok=True), ReloadResult(2, start=6.0, end=7.0, ok=False)
    doc = analyse(_report(recs, 8.0), [first, second], (0.5, 4.0))
    r1, r2 = doc["reloads"]
    assert r1["old_version"] == "v1" and r1["new_version"] == "v2"
    assert abs(r1["time_to_new_version_s"] - 1.01) < 1e-6
    assert r2["new_version"] is None and r2["version_note"].startswith("unchanged (v2)")
    assert doc["failed"] == 1 and doc["failures"] == {"conn_refused": 1} and r1["window"]["failed"] == 1
    assert doc["reloads_failed"] == [2] and not doc["passed"]


def test_analyse_without_versions_says_n_a() -> None:
    recs = [Record(t / 10, 0.01, "ok") for t in range(0, 50)]
    doc = analyse(_report(recs, 5.0), [ReloadResult(1, start=2.0, end=3.0, ok=True)], (0.5, 2.0))
    assert doc["passed"] and not doc["exposes_version"]
    assert doc["reloads"][0]["time_to_new_version_s"] is None
    assert doc["reloads"][0]["version_note"].startswith("n/a")


@pytest.mark.parametrize("argv", [
    ["--reloads", "-1"], ["--duration", "0"], ["--gap", "-0.5"], ["--concurrency", "0", "--long", "0"],
])
def test_verify_usage_errors_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The documented exit status of a usage error is 2 (1 means a reload or a request failed); the
    arguments are checked before anything is loaded or reloaded (no app named NAME exists here)."""
    assert main(["verify", "no-such-app", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reloader: "), err
    assert "--" in err, err


def _verify(app: App, *args: str) -> tuple[int, dict, str]:
    r = app.c.run(["reloader", "verify", "flaskapp", "--json", *args], check=False, timeout=600)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {}
    return r.returncode, doc, r.stderr


def test_verify_three_reloads_pass(app: App) -> None:
    app.ship("v2")  # verify ships nothing: the first reload deploys v2, the others reload it in place
    rc, doc, err = _verify(app, "--reloads", "3", "--duration", "3", "--long", "2", "--long-path", "/slow?s=2")
    assert rc == 0, (err, doc.get("reloads"), doc.get("first_failures"), app.journal(30))
    assert doc["passed"] and doc["failed"] == 0 and doc["failures"] == {}, doc
    assert doc["total"] > 100 and doc["long"]["total"] > 0 and doc["long"]["failed"] == 0, doc
    assert doc["reloads_ok"] == 3 and [r["ok"] for r in doc["reloads"]] == [True, True, True]
    assert all(r["reload_result"] == "success" for r in doc["reloads"])
    assert len({r["new_main_pid"] for r in doc["reloads"]}) == 3, "each reload starts a new master"
    first = doc["reloads"][0]
    assert first["old_version"] == "v1" and first["new_version"] == "v2", first
    assert 0 < first["time_to_new_version_s"] <= first["seconds"] + 1.5, first
    assert doc["reloads"][1]["time_to_new_version_s"] is None  # nothing new shipped for reloads 2 and 3
    assert doc["steady"]["latency_ms"]["p99"] is not None and doc["during_reloads"]["latency_ms"]["p99"]
    assert "verify: reload 3/3 ok" in err, err  # plain progress lines when not on a TTY
    assert app.version() == "v2"


def test_verify_reports_a_refused_reload_and_exits_non_zero(app: App) -> None:
    app.ship(code="import nosuchmodule\n")
    rc, doc, err = _verify(app, "--reloads", "2", "--duration", "2")
    assert rc == 1, (err, doc)
    assert doc["failed"] == 0, "the old release kept serving every request"
    assert not doc["passed"] and doc["reloads_failed"] == [1] and doc["reloads_ok"] == 0, doc
    (reload,) = doc["reloads"]  # verify stops after the first failed reload
    assert reload["result"] == "failed" and reload["job"] != "done", reload
    assert "nosuchmodule" in reload["status"] and "nosuchmodule" in reload["error"], reload
    assert reload["old_main_pid"] == reload["new_main_pid"], "the running master was untouched"
    assert "FAILED" in err
    # The human-readable form says the same.
    r = app.c.run(["reloader", "verify", "flaskapp", "--reloads", "1", "--duration", "1"], check=False, timeout=300)
    assert r.returncode == 1 and "verify FAILED" in r.stdout and "nosuchmodule" in r.stdout, r.stdout


def test_the_systemd_hooks_do_not_import_the_load_generator() -> None:
    """exec-reload and exec-started run on every reload: the CLI they share with `reloader verify` must not
    load the load generator on their way (it is imported by a verify run only)."""
    code = ("import sys; from reloader import cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith('reloader.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert "reloader.cli" in r.stdout and "reloader.loadgen" not in r.stdout, r.stdout
