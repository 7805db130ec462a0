"""Surge-first recycling in a real systemd under load through nginx: `reloader recycle` and the
max_worker_memory timer replace workers with the replacement ready first, so an app whose import takes
3 s never runs with fewer than its 4 workers ready.

A sampler inside the container counts, every 50 ms, the master's live workers that have loaded the app
(their ready markers, checked against /proc).
"""

from __future__ import annotations

import json
import subprocess
import time

from appbed import App

SAMPLER = "/root/sample_ready.py"
SAMPLER_SRC = r"""import os, sys, time
ready, master, out, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return 0 if fields[0] == "Z" else int(fields[1])
    except (OSError, IndexError, ValueError):
        return 0

rows = []
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        names = os.listdir(ready)
    except OSError:
        names = []
    n = sum(1 for name in names if name.startswith("worker-") and ppid(int(name[7:])) == master)
    rows.append(f"{t:.3f} {n}")
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
with open(out, "w") as f:
    f.write("\n".join(rows) + "\n")
"""

#: A release whose /hog makes the worker that answers it hold 200 MB more.
HOG = """
_HOG = []


@app.get('/hog')
def hog():
    _HOG.append(b'x' * (200 << 20))
    return jsonify(pid=os.getpid())
"""


class ReadySampler:
    def __init__(self, app: App, master: int) -> None:
        self.app = app
        app.c.write_file(SAMPLER, SAMPLER_SRC)
        app.c.run(["rm", "-f", "/run/ready.samples", "/run/ready.stop"])
        self.p = app.c.popen(["python3", SAMPLER, f"/run/flaskapp/ready/{master}", str(master),
                              "/run/ready.samples", "/run/ready.stop"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> list[int]:
        self.app.stop_sampler(self.p, "/run/ready.stop")
        return [int(line.split()[1]) for line in self.app.c.read_file("/run/ready.samples").splitlines() if line]


def slow_import_config(app: App) -> str:
    """The example with an app whose import takes 3 s, 4 workers, and a 150 MB worker memory limit."""
    path = app.variant(gunicorn='max_worker_memory = "150M"\nmemory_check_interval = 5')
    text = app.c.read_file(path).replace("[app]\n", '[app]\nenvironment = { IMPORT_DELAY = "3" }\n', 1)
    app.c.write_file(path, text)
    return path


def assert_no_failures(report: dict) -> None:
    assert report["total"] > 0, report["summary"]
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))


def test_recycle_replaces_every_worker_surge_first_and_memory_hogs_the_same_way(container) -> None:
    app = App(container)
    app.install(slow_import_config(app), extra=HOG)
    assert app.wait_version("v1"), app.journal()
    master = app.props()["MainPID"]
    before = app.ready_workers(master)
    assert len(before) == 4, before

    # The steady state: the same load, no recycle.
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    time.sleep(8)
    steady = app.stop_load(load)
    assert_no_failures(steady)

    sampler = ReadySampler(app, master)
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    r = app.c.run(["reloader", "recycle", "flaskapp", "--json"], check=False, timeout=300)
    during = app.stop_load(load)
    samples = sampler.stop()
    assert r.returncode == 0, (r.stdout, r.stderr)
    outcome = json.loads(r.stdout)
    assert sorted(outcome["replaced"]) == sorted(before), outcome
    after = app.ready_workers(master)
    assert len(after) == 4 and not set(after) & set(before), (before, after)
    assert app.props()["MainPID"] == master, "recycling keeps the master"
    assert outcome["seconds"] >= 4 * 3, "each replacement imported the app (3 s) before an old worker retired"
    assert len(samples) > 100, len(samples)
    assert min(samples) >= 4, ("fewer than 4 ready workers during the recycle", samples)
    assert max(samples) <= 6, ("more than workers + surge (+1 retiring)", samples)
    assert_no_failures(during)
    # The steady state again, after (A-B-A): the suite's other containers share these 2 cores, and their
    # load drifts over the recycle's 15 s; the baseline is the mean of the p99 before and after.
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    time.sleep(8)
    steady_after = app.stop_load(load)
    assert_no_failures(steady_after)
    p99_steady = (steady["latency_ms"]["p99"] + steady_after["latency_ms"]["p99"]) / 2
    p99_during = during["latency_ms"]["p99"]
    print(f"p99 steady {steady['latency_ms']['p99']} ms before, {steady_after['latency_ms']['p99']} ms after, "
          f"during the recycle {p99_during} ms ({p99_during / p99_steady:.2f}x); {len(samples)} samples, "
          f"min {min(samples)} ready")
    assert p99_during <= 1.5 * p99_steady, (p99_steady, p99_during)

    status = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)
    assert status["recycle"]["last"]["result"] == "ok", status["recycle"]
    assert status["recycle"]["max_worker_memory"] == "150M"
    assert app.props("flaskapp-recycle.timer")["ActiveState"] == "active"

    # A worker pushed over max_worker_memory: the timer replaces it the same way.
    sampler = ReadySampler(app, master)
    load = app.start_load(concurrency=4, long=1, long_path="/slow?s=1")
    hog = app.get("/hog", timeout=30)
    assert hog.status == 200, hog
    fat = hog.json["pid"]
    deadline = time.monotonic() + 90
    while fat in app.ready_workers(master) and time.monotonic() < deadline:
        time.sleep(0.5)
    # Its replacement is in place once the recycle recorded its outcome.
    last: dict = {}
    while time.monotonic() < deadline:
        last = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)["recycle"]["last"]
        if last["trigger"] == "memory":
            break
        time.sleep(0.5)
    report = app.stop_load(load)
    samples = sampler.stop()
    assert last["trigger"] == "memory" and last["result"] == "ok", last
    assert str(fat) in last["over_memory"] and fat in last["replaced"], last
    assert fat not in app.ready_workers(master)
    assert len(app.ready_workers(master)) == 4
    assert min(samples) >= 4, ("fewer than 4 ready workers during the memory recycle", samples)
    assert_no_failures(report)
    journal = app.c.run("journalctl -u flaskapp-recycle --no-pager -o cat | grep -F max_worker_memory",
                        check=False).stdout
    assert f"{fat} (" in journal, journal

    # Under the reload lock: a recycle asked for during a reload waits for it, then recycles the new master.
    app.ship("v2", extra=HOG)
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while app.props()["ActiveState"] != "reloading" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert app.props()["ActiveState"] == "reloading"
    r = app.c.run(["reloader", "recycle", "flaskapp", "--json"], check=False, timeout=300)
    assert reload.wait(timeout=300) == 0
    assert r.returncode == 0, (r.stdout, r.stderr)
    outcome = json.loads(r.stdout)
    new_master = app.props()["MainPID"]
    assert new_master != master and outcome["master"] == new_master, (master, new_master, outcome)
    assert len(outcome["replaced"]) == 4 and len(app.ready_workers(new_master)) == 4, outcome
    assert app.version() == "v2"
