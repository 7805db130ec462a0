"""The operator toolkit's logic on the host (no containers): its config keys and their one-line errors, which
workers a memory recycle retires, how a paused worker holds a request, and maintenance mode's files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from reloader import config, maintenance, pause_hook, proc, recycle
from reloader.render import render

BASE = {"app": {"name": "a", "working_directory": "/srv/a", "wsgi": "app:app", "virtualenv": "/v"}}


def parse(**sections: dict) -> config.AppConfig:
    return config.parse({**BASE, **sections})


def one_line_error(**sections: dict) -> str:
    with pytest.raises(config.ConfigError) as e:
        parse(**sections)
    assert "\n" not in str(e.value), e.value
    return str(e.value)


def test_the_toolkit_keys_are_typed_and_bad_values_get_one_line_naming_the_key() -> None:
    app = parse(gunicorn={"max_worker_memory": "512M", "memory_check_interval": 10},
                reload={"recycle_surge": 2}, setup={"after_switch": ["python manage.py migrate app 0042"]})
    assert app.max_worker_memory_bytes == 512 << 20 and app.memory_check_interval == 10
    assert app.recycle_surge == 2
    assert app.setup.after_switch == (("python", "manage.py", "migrate", "app", "0042"),)
    assert parse().max_worker_memory_bytes == 0 and parse().setup.after_switch == ()
    assert parse(gunicorn={"max_worker_memory": "2g"}).max_worker_memory_bytes == 2 << 30
    assert "[gunicorn] max_worker_memory: '512MB' is not valid" in one_line_error(
        gunicorn={"max_worker_memory": "512MB"})
    assert "[gunicorn] memory_check_interval: 1 is out of range" in one_line_error(
        gunicorn={"memory_check_interval": 1})
    assert "[reload] recycle_surge: 0 is out of range" in one_line_error(reload={"recycle_surge": 0})
    assert "[setup] after_switch: must be a list" in one_line_error(setup={"after_switch": "drop"})
    assert "[setup] after_switch: 'a \"b' is not a valid command line" in one_line_error(
        setup={"after_switch": ['a "b']})
    assert "[setup] after_switch: not supported with strategy 'rolling'" in one_line_error(
        reload={"strategy": "rolling"}, setup={"after_switch": ["x"]})
    assert "[gunicorn] max_worker_memory: not supported with strategy 'blue-green'" in one_line_error(
        reload={"strategy": "blue-green"}, gunicorn={"max_worker_memory": "1G"})


def test_after_switch_adds_its_timeout_to_the_reload_budget() -> None:
    assert parse(setup={"after_switch": ["x"]}).reload_budget == parse().reload_budget + 300


def test_a_memory_recycle_retires_the_workers_up_to_the_youngest_one_over_the_limit() -> None:
    # TTOU retires the oldest worker: to retire the second-oldest, the oldest goes first.
    procs = []
    try:
        for _ in range(4):
            procs.append(subprocess.Popen(["sleep", "60"]))
            time.sleep(0.02)  # distinct start times (clock ticks)
            while proc.start_time(procs[-1].pid) <= (proc.start_time(procs[-2].pid) if len(procs) > 1 else 0):
                time.sleep(0.01)
        pids = [p.pid for p in procs]
        assert recycle.oldest_through(list(reversed(pids)), {pids[1]}) == pids[:2]
        assert recycle.oldest_through(pids, {pids[3], pids[0]}) == pids
        assert recycle.oldest_through(pids, set()) == []
        assert proc.rss(pids[0]) > 0 and proc.rss(2**22 + 7) == 0
        assert recycle.over_memory(pids, 1) == {p: proc.rss(p) for p in pids}
        assert recycle.over_memory(pids, 1 << 40) == {}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_paused_worker_holds_a_request_until_resume_heartbeating_and_answers_503_past_the_maximum(
        tmp_path: Path) -> None:
    flag = tmp_path / "paused"
    beats = []
    assert pause_hook.hold(str(flag), lambda: beats.append(1)) is True and beats == []

    flag.write_text(json.dumps({"until": time.time() + 30}))
    threading.Timer(0.3, flag.unlink).start()
    started = time.monotonic()
    assert pause_hook.hold(str(flag), lambda: beats.append(1)) is True
    assert time.monotonic() - started >= 0.25 and len(beats) >= 3

    calls = []

    class Worker:
        def notify(self) -> None:
            pass

    def app(environ: dict, start_response: object) -> list[bytes]:
        calls.append(environ)
        return [b"ok"]

    wrapped = pause_hook.pausable(app, Worker(), str(flag))
    assert wrapped({}, lambda *a: None) == [b"ok"] and len(calls) == 1
    flag.write_text(json.dumps({"until": time.time() - 1, "retry_after": 7}))
    answered = []
    body = wrapped({}, lambda status, headers: answered.append((status, dict(headers))))
    assert answered[0][0].startswith("503") and answered[0][1]["Retry-After"] == "7" and b"paused" in body[0]
    assert len(calls) == 1, "past its maximum the app is not called"


def test_maintenance_pages_and_the_link_nginx_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "STATE_DIR", tmp_path)
    app = parse()
    (tmp_path / "a").mkdir()
    page, source = maintenance.page_for("Back <soon>", None)
    assert "Back &lt;soon&gt;" in page and source == "message"
    with pytest.raises(config.ConfigError, match="not both"):
        maintenance.page_for("x", "/etc/hostname")
    with pytest.raises(config.ConfigError, match="--page /nonexistent: No such file"):
        maintenance.page_for(None, "/nonexistent")
    (tmp_path / "bin.html").write_bytes(b"\xff\xfe")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        maintenance.page_for(None, str(tmp_path / "bin.html"))
    with pytest.raises(config.ConfigError, match="--retry-after 0 is out of range"):
        maintenance.check_retry_after(0)

    assert maintenance.state(app) == {"on": False}
    maintenance.turn_on(app, page, source, 120, "Back <soon>")
    root = Path(app.maintenance_dir)
    active = root / "active"
    assert (active / "on").is_file() and "Back &lt;soon&gt;" in (active / "index.html").read_text()
    assert maintenance.state(app)["on"] and maintenance.state(app)["retry_after"] == 120
    # nginx's map reads Retry-After from the directory the link resolves to: the rendered site's regex.
    site = next(f.content for f in render(app) if f.name.endswith(".nginx.conf"))
    regex = re.search(r'^\s*"~(.*)" \$reloader_a_seconds;$', site, re.M).group(1).replace("(?<", "(?P<")
    assert re.search(regex, os.path.realpath(active)).group(1) == "120"
    assert f"if (-f {root}/active/on)" in site and f"alias {root}/active/;" in site
    assert maintenance.turn_off(app) is True
    assert not (active / "on").exists() and (active / "index.html").is_file(), "off still has a page (the race)"
    assert os.path.realpath(active) == str(root / "off")
    assert maintenance.turn_off(app) is False and maintenance.state(app) == {"on": False}
    for n in range(4):
        maintenance.turn_on(app, page, source, 10 + n, None)
    assert len(list(root.glob("retry-after-*"))) == 3, "older pages pruned, the last few kept"


def test_the_gunicorn_config_wraps_each_workers_app_with_the_pause_hook(tmp_path: Path) -> None:
    app = config.load(Path(__file__).resolve().parent.parent / "examples" / "flaskapp.toml")
    hook = Path(pause_hook.__file__)
    source = next(f.content for f in render(app) if f.name.endswith(".gunicorn.conf.py"))
    ns: dict = {}
    exec(compile(source.replace(app.pause_hook_path, str(hook)).replace(app.pause_flag, str(tmp_path / "paused")),
                 "flaskapp.gunicorn.conf.py", "exec"), ns)
    ns["_READY_DIR"] = str(tmp_path)

    def the_app(environ: dict, start_response: object) -> list[bytes]:
        return [b"app"]

    class Worker:
        pid, ppid, wsgi = 101, 100, staticmethod(the_app)

        def notify(self) -> None:
            pass

    worker = Worker()
    ns["post_worker_init"](worker)
    assert worker.wsgi is not the_app and worker.wsgi({}, lambda *a: None) == [b"app"]
    (tmp_path / "paused").write_text(json.dumps({"until": 0}))
    answered = []
    worker.wsgi({}, lambda status, headers: answered.append(status))
    assert answered == ["503 Service Unavailable"]
    # An ASGI app is never wrapped (the hook is WSGI).
    asgi = config.parse({**BASE, "gunicorn": {"worker_class": "uvicorn_worker.UvicornWorker"}})
    assert not asgi.pausable
    assert "_hold_while_paused" not in next(f.content for f in render(asgi) if f.name.endswith(".gunicorn.conf.py"))


#: A stand-in for a gunicorn master (the arbiter's worker bookkeeping only): it runs NUM workers, TTIN/TTOU
#: change NUM, TTOU retires the oldest (SIGTERM), a worker that exits is respawned while fewer than NUM
#: run. A worker marks itself ready (READY/MASTER/worker-PID, like post_worker_init) after BOOT seconds.
FAKE_MASTER = r"""
import os, signal, sys, time
ready, num, boot = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
workers = []  # oldest first
directory = os.path.join(ready, str(os.getpid()))
os.makedirs(directory, exist_ok=True)

def spawn():
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: (os.unlink(marker) if os.path.exists(marker) else None,
                                                   os._exit(0)))
        marker = os.path.join(directory, f"worker-{os.getpid()}")
        time.sleep(boot)
        open(marker, "w").close()
        while True:
            time.sleep(1)
    workers.append(pid)

events = []
for s in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
    signal.signal(s, lambda sig, frame: events.append(sig))
for _ in range(num):
    spawn()
while True:
    while events:
        sig = events.pop(0)
        if sig == signal.SIGTTIN:
            num += 1
        elif sig == signal.SIGTTOU and num > 1:
            num -= 1
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            break
        workers.remove(pid)
    while len(workers) < num:
        spawn()
    for pid in workers[: max(0, len(workers) - num)]:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.01)
"""


def fake_master(tmp_path: Path, workers: int, boot: float) -> subprocess.Popen:
    import sys

    p = subprocess.Popen([sys.executable, "-c", FAKE_MASTER, str(tmp_path), str(workers), str(boot)],
                         start_new_session=True)
    deadline = time.monotonic() + 20
    while len(list((tmp_path / str(p.pid)).glob("worker-*"))) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    return p


def stop(master: subprocess.Popen) -> None:
    """The fake master and its workers: its own session, started by this test."""
    os.killpg(master.pid, signal.SIGKILL)
    master.wait()


def test_recycling_starts_each_replacement_before_an_old_worker_retires_and_gives_back_what_it_added(
        tmp_path: Path) -> None:
    app = parse(reload={"ready_timeout": 3}, gunicorn={"graceful_timeout": 5})
    master = fake_master(tmp_path, 3, boot=0.3)
    try:
        said: list[str] = []
        r = recycle.Recycler(app, master.pid, said.append, surge=1)
        r.ready_dir = tmp_path
        before = r.workers()
        assert len(before) == 3 and r.settle() == 3
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(len(r.ready()))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        retired = r.replace(before, 3)
        done.set()
        sampler.join()
        assert retired == before and not set(r.workers()) & set(before)
        assert len(r.ready()) == 3 and min(samples) >= 3 and max(samples) <= 4, samples
        assert sum("starting 1 new (TTIN)" in line for line in said) == 3, said

        # Replacements that do not load the app within ready_timeout: the recycle stops, and the worker
        # it added is given back (TTOU), so the master runs 3 again.
        slow = fake_master(tmp_path, 3, boot=30)
        try:
            stuck = recycle.Recycler(app, slow.pid, said.append, surge=1)
            stuck.ready_dir = tmp_path
            for pid in (slow.pid,):
                (tmp_path / str(pid)).mkdir(exist_ok=True)
            workers = stuck.workers()
            for w in workers:  # the first three are "ready" (mark them by hand: boot is 30 s)
                (tmp_path / str(slow.pid) / f"worker-{w}").touch()
            with pytest.raises(recycle.RecycleFailed, match="did not load the app within ready_timeout"):
                stuck.replace(workers, 3)
            assert stuck.added == 0 and "giving back 1 added worker(s) (TTOU)" in said[-1], said
            deadline = time.monotonic() + 5
            while len(stuck.workers()) != 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(stuck.workers()) == 3
        finally:
            stop(slow)
    finally:
        stop(master)
