"""A worker that dies mid-request costs no idempotent request; a POST it held is answered 502, once.

nginx lists the app's socket once per worker + 1 (templates/nginx-site.j2), so `proxy_next_upstream error`
can resend a GET whose connection a dying worker closed before answering as often as workers could die
under it. Every test runs under load through nginx in a real systemd container; the load generator
(reloader/loadgen.py) counts every answer, and nginx's error log shows that requests really were cut.
See docs/worker-death.md.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from appbed import HOST, App

#: Under gunicorn only (not in the pre-flight): every worker exits 2 s after it loaded the app.
CRASH_AFTER_BOOT = ("\nimport os, sys, threading\nif 'gunicorn' in ' '.join(sys.argv):\n"
                    "    threading.Timer(2 + os.getpid() % 5 * 0.25, os._exit, [1]).start()\n")

#: /held?s=S&id=ID: takes S seconds and leaves a marker HELD/PID-METHOD-N while it runs, so the test can
#: see which worker holds which request; a POST is also logged in POSTS on arrival.
HELD = "/run/flaskapp/held"
POSTS = "/run/flaskapp/posts.log"
HELD_ENDPOINT = f"""
import itertools as _itertools
_SEQ = _itertools.count()


@app.route('/held', methods=['GET', 'POST'])
def held():
    os.makedirs({HELD!r}, exist_ok=True)
    if request.method == 'POST':
        with open({POSTS!r}, 'a') as f:
            f.write(request.args.get('id', '?') + '\\n')
    marker = f"{HELD}/{{os.getpid()}}-{{request.method}}-{{next(_SEQ)}}"
    open(marker, 'w').close()
    try:
        time.sleep(float(request.args.get('s', '4')))
    finally:
        os.unlink(marker)
    return jsonify(version=VERSION, pid=os.getpid())
"""

#: gthread: one worker holds many requests at once (and nginx keeps upstream connections alive to it).
GTHREAD = 'worker_class = "gthread"\nthreads = 16\nworkers = 2'

#: Markers of requests in flight in a live worker of MASTER: {pid: [method, ...]}.
_IN_FLIGHT = """
import json, os, sys
held, master = sys.argv[1], int(sys.argv[2])
def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return 0 if fields[0] == "Z" else int(fields[1])
    except (OSError, ValueError):
        return 0
out = {}
for name in (os.listdir(held) if os.path.isdir(held) else []):
    pid, method, _ = name.split("-")
    if ppid(int(pid)) == master:
        out.setdefault(pid, []).append(method)
print(json.dumps(out))
"""


def in_flight(app: App) -> dict[int, list[str]]:
    """Requests in flight in each worker of the serving master, from the markers and /proc."""
    r = app.c.run(["python3", "-c", _IN_FLIGHT, HELD, str(app.props()["MainPID"])])
    return {int(pid): methods for pid, methods in json.loads(r.stdout).items()}


def wait_for(condition, timeout: float, what: str):  # noqa: ANN001, ANN201 - a test helper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def kill_worker(app: App, pid: int) -> None:
    """SIGKILL a worker of this container's serving master (checked in /proc first: never another process)."""
    master = app.props()["MainPID"]
    parent = app.c.run(["cat", f"/proc/{pid}/stat"]).stdout.rpartition(")")[2].split()[1]
    assert int(parent) == master, f"{pid} is not a worker of master {master}"
    app.c.run(["kill", "-KILL", str(pid)])


def upstream_cuts(app: App) -> tuple[int, int]:
    """From nginx's error log: how many upstream connections were closed or reset before a response
    header, and the most of them one client request met (nginx numbers the client connection: *N)."""
    log = app.c.run("cat /var/log/nginx/error.log", check=False).stdout
    per_request: dict[str, int] = {}
    for line in log.splitlines():
        if "upstream prematurely closed connection" in line or "Connection reset by peer" in line:
            request = line.split(" *", 1)[1].split(" ", 1)[0] + line.split("request: ", 1)[-1]
            per_request[request] = per_request.get(request, 0) + 1
    return sum(per_request.values()), max(per_request.values(), default=0)


#: An answer the killed worker had begun: nginx passes the upstream's header on before the body and cannot
#: resend half an answer, so the client reads a short body (docs/worker-death.md, "after it started answering").
CUT_SHORT = "other:IncompleteRead"


def assert_no_failed_get(report: dict, long_at_least: int, cut_short_at_most: int = 0) -> None:
    """No GET failed, except at most *cut_short_at_most* answers cut short (begun before the worker died)."""
    assert report["total"] > 0, report["summary"]
    failures = dict(report["failures"])
    assert failures.pop(CUT_SHORT, 0) <= cut_short_at_most, (report["summary"], report.get("first_failures"))
    assert failures == {}, (report["summary"], report.get("first_failures"))
    assert report["long"]["failed"] == 0, report["long"]
    assert report["long"]["total"] >= long_at_least, report["long"]


#: The workers die 2 s after booting: within a bake of 5 s (the default 2 s can end just before). The
#: whole generation is the canary: every new worker takes requests and dies under one (with the default
#: single canary, only that one worker serves before the bake refuses, and it may die idle).
@pytest.mark.app_config(reload="bake_seconds = 5", analysis="canary_workers = 4")
def test_a_release_whose_workers_crash_after_boot_is_refused_and_no_get_fails(app: App) -> None:
    """The pre-flight passes (it does not run gunicorn), the gate opens, the new workers take requests
    and die 2 s after booting, each with a request in flight: nginx resends those, the bake refuses."""
    master = app.props()["MainPID"]
    app.c.run(": > /var/log/nginx/error.log; : > /var/log/nginx/access.log")
    load = app.start_load(concurrency=6, long=10, long_path="/slow?s=1")
    wait_for(lambda: int(app.c.run("grep -c 'GET /slow' /var/log/nginx/access.log", check=False).stdout or 0) >= 10,
             30, "the long requests under way")
    app.ship("v2", extra=CRASH_AFTER_BOOT)
    r = app.reload()
    props = app.props()
    report = app.stop_load(load)
    assert r.returncode != 0, props
    assert "reload refused" in props["StatusText"] and "died" in props["StatusText"], props["StatusText"]
    assert props["MainPID"] == master and app.masters() == [master], props
    assert app.version() == "v1"
    cuts, most = upstream_cuts(app)
    assert cuts >= 1, "no request was in flight on a dying worker: the test proved nothing"
    assert "v2" in report["versions"], ("the crashing generation served before it died", report["versions"])
    assert_no_failed_get(report, long_at_least=10)
    print(f"crashing release: {cuts} upstream connections cut by dying workers, up to {most} for one "
          f"request, all resent; {report['summary']}")


def test_a_worker_killed_in_steady_state_costs_no_get_and_a_post_on_it_gets_one_502(container) -> None:
    app = App(container)
    app.install(app.variant(gunicorn=GTHREAD), extra=HELD_ENDPOINT)
    assert app.wait_version("v1"), app.journal()
    app.c.run(": > /var/log/nginx/error.log")
    # 20 long GETs on 2 workers: one of them holds at least 10.
    load = app.start_load(concurrency=4, long=20, long_path="/held?s=4", timeout=30)
    held = wait_for(lambda: (f := in_flight(app)) and sum(map(len, f.values())) >= 20 and f, 60,
                    "20 long GETs in flight")
    victim, requests = max(held.items(), key=lambda kv: len(kv[1]))
    assert len(requests) >= 10, held
    kill_worker(app, victim)
    wait_for(lambda: victim not in in_flight(app), 10, f"worker {victim} gone")
    cuts, _ = upstream_cuts(app)
    assert cuts >= len(requests), (cuts, app.c.run("cat /var/log/nginx/error.log", check=False).stdout[-2000:])

    # A POST in flight on a worker that dies is not resent: the client gets 502, the app saw it once.
    post = app.c.popen(f"curl -s -o /dev/null -m 60 -w '%{{http_code}}' -X POST -H 'Host: {HOST}' "
                       "'http://127.0.0.1/held?s=30&id=post-1'", stdout=subprocess.PIPE, text=True)
    holder = wait_for(lambda: next((pid for pid, methods in in_flight(app).items() if "POST" in methods), 0),
                      30, "the POST in flight")
    kill_worker(app, holder)
    out, _ = post.communicate(timeout=60)
    assert out == "502", f"the POST got {out!r}"
    assert app.c.read_file(POSTS).split() == ["post-1"], "nginx resent the POST"

    report = app.stop_load(load)
    # Resent: every request the kills caught before its answer began (the long GETs, all of them held).
    # Not resendable: a short GET whose answer had begun; at most the 4 clients' requests, per kill.
    assert_no_failed_get(report, long_at_least=20, cut_short_at_most=2 * 4)
    print(f"steady state: {len(requests)} long GETs in flight on the killed worker, {cuts} cut and resent; "
          f"{report['summary']}")
