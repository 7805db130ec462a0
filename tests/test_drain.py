"""Long-lived connections across a deploy (issue 22, ``[reload] drain_timeout``): a FastAPI app on uvicorn-worker
holding 50 WebSocket connections through nginx is deployed; the reload returns while they are still open, the
old generation takes no new connection, keeps the open ones until drain_timeout and then closes them with
1012 (service restart); a drain whose connections all end finishes early; ``systemctl stop`` during a drain
stops everything (the clients get 1012 at once).

The WebSocket client is stdlib-only Python in the container (WS_CLIENT), so what it records (first message:
which release answered; each close code and when) comes from the wire, through nginx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from realapps import RealApp

#: The issue's number. The test waits it out once (the other phases end their drains early).
DRAIN = 120
HOLD = 50

# uvicorn speaks WebSocket only with the websockets or wsproto package; the test-bed image has neither, so
# the test installs wsproto (pure Python; its h11 is in the image) into the container's /opt/venv.
WS_ROUTE = '''

from fastapi import WebSocket, WebSocketDisconnect  # noqa: E402


@app.websocket("/ws")
async def ws(websocket: WebSocket):
    await websocket.accept()
    await websocket.send_text(f"{VERSION} {os.getpid()}")
    try:
        while True:
            message = await websocket.receive_text()
            await websocket.send_text(f"{VERSION} {message}")
    except WebSocketDisconnect:
        pass
'''

WS_CLIENT = r'''
"""N WebSocket connections to nginx (Host api.example, /ws): each records the release of its first message,
sends a message every 5 s and records the answer, answers pings, and records its close code and when
(wall clock). State goes to OUT every 0.5 s. The connections close themselves (1000) once CLOSE exists."""
import asyncio, base64, json, os, struct, sys, time

OUT, N, CLOSE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conns = [{"id": i, "version": None, "pid": None, "opened": None, "closed": None, "code": None, "error": None,
          "last_reply": None, "last_reply_version": None} for i in range(N)]


def frame(op, data):
    mask = os.urandom(4)
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def read_frame(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await r.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await r.readexactly(8))[0]
    mask = await r.readexactly(4) if b1 & 0x80 else None
    data = await r.readexactly(n)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data


async def one(c):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", 80)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(f"GET /ws HTTP/1.1\r\nHost: api.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
        if b" 101 " not in head.split(b"\r\n")[0] + b" ":
            c["error"] = head.split(b"\r\n")[0].decode()
            return
        op, data = await asyncio.wait_for(read_frame(r), 30)
        c["version"], c["pid"] = data.decode().split()
        c["opened"] = time.time()
    except Exception as e:
        c["error"] = f"connect: {e!r}"
        return

    async def talk():
        k = 0
        while c["closed"] is None:
            await asyncio.sleep(5)
            if c["closed"] is None:
                if os.path.exists(CLOSE):
                    w.write(frame(8, struct.pack("!H", 1000)))
                    return
                k += 1
                w.write(frame(1, f"m{k}".encode()))

    talker = asyncio.ensure_future(talk())
    try:
        while True:
            op, data = await read_frame(r)
            if op == 1:
                c["last_reply"], c["last_reply_version"] = time.time(), data.decode().split()[0]
            elif op == 9:
                w.write(frame(10, data))
            elif op == 8:
                c["closed"] = time.time()
                c["code"] = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                try:
                    w.write(frame(8, data[:2]))
                    await w.drain()
                except Exception:
                    pass
                break
    except Exception as e:
        c["closed"], c["error"] = time.time(), f"cut: {e!r}"
    talker.cancel()
    w.close()


async def dump():
    while True:
        with open(OUT + ".tmp", "w") as f:
            json.dump(conns, f)
        os.replace(OUT + ".tmp", OUT)
        await asyncio.sleep(0.5)


async def main():
    d = asyncio.ensure_future(dump())
    await asyncio.gather(*(one(c) for c in conns))
    await asyncio.sleep(1)
    d.cancel()
    with open(OUT + ".tmp", "w") as f:
        json.dump(conns, f)
    os.replace(OUT + ".tmp", OUT)

asyncio.run(main())
'''


def _wsproto_wheel(c) -> None:
    """Download the wsproto wheel on the host (its pip config decides the index) and install it offline."""
    tmp = Path(tempfile.mkdtemp(prefix="wsproto."))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                        "--only-binary=:all:", "-d", str(tmp), "wsproto"], check=True, capture_output=True,
                       timeout=300)
        (wheel,) = tmp.glob("wsproto-*.whl")
        dest = c.root / "root" / wheel.name
        shutil.copy(wheel, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    c.run(["/opt/venv/bin/pip", "install", "--no-index", "--no-deps", f"/root/{wheel.name}"], timeout=300)


class Clients:
    def __init__(self, app: RealApp, tag: str, n: int) -> None:
        self.app, self.n = app, n
        self.out, self.close_file = f"/run/ws-{tag}.json", f"/run/ws-{tag}.close"
        app.c.run(["rm", "-f", self.out, self.close_file])
        self.p = app.c.popen(["python3", "/root/wsclient.py", self.out, str(n), self.close_file],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def state(self) -> list[dict]:
        r = self.app.c.run(["cat", self.out], check=False)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout else []

    def wait(self, what, timeout: float, why: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            conns = self.state()
            if conns and what(conns):
                return conns
            if time.monotonic() > deadline:
                raise AssertionError(f"{why}: not within {timeout} s; {summary(conns)}")
            time.sleep(0.5)

    def opened(self, timeout: float = 60) -> list[dict]:
        conns = self.wait(lambda cs: all(c["opened"] or c["error"] for c in cs), timeout, "connections opened")
        errors = [c["error"] for c in conns if c["error"]]
        assert not errors, errors[:5]
        return conns

    def closed(self, timeout: float) -> list[dict]:
        return self.wait(lambda cs: all(c["closed"] or (c["error"] and not c["opened"]) for c in cs), timeout,
                         "connections closed")

    def close(self) -> None:
        self.app.c.run(["touch", self.close_file])


def summary(conns: list[dict]) -> str:
    codes: dict[str, int] = {}
    for c in conns:
        key = f"{c['version']}:{'open' if not c['closed'] else c['code']}" + (f" {c['error']}" if c["error"] else "")
        codes[key] = codes.get(key, 0) + 1
    return json.dumps(codes)


def status_json(app: RealApp) -> dict:
    r = app.c.run(["reloader", "status", app.name, "--json"], check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    data = json.loads(r.stdout)
    return data[0] if isinstance(data, list) else data


def alive(app: RealApp, pid: int) -> bool:
    return app.c.run(["test", "-d", f"/proc/{pid}"], check=False).returncode == 0


def test_fifty_websockets_drain_across_a_deploy_then_close_with_1012(container) -> None:
    app = RealApp(container, "fastapi", "api.example", "fastapiapp", "main.py")
    _wsproto_wheel(container)
    container.write_file("/root/wsclient.py", WS_CLIENT)
    source = app.read("main.py")
    assert 'VERSION = "v1"' in source

    def with_ws(version: str) -> dict[str, str]:  # ship()'s files replace its version edit: make our own
        return {"main.py": source.replace('VERSION = "v1"', f'VERSION = "{version}"') + WS_ROUTE}

    app.ship("v1", files=with_ws("v1"))
    config = app.config("fastapi")
    text = container.read_file(config).replace("[reload]\n", f"[reload]\ndrain_timeout = {DRAIN}\n")
    container.write_file(config, text)
    r = app.install_config(config)
    assert r.returncode == 0 and "answers 200 through nginx" in r.stdout, (r.stdout, r.stderr, app.journal(40))
    assert "drain_timeout" in container.read_file("/etc/reloader/fastapi.gunicorn.conf.py")

    # --- 1: 50 WebSockets through nginx, a deploy with drain_timeout = 120 --------------------------------
    held = Clients(app, "held", HOLD)
    conns = held.opened()
    assert {c["version"] for c in conns} == {"v1"}, summary(conns)
    old = app.props()["MainPID"]
    app.ship("v2", files=with_ws("v2"))
    started = time.time()
    r = app.reload()
    returned = time.time()
    conns = held.state()
    assert r.returncode == 0, (r.stderr, app.journal(60))
    print(f"reload with {HOLD} WebSockets draining returned after {returned - started:.1f} s")
    assert all(not c["closed"] for c in conns), f"a connection was cut by the deploy: {summary(conns)}"
    new = app.props()["MainPID"]
    assert new != old and alive(app, old), (old, new)
    status = app.props()["StatusText"]
    assert f"draining {HOLD} connection(s) of the old generation (master {old})" in status, status
    drain = status_json(app)["drain"]
    assert drain["old_master"] == old and drain["new_master"] == new and drain["connections"] == HOLD, drain
    assert drain["memory_bytes"] > 0 and drain["drain_timeout"] == DRAIN, drain
    deadline = drain["deadline"]
    assert started + DRAIN - 1 < deadline < returned + DRAIN + 1, (started, deadline, returned)

    # New connections and requests land on the new release; the old generation takes none.
    fresh = Clients(app, "fresh", 5)
    assert {c["version"] for c in fresh.opened()} == {"v2"}, summary(fresh.state())
    assert {app.json("/")["version"] for _ in range(10)} == {"v2"}

    # The held connections keep talking to the old release during the drain, then get 1012 at its end.
    conns = held.closed(DRAIN + 120)
    print(f"held connections: {summary(conns)}; deadline was {deadline - started:.1f} s after the reload began")
    assert all(c["code"] == 1012 and not c["error"] for c in conns), summary(conns)
    early = [c for c in conns if c["closed"] < deadline]
    assert not early, f"{len(early)} connection(s) closed before drain_timeout: {early[:3]}"
    quiet = [c for c in conns
             if not (c["last_reply"] and c["last_reply"] > returned and c["last_reply_version"] == "v1")]
    assert not quiet, f"{len(quiet)} connection(s) got no answer from the old release during the drain: {quiet[:3]}"
    assert app.c.run(f"for i in $(seq 100); do test -d /proc/{old} || exit 0; sleep 0.2; done; exit 1",
                     check=False).returncode == 0, f"old master {old} still running after its drain"
    assert status_json(app)["drain"] is None
    assert "retired after its drain: drain_timeout reached" in app.props()["StatusText"], app.props()["StatusText"]
    assert {c["version"] for c in fresh.state() if not c["closed"]} == {"v2"}, summary(fresh.state())

    # --- 2: a drain ends as soon as its connections do -----------------------------------------------------
    old = app.props()["MainPID"]
    app.ship("v3", files=with_ws("v3"))
    r = app.c.run(["reloader", "deploy", "fastapi"], check=False, timeout=300)  # returns without the drain too
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(60))
    assert not any(c["closed"] for c in fresh.state()), summary(fresh.state())
    drain = status_json(app)["drain"]
    assert drain and drain["old_master"] == old and drain["connections"] == 5, drain
    fresh.close()
    conns = fresh.closed(60)
    print(f"a drain of 5 connections ended when they closed; reload returned, status: {app.props()['StatusText']}")
    assert all(c["code"] == 1000 for c in conns), summary(conns)  # our own close, echoed by the server
    assert app.c.run(f"for i in $(seq 150); do test -d /proc/{old} || exit 0; sleep 0.2; done; exit 1",
                     check=False).returncode == 0, f"old master {old} still running once its connections closed"
    assert time.time() < drain["deadline"], "the drain did not end before its deadline"
    assert "retired after its drain: its connections closed" in app.props()["StatusText"]

    # --- 3: a deploy during a drain ends that drain first; systemctl stop during a drain stops everything ---
    last = Clients(app, "last", 10)
    assert {c["version"] for c in last.opened()} == {"v3"}
    v3 = app.props()["MainPID"]
    app.ship("v4", files=with_ws("v4"))
    assert app.reload().returncode == 0
    first = status_json(app)["drain"] or {}
    assert first.get("old_master") == v3 and first.get("connections") == 10, first
    more = Clients(app, "more", 10)
    assert {c["version"] for c in more.opened()} == {"v4"}
    v4 = app.props()["MainPID"]
    app.ship("v5", files=with_ws("v5"))
    r = app.reload()
    assert r.returncode == 0, (r.stderr, app.journal(60))
    conns = last.closed(30)
    assert all(c["code"] == 1012 and c["closed"] < first["deadline"] for c in conns), summary(conns)
    assert f"ending the drain of old master {v3} first" in app.journal(200)
    second = status_json(app)["drain"] or {}
    assert second.get("old_master") == v4 and second.get("connections") == 10, second
    assert not alive(app, v3)
    started = time.monotonic()
    r = app.systemctl("stop", "fastapi.service")
    print(f"systemctl stop during a drain took {time.monotonic() - started:.1f} s")
    props = app.props()
    assert r.returncode == 0 and props["ActiveState"] == "inactive" and props["Result"] == "success", (r, props)
    conns = more.closed(30)
    assert all(c["code"] == 1012 for c in conns), summary(conns)
    assert not alive(app, v4)
    left = app.c.run("systemd-cgls --no-pager -u fastapi.service | grep -c gunicorn || true", check=False).stdout
    assert left.strip() in ("", "0"), left


@pytest.mark.parametrize("value, message", [
    ("-1", "[reload] drain_timeout: -1 is out of range; allowed 0..86400"),
    ('"2m"', "[reload] drain_timeout: must be an integer, not str '2m'"),
])
def test_a_bad_drain_timeout_is_one_clear_line(tmp_path, value: str, message: str) -> None:
    from reloader import config

    path = tmp_path / "app.toml"
    path.write_text('[app]\nname = "api"\nworking_directory = "/srv/api/current"\nvirtualenv = "/opt/venv"\n'
                    'wsgi = "main:app"\n[gunicorn]\nworker_class = "uvicorn_worker.UvicornWorker"\n'
                    f"[reload]\ndrain_timeout = {value}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value) == f"{path}: {message}"


def test_drain_timeout_needs_a_worker_that_can_drain(tmp_path) -> None:
    from reloader import config

    path = tmp_path / "app.toml"
    path.write_text('[app]\nname = "api"\nworking_directory = "/srv/api/current"\nvirtualenv = "/opt/venv"\n'
                    'wsgi = "main:app"\n[gunicorn]\nworker_class = "gthread"\n[reload]\ndrain_timeout = 120\n')
    with pytest.raises(config.ConfigError, match=r"\[reload\] drain_timeout: needs an asyncio ASGI worker_class"):
        config.load(path)


# --- host tests of reloader/drain.py's in-gunicorn parts (real sockets, processes and signals) ------------
OLD_MASTER = r'''
import json, os, runpy, signal, sys, time
drain = runpy.run_path(sys.argv[1])
ready = sys.argv[2]
old = os.getpid()
d = os.path.join(ready, str(old))
os.makedirs(d)
open(os.path.join(d, "master"), "w").close()
termed = []
signal.signal(signal.SIGTERM, lambda *a: termed.append(time.time()))
child = os.fork()
if child == 0:
    drain["watch_old_generation"](os.getpid(), old, d)
    os._exit(0)
open(os.path.join(d, f"worker-{old}"), "w").close()  # its one "worker" is itself (alive)
print(json.dumps({"old": old, "new": child}), flush=True)
while not termed and time.time() < float(sys.argv[3]):
    time.sleep(0.05)
with open(os.path.join(ready, "termed.json"), "w") as f:
    json.dump({"at": termed[0] if termed else None}, f)
'''


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("ending", ["connections closed", "deadline"])
def test_the_new_master_terms_the_old_one_when_drained_or_at_the_deadline(tmp_path, ending: str) -> None:
    import socket

    from reloader import drain

    ready = tmp_path / "ready"
    ready.mkdir()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    script = tmp_path / "old.py"
    script.write_text(OLD_MASTER)
    p = subprocess.Popen([sys.executable, str(script), drain.__file__, str(ready), str(time.time() + 60)],
                         stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(p.stdout.readline())  # type: ignore[union-attr]
        old_dir = ready / str(pids["old"])
        (old_dir / f"draining-{pids['old']}").write_text(json.dumps({"open": 2}))
        deadline = time.time() + (3 if ending == "deadline" else 600)
        (old_dir / drain.FLAG).write_text(json.dumps({"deadline": deadline, "release": "7",
                                                      "notify_socket": str(tmp_path / "notify")}))
        _wait((old_dir / drain.WATCHED).exists, 10, "the new master acknowledges the drain")
        status = notify.recv(4096).decode()
        assert status == (f"STATUS=serving release 7 (master {pids['new']}); draining 2 connection(s) of the old "
                          f"generation (master {pids['old']}) until {drain._clock(deadline)} at the latest")
        assert not (ready / "termed.json").exists(), "TERMed while 2 connections were open"
        if ending == "connections closed":
            (old_dir / f"draining-{pids['old']}").write_text(json.dumps({"open": 0}))
        _wait((ready / "termed.json").exists, 20, "the old master gets its TERM")
        termed = json.loads((ready / "termed.json").read_text())["at"]
        assert termed, "the old master got no TERM"
        last = notify.recv(4096).decode()
        if ending == "deadline":
            assert termed >= deadline, (termed, deadline)
            assert last.endswith("retired after its drain: drain_timeout reached with 2 connection(s) open: they "
                                 "get close code 1012"), last
        else:
            assert termed < deadline
            assert last.endswith("retired after its drain: its connections closed"), last
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        notify.close()


def test_a_draining_asgi_worker_stops_accepting_and_keeps_its_open_connections(tmp_path) -> None:
    import asyncio
    import select
    import socket
    import threading
    from types import SimpleNamespace

    from reloader import drain

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "app.sock"))
    listener.listen(16)
    ready = tmp_path / "ready"
    (ready / str(os.getppid())).mkdir(parents=True)
    worker = SimpleNamespace(ppid=os.getppid(), sockets=[listener], wsgi=None)
    d = drain._WorkerDrain(worker, str(ready))
    report = ready / str(os.getppid()) / f"draining-{os.getpid()}"

    async def app(scope: dict, receive, send) -> None:
        if scope["type"] != "lifespan":
            await receive()  # a WebSocket: open until its client goes

    counted = d.wrap(app)

    async def main() -> socket.socket:
        async def nothing() -> dict:
            return {}

        await counted({"type": "lifespan"}, nothing, None)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def receive() -> dict:
                await reader.read(1)
                return {}
            writer.write(b"hi")
            await writer.drain()
            await counted({"type": "websocket"}, receive, None)
            writer.close()

        server = await asyncio.start_unix_server(handle, sock=listener)
        threading.Thread(target=d.watch, daemon=True).start()
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "app.sock"))
        assert await reader.readexactly(2) == b"hi"
        (ready / str(os.getppid()) / drain.FLAG).write_text("{}")
        for _ in range(200):
            if report.exists():
                break
            await asyncio.sleep(0.05)
        assert json.loads(report.read_text()) == {"open": 1, "at": json.loads(report.read_text())["at"]}
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.connect(str(tmp_path / "app.sock"))  # into the shared socket's backlog
        await asyncio.sleep(0.5)  # the chance for a loop that still accepts to take it
        assert select.select([listener], [], [], 5)[0], "the draining worker took the new connection"
        taken, _ = listener.accept()  # the "new generation" gets it
        taken.close()
        writer.write(b"x")  # the held connection still works: its client ends it
        await writer.drain()
        for _ in range(100):
            if json.loads(report.read_text()).get("open") == 0:
                break
            await asyncio.sleep(0.05)
        assert json.loads(report.read_text())["open"] == 0
        server.close()
        return late

    asyncio.run(main()).close()


@pytest.mark.parametrize("extra, message", [
    ('strategy = "hup"', '[reload] drain_timeout: only applies to strategy = "generation"'),
    ("max_surge = 1", "[reload] drain_timeout: not with max_surge"),
    ('[setup]\nafter_switch = ["true"]', "[setup] after_switch: not supported with [reload] drain_timeout yet"),
])
def test_drain_timeout_refuses_what_would_cut_or_outrun_its_connections(tmp_path, extra: str, message: str) -> None:
    from reloader import config

    path = tmp_path / "app.toml"
    path.write_text('[app]\nname = "api"\nworking_directory = "/srv/api/current"\nvirtualenv = "/opt/venv"\n'
                    'wsgi = "main:app"\n[gunicorn]\nworker_class = "uvicorn_worker.UvicornWorker"\n'
                    f"[reload]\ndrain_timeout = 120\n{extra}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
