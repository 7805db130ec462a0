"""The gated generation and the lockstep (max_surge) swap, in a real systemd under load.

Gated: the new generation boots while the pre-flight runs, and its workers accept no connection before the
pre-flight passed and all of them loaded the app. Lockstep: the new master starts with max_surge workers
and the helper trades old workers for new ones (TTOU/TTIN) without ever serving with fewer than
``workers``. A sampler inside the container counts, every 50 ms, the workers that have loaded the app
(their ready markers) and may accept: those of every master, except a gated master whose gate is shut.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from appbed import App

from reloader import config

#: Every 50 ms: "monotonic serving workers" (see the module docstring), until the stop file appears.
SAMPLER = "/root/sample_workers.py"
SAMPLER_SRC = r"""import os, sys, time
out, stop = sys.argv[1], sys.argv[2]
READY = "/run/flaskapp/ready"

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
    serving = processes = 0
    try:
        masters = [int(m) for m in os.listdir(READY) if m.isdigit()]
    except OSError:
        masters = []
    for m in masters:
        d = f"{READY}/{m}"
        try:
            names = os.listdir(d)
        except OSError:
            continue
        if not ppid(m):
            continue
        ready = [n for n in names if n.startswith("worker-") and ppid(int(n[7:])) == m]
        parent = ppid(m)
        gated_shut = os.path.exists(f"{READY}/{parent}/master") and "gate-open" not in names
        if not gated_shut:
            serving += len(ready)
        processes += sum(1 for p in os.listdir("/proc") if p.isdigit() and ppid(int(p)) == m
                         and not os.path.exists(f"{READY}/{p}/master"))
    rows.append(f"{t:.3f} {serving} {processes}")
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
with open(out, "w") as f:
    f.write("\n".join(rows) + "\n")
"""


class Sampler:
    def __init__(self, app: App) -> None:
        self.app = app
        app.c.write_file(SAMPLER, SAMPLER_SRC)
        app.c.run(["rm", "-f", "/run/samples", "/run/samples.stop"])
        self.p = app.c.popen(["python3", SAMPLER, "/run/samples", "/run/samples.stop"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> list[tuple[float, int, int]]:
        self.app.stop_sampler(self.p, "/run/samples.stop")
        rows = [line.split() for line in self.app.c.read_file("/run/samples").splitlines() if line]
        return [(float(t), int(s), int(p)) for t, s, p in rows]


def ready_workers(app: App, master: int) -> int:
    """Workers of *master* that have loaded the app (their ready marker) and are alive, its children."""
    r = app.c.run(f"for f in /run/flaskapp/ready/{master}/worker-*; do p=${{f##*-}}; "
                  f"[ \"$(ps -o ppid= -p $p 2>/dev/null | tr -d ' ')\" = {master} ] && echo $p; done", check=False)
    return len(r.stdout.split())


def assert_no_failures(report: dict) -> None:
    assert report["total"] > 0, report["summary"]
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]


# A release whose workers boot fine and answer / with its version, but whose health path fails: the
# pre-flight refuses it only once all 4 new workers loaded it (each gunicorn process importing it leaves a
# marker) and 1 s more, in which workers past an open gate would surely take some of the load's requests.
SLOW_REFUSAL = """
import glob as _glob, sys as _sys
if 'gunicorn' in ' '.join(_sys.argv):
    open(f'/run/flaskapp/booted-{os.getpid()}', 'w').close()

def _failing_health():
    deadline = time.monotonic() + 50
    while len(_glob.glob('/run/flaskapp/booted-*')) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    return 'database unreachable', 500

app.view_functions['health'] = _failing_health
"""

#: The operator's own gunicorn config: a when_ready hook that runs one worker more than configured.
EXTRA_WORKER_HOOK = "def when_ready(server):\n    server.num_workers += 1\n"


def test_gated_generation_never_serves_a_refused_release_and_reports_the_workers_seen_ready(container) -> None:
    app = App(container)
    app.install()
    assert app.wait_version("v1")
    master = app.props()["MainPID"]
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    app.ship("v2", extra=SLOW_REFUSAL)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0, "the pre-flight refuses the release"
    assert "/health answered 500" in props["StatusText"], props
    assert props["MainPID"] == master and props["SubState"] == "running", props
    booted = app.c.run("ls /run/flaskapp/ | grep -c '^booted-'", check=False).stdout.strip()
    assert int(booted or 0) >= 4, f"the new generation's workers loaded the release ({booted} did)"
    assert app.version() == "v1"
    report = app.stop_load(load)
    assert_no_failures(report)
    assert set(report["versions"]) == {"v1"}, ("a refused release answered users", report["versions"])
    assert app.masters() == [master]

    # STATUS= names the workers seen ready, not the configured count: the operator's hook adds one.
    app.c.write_file("/etc/flaskapp-hooks.py", EXTRA_WORKER_HOOK)
    app.ship("v3")
    r = app.c.run(["reloader", "install", app.variant(gunicorn='config_file = "/etc/flaskapp-hooks.py"')],
                  check=False, timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(30))
    assert app.version() == "v3"
    props = app.props()
    seen = ready_workers(app, props["MainPID"])
    assert seen == 5, f"the hook runs 5 workers, {seen} are ready"
    assert "5 workers" in props["StatusText"], props["StatusText"]
    assert "helper" in props["StatusText"] and "MB" in props["StatusText"], props["StatusText"]
    assert "helper cost: peak RSS" in app.journal_with("helper cost")


# Workers of this release load it fine under gunicorn until two have; every later one fails to import:
# a lockstep swap at max_surge = 1 gets two new workers serving, then the third fails (its master halts).
THIRD_WORKER_FAILS = """
import sys as _sys
if 'gunicorn' in ' '.join(_sys.argv):
    os.makedirs('/run/flaskapp/boots', exist_ok=True)
    open(f'/run/flaskapp/boots/{os.getpid()}', 'w').close()
    if len(os.listdir('/run/flaskapp/boots')) > 2:
        raise RuntimeError('no more connections to the database')
"""


def test_lockstep_swap_under_load_keeps_capacity_and_rolls_back_to_the_full_old_count(container) -> None:
    app = App(container)
    app.install(app.variant(reload="max_surge = 1"))
    assert app.wait_version("v1")
    load = app.start_load(concurrency=6, long=1, long_path="/slow?s=1")
    old = app.props()["MainPID"]
    sampler = Sampler(app)
    app.ship("v2")
    r = app.reload()
    samples = sampler.stop()
    props = app.props()
    assert r.returncode == 0, (props["StatusText"], app.journal_with("reloader: ")[-3000:])
    assert app.version() == "v2" and props["MainPID"] != old, props
    assert "4 workers" in props["StatusText"], props["StatusText"]
    journal = app.journal_with("lockstep:")
    assert journal.count("lockstep:") == 3, journal  # 1 new worker at first, then 3 trades of one
    assert len(samples) > 20, samples
    assert min(s for _, s, _ in samples) >= 4, ("fewer than 4 workers serving", samples)
    assert max(p for _, _, p in samples) <= 6, ("more than workers + max_surge (+1 retiring)", samples)

    # A failure mid-lockstep: the old master gets its 4 workers back, the new one goes.
    serving = props["MainPID"]
    app.ship("v3", extra=THIRD_WORKER_FAILS)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0
    assert "reload refused" in props["StatusText"], props
    assert props["MainPID"] == serving and props["SubState"] == "running", props
    assert "restoring master" in app.journal_with("restoring master"), app.journal(40)
    assert ready_workers(app, serving) == 4
    assert app.masters() == [serving]
    assert app.version() == "v2"
    report = app.stop_load(load)
    assert_no_failures(report)
    assert "v3" in report["versions"], "the two new workers did serve before the third failed"
    assert set(report["versions"]) >= {"v1", "v2"}

    # The helper SIGKILLed mid-lockstep leaves the old master short of workers (its TTOUs) and a stray
    # new master serving the rest: the next reload, even a refused one, gives the old master all 4 back.
    app.ship("v4", extra="\nimport time\ntime.sleep(1)\n")
    rounds = app.journal_with("lockstep: 2 of 4").count("lockstep: 2 of 4")  # the v2 deploy's
    reload = app.c.popen(["systemctl", "reload", "flaskapp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while app.journal_with("lockstep: 2 of 4").count("lockstep: 2 of 4") == rounds and time.monotonic() < deadline:
        time.sleep(0.1)
    app.c.run(["kill", "-KILL", str(app.props()["ControlPID"])])
    assert reload.wait(timeout=60) != 0
    assert ready_workers(app, serving) < 4, "the killed swap had retired old workers"
    app.ship(code="import nosuchmodule\n")
    r = app.reload()
    assert r.returncode != 0 and "ModuleNotFoundError" in app.props()["StatusText"], app.props()
    assert "after an interrupted lockstep swap" in app.journal_with("interrupted lockstep"), app.journal(40)
    assert app.masters() == [serving] and ready_workers(app, serving) == 4
    assert app.version() == "v2"


def test_max_surge_is_a_generation_only_integer() -> None:
    base = {"app": {"name": "a", "working_directory": "/srv/a", "wsgi": "app:app", "virtualenv": "/v"}}
    assert config.parse({**base, "reload": {"max_surge": 1}}).max_surge == 1
    assert config.parse(base).max_surge == 0
    for reload, message in (({"max_surge": 1, "strategy": "hup"}, "[reload] max_surge: only applies to"),
                            ({"max_surge": -1}, "[reload] max_surge: -1 is out of range"),
                            ({"max_surge": "1"}, "[reload] max_surge: must be an integer")):
        with pytest.raises(config.ConfigError) as e:
            config.parse({**base, "reload": reload})
        assert message in str(e.value) and "\n" not in str(e.value), e.value
