"""The example app installed in a booted test-bed container, and helpers that read like the spec.

``App`` wraps a :class:`testbed.Container` in which ``reloader install`` has installed
``examples/flaskapp.toml`` (releases under /srv/flaskapp/releases/N, ``current`` → the live one). Helpers
ship new releases, run reloads, read unit properties over D-Bus (pystemd, inside the container) and
send HTTP through nginx.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass

import testbed

APP_SRC = "/src/examples/flaskapp/app.py"
EXAMPLE = "/src/examples/flaskapp.toml"
HOST = "flaskapp.example"

#: Releases that must be refused, each with the reason `STATUS=` names: kind → (app.py, reason). Shared by
#: the tests of every strategy (a test bed fixture, not a test module's constant). The hanging import's
#: reason holds for a config with ``preflight_timeout = 5`` (BROKEN_PREFLIGHT_TIMEOUT).
BROKEN_PREFLIGHT_TIMEOUT = "preflight_timeout = 5"
BROKEN = {
    "import error": ("import nosuchmodule\n", "ModuleNotFoundError: No module named 'nosuchmodule' (app.py:1)"),
    "syntax error": ("from flask import Flask\napp = Flask(__name__\n", "SyntaxError"),
    "missing callable": ("from flask import Flask\napplication = Flask(__name__)\n", "has no attribute 'app'"),
    "exception creating the app": (
        "from flask import Flask\n\ndef make():\n    raise RuntimeError('no database configured')\n\napp = make()\n",
        "RuntimeError: no database configured (app.py:4)"),
    "hanging import": ("import time\ntime.sleep(3600)\n", "pre-flight timed out after 5 s"),
    "health path answers 500": (
        "from flask import Flask\napp = Flask(__name__)\n\n@app.get('/health')\ndef health():\n"
        "    return 'db down', 500\n", "/health answered 500"),
}
#: The simplest of them: the release's app.py fails to import.
IMPORT_ERROR = BROKEN["import error"][0]

#: Installs reloader inside the container from the bind-mounted checkout, like the .deb's /usr/bin/reloader.
#: The checkout is read-only in the container, so its bytecode is compiled once, as root, under a prefix
#: (install_wrapper), as the .deb's py3compile does at install: a helper started by systemd then loads
#: compiled modules instead of compiling them on every reload, in a sandbox that could not save them.
#: -X, not $PYTHONPYCACHEPREFIX: the helper's environment becomes the new master's (a reload boots it with
#: the environment systemd would give ExecStart=), and the app's workers would then look for every module
#: of the virtualenv under that prefix and compile them all at each boot.
PYCACHE = "/var/cache/reloader-pyc"
WRAPPER = f"""#!/bin/sh
PYTHONPATH=/src exec /usr/bin/python3 -X pycache_prefix={PYCACHE} -m reloader "$@"
"""


def install_wrapper(c: testbed.Container) -> None:
    """/usr/bin/reloader in container *c*, its modules compiled."""
    c.write_file("/usr/bin/reloader", WRAPPER, mode=0o755)
    c.run(["env", f"PYTHONPYCACHEPREFIX={PYCACHE}", "python3", "-m", "compileall", "-q", "/src/reloader"])

_PROPS = """
import json, sys
from pystemd.systemd1 import Unit
u = Unit(sys.argv[1].encode()); u.load()
d = lambda v: v.decode() if isinstance(v, bytes) else v
out = {k: d(getattr(u.Unit, k)) for k in ("LoadState", "ActiveState", "SubState")}
if sys.argv[1].endswith(".service"):
    for k in ("MainPID", "ControlPID", "StatusText", "Result", "ReloadResult", "NRestarts"):
        out[k] = d(getattr(u.Service, k))
print(json.dumps(out))
"""


_ALIVE = """
import json, os, sys, time
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return 0
"""

_READY_WORKERS = _ALIVE + """
ready, master = sys.argv[1], int(sys.argv[2])
try:
    names = os.listdir(ready)
except OSError:
    names = []
pids = [int(n[7:]) for n in names if n.startswith("worker-") and n[7:].isdigit()]
print(json.dumps(sorted(p for p in pids if alive(p) and ppid(p) == master)))
"""

_WATCH_MASTERS = _ALIVE + """
ready, out, stop = sys.argv[1:4]
seen = None
with open(out, "w") as f:
    while True:
        done = os.path.exists(stop)
        try:
            names = os.listdir(ready)
        except OSError:
            names = []
        masters = sorted(int(n) for n in names
                         if n.isdigit() and os.path.exists(f"{ready}/{n}/master") and alive(int(n)))
        if masters != seen:
            f.write(json.dumps([time.monotonic(), masters]) + "\\n")
            f.flush()
            seen = masters
        if done:
            break
        time.sleep(0.05)
"""


@dataclass
class Reply:
    status: int  # 0 when no HTTP answer came
    body: str

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class App:
    def __init__(self, container: testbed.Container, name: str = "flaskapp") -> None:
        self.c = container
        self.name = name
        self.release = 0

    # --- set-up -----------------------------------------------------------------------------------------
    def install(self, config: str = EXAMPLE, *flags: str, wrapper: bool = True, check: bool = True,
                **release: str) -> subprocess.CompletedProcess:
        """Ship release 1 (*release*: :meth:`ship`'s arguments) and run `reloader install CONFIG FLAGS`.

        *wrapper*: write /usr/bin/reloader running the checkout; False when a .deb installed it.
        *check*: raise when install fails; False for a test of a failing install."""
        if wrapper:
            install_wrapper(self.c)
        self.c.run("mkdir -p /srv/flaskapp && ln -sfn /opt/venv /srv/flaskapp/venv")
        self.ship(**release)
        return self.c.run(["reloader", "install", config, *flags], timeout=240, check=check)

    def ship(self, version: str | None = None, *, code: str | None = None, extra: str = "",
             files: dict[str, str] | None = None) -> int:
        """Put a new release in place and point ``current`` at it (atomically). Returns its number.

        *code* replaces app.py entirely; otherwise the example app is copied with VERSION = *version*
        and *extra* appended.
        """
        self.release += 1
        n = self.release
        version = version or f"v{n}"
        d = f"/srv/flaskapp/releases/{n}"
        self.c.run(["mkdir", "-p", d])
        if code is None:
            source = self.c.read_file(APP_SRC).replace('VERSION = "v1"', f"VERSION = {version!r}") + extra
        else:
            source = code
        self.c.write_file(f"{d}/app.py", source)
        for name, text in (files or {}).items():
            self.c.write_file(f"{d}/{name}", text)
        self.c.run(f"ln -sfn {d} /srv/flaskapp/current.new && mv -T /srv/flaskapp/current.new /srv/flaskapp/current")
        return n

    def variant(self, gunicorn: str = "", reload: str = "", setup: str = "", path: str = "/root/flaskapp.toml",
                base: str = EXAMPLE, analysis: str = "") -> str:
        """Write the example config with extra lines in [gunicorn] / [reload] and [setup] / [analysis]
        sections of *setup*'s / *analysis*' lines; returns its path."""
        text = self.c.read_file(base)
        for line in (gunicorn + "\n" + reload).splitlines():  # a key given here replaces the example's
            if "=" in line:
                key = line.split("=")[0].strip()
                text = "\n".join(t for t in text.split("\n") if t.split("=")[0].strip() != key)
        text = text.replace("[gunicorn]\n", f"[gunicorn]\n{gunicorn}\n")
        if reload and "[reload]\n" in text:
            text = text.replace("[reload]\n", f"[reload]\n{reload}\n")
        elif reload:
            text += f"\n[reload]\n{reload}\n"
        if setup:
            text += f"\n[setup]\n{setup}\n"
        if analysis:
            text += f"\n[analysis]\n{analysis}\n"
        self.c.write_file(path, text)
        return path

    def masters(self) -> list[int]:
        """PIDs of gunicorn masters in the unit's cgroup: not a child of another process of the unit, or
        with children of its own (workers have none). Only meaningful between reloads."""
        r = self.c.run(f"cat /sys/fs/cgroup/unified/system.slice/{self.name}.service/cgroup.procs "
                       f"/sys/fs/cgroup/system.slice/{self.name}.service/cgroup.procs 2>/dev/null | sort -u",
                       check=False)
        pids = {int(p) for p in r.stdout.split()}
        parent = {}
        for pid in pids:
            stat = self.c.run(["cat", f"/proc/{pid}/stat"], check=False).stdout
            if stat:
                parent[pid] = int(stat.rpartition(")")[2].split()[1])
        has_children = set(parent.values())
        return sorted(p for p, pp in parent.items() if pp not in pids or p in has_children)

    def ready_workers(self, master: int) -> list[int]:
        """Live workers of *master* that have loaded the app: the ready markers the gunicorn config's
        post_worker_init hook writes (runtime_dir/ready/MASTER/worker-PID), checked against /proc."""
        r = self.c.run(["python3", "-c", _READY_WORKERS, f"/run/{self.name}/ready/{master}", str(master)])
        return json.loads(r.stdout)

    def start_master_watch(self, out: str = "/run/masters.jsonl", stop: str = "/run/masters.stop"
                           ) -> subprocess.Popen:
        """Sample the app's live gunicorn masters (ready markers, see :meth:`ready_workers`) every 50 ms
        inside the container until :meth:`stop_master_watch`, which returns each change as
        ``(CLOCK_MONOTONIC seconds, [master PIDs])``; the container shares the host's monotonic clock."""
        self.c.run(["rm", "-f", out, stop])
        return self.c.popen(["python3", "-c", _WATCH_MASTERS, f"/run/{self.name}/ready", out, stop],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop_master_watch(self, p: subprocess.Popen, out: str = "/run/masters.jsonl",
                          stop: str = "/run/masters.stop") -> list[tuple[float, list[int]]]:
        self.stop_sampler(p, stop, timeout=30)
        return [tuple(json.loads(line)) for line in self.c.read_file(out).splitlines()]

    def stop_sampler(self, p: subprocess.Popen, stop: str, timeout: float = 30) -> None:
        """Ask a sampler in the container to finish (its stop file) and wait; kill it past *timeout*."""
        self.c.run(["touch", stop])
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise

    # --- observing --------------------------------------------------------------------------------------
    def props(self, unit: str | None = None) -> dict:
        """Unit properties read over D-Bus with pystemd inside the container."""
        r = self.c.run(["python3", "-c", _PROPS, unit or f"{self.name}.service"])
        return json.loads(r.stdout)

    def get(self, path: str = "/", timeout: float = 10) -> Reply:
        """GET through nginx (port 80) with the app's Host header."""
        r = self.c.run(f"curl -s -m {timeout} -H 'Host: {HOST}' -w '\\n%{{http_code}}' http://127.0.0.1{path}",
                       check=False, timeout=timeout + 10)
        body, _, code = r.stdout.rpartition("\n")
        return Reply(int(code or 0), body)

    def version(self) -> str:
        reply = self.get("/")
        return reply.json["version"] if reply.status == 200 else f"<{reply.status}>"

    def wait_version(self, version: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.version() == version:
                return True
            time.sleep(0.2)
        return False

    def systemctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.c.run(["systemctl", *args], check=False, timeout=timeout)

    def reload(self, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.systemctl("reload", f"{self.name}.service", timeout=timeout)

    def journal(self, lines: int = 60) -> str:
        """The unit's last *lines* journal lines for a failure message: systemd's, the helper's (notice,
        warning) and gunicorn's (info), never the access log (priority debug, see gunicorn.conf.py.j2)."""
        return self.c.run(f"journalctl -u {self.name} -p info --no-pager -n {lines}", check=False).stdout

    def journal_without_access_log(self, lines: int = 60) -> str:
        """The unit's last *lines* journal lines that are not access-log lines (gunicorn's, one per request):
        the helper's steps, gunicorn's own messages and systemd's, which a failure message needs."""
        return self.c.run(f"journalctl -u {self.name} --no-pager -o short-monotonic | grep -v -E "
                          f"'\"(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) [^ ]+ HTTP/' | tail -n {lines}",
                          check=False).stdout

    def journal_with(self, text: str) -> str:
        """The unit's whole journal, only the lines containing *text* (the access log fills the rest)."""
        return self.c.run(f"journalctl -u {self.name} --no-pager -o cat | grep -F {shlex.quote(text)}",
                          check=False).stdout

    # --- load ---------------------------------------------------------------------------------------------
    def start_load(self, *, concurrency: int = 6, long: int = 2, long_path: str = "/slow?s=2",
                   out: str = "/run/loadgen.json", stop: str = "/run/loadgen.stop",
                   timeout: float = 10) -> subprocess.Popen:
        """Start the load generator inside the container; :meth:`stop_load` returns its JSON report.

        *timeout*: seconds a request may take before the client gives up and counts it failed."""
        self.c.run(["rm", "-f", out, stop])
        cmd = ("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/ "
               f"--concurrency {concurrency} --long {long} --long-path {shlex.quote(long_path)} "
               f"-H 'Host: {HOST}' --until-file {stop} --out {out} --max-duration 900 --timeout {timeout:g}")
        return self.c.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop_load(self, p: subprocess.Popen, out: str = "/run/loadgen.json",
                  stop: str = "/run/loadgen.stop") -> dict:
        self.stop_sampler(p, stop, timeout=60)
        return json.loads(self.c.read_file(out))
