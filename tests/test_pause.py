"""Pause and resume in a real systemd + nginx under load: new requests wait while the app is paused and are
served on resume, in-flight ones finish, none fails; a pause past its maximum answers 503 with Retry-After."""

from __future__ import annotations

import json
import subprocess
import time

from appbed import HOST, App

CURL = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-m", "30", "-H", f"Host: {HOST}",
        "-w", "%{http_code} %{time_total}\n", "http://127.0.0.1/"]


def timed_get(app: App) -> subprocess.Popen:
    """A GET through nginx in the background; :func:`result` gives (status, seconds, headers text)."""
    return app.c.popen(CURL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def result(p: subprocess.Popen) -> tuple[int, float, str]:
    out, _ = p.communicate(timeout=60)
    head, _, last = out.strip().rpartition("\n")
    code, seconds = last.split()
    return int(code), float(seconds), head.lower()


def pause_state(app: App) -> dict:
    return json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)["pause"]


def test_pause_holds_requests_until_resume_and_answers_past_its_maximum(container) -> None:
    app = App(container)
    app.install()
    assert app.wait_version("v1")
    master = app.props()["MainPID"]

    for args, message in ((["--max", "0"], "--max 0 is out of range; allowed 1..55"),
                          (["--max", "600"], "proxy_read_timeout = 60")):
        r = app.c.run(["reloader", "pause", "flaskapp", *args], check=False)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert pause_state(app) == {"paused": False}

    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=2")
    time.sleep(2)
    r = app.c.run(["reloader", "pause", "flaskapp", "--max", "20"], check=False)
    paused_at = time.monotonic()
    assert r.returncode == 0, r.stderr
    held = timed_get(app)
    assert pause_state(app)["paused"] is True and pause_state(app)["past_max"] is False
    r = app.c.run(["reloader", "deploy", "flaskapp"], check=False)
    assert r.returncode == 1 and "is paused" in r.stderr, r.stderr
    time.sleep(max(0.0, paused_at + 5 - time.monotonic()))
    assert held.poll() is None, "the request sent during the pause is held"
    r = app.c.run(["reloader", "resume", "flaskapp"], check=False)
    assert r.returncode == 0 and "resumed after" in r.stdout, r.stdout
    status, seconds, _ = result(held)
    assert status == 200 and seconds >= 3, (status, seconds)
    time.sleep(1)
    report = app.stop_load(load)
    assert report["failures"] == {} and report["total"] > 0, (report["summary"], report.get("first_failures"))
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]
    assert report["latency_ms"]["max"] >= 3500, ("requests were held across the pause", report["latency_ms"])
    assert app.props()["MainPID"] == master
    print(f"pause 5 s under load: {report['summary']}; held request answered {status} after {seconds:.2f} s")

    # Past its maximum the pause answers: 503 with Retry-After after at most --max seconds, then at once.
    asked = time.monotonic()
    r = app.c.run(["reloader", "pause", "flaskapp", "--max", "2"], check=False)
    assert r.returncode == 0, r.stderr
    status, seconds, headers = result(timed_get(app))
    answered = time.monotonic() - asked  # the held request is answered once the 2 s since the pause passed
    assert status == 503 and "retry-after: 5" in headers and seconds < 10 and answered >= 1.9, (
        status, seconds, answered, headers)
    status, seconds, _ = result(timed_get(app))
    assert status == 503 and seconds < 1, (status, seconds)
    assert pause_state(app)["past_max"] is True
    assert "past its maximum" in app.c.run(["reloader", "status", "flaskapp"]).stdout
    app.c.run(["reloader", "resume", "flaskapp"])
    assert app.get("/").status == 200
    assert pause_state(app) == {"paused": False}
