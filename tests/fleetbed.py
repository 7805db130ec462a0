"""A fleet in the test bed: app hosts behind an HAProxy host, driven by the repo's Ansible playbooks.

``Fleet`` boots N app-host containers and one load-balancer container on a :class:`testbed.Network`
bridge, authorises a throw-away SSH key in each, applies ``ansible/site.yml`` (reloader + the example app
on the app hosts, HAProxy on the balancer) and then offers what the fleet tests and bench/fleet_bench.py
need: run a playbook, put load on the balancer, sample which servers HAProxy has in rotation, and read
what each host serves.  Ansible and the load generator run on the host, inside the test's network
namespace, so every packet stays on the test's bridge.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import testbed

REPO = testbed.REPO_ROOT
ANSIBLE = REPO / "ansible"
APP = "flaskapp"
HTTP_HOST = "flaskapp.example"
LB_ADDRESS = 10
APP_ADDRESS = 11  # app1 is .11, app2 .12, ...

#: Prints one JSON line per sample: HAProxy's status of every server of the backend (run on the LB).
SAMPLER = r"""
import json, os, socket, sys, time
backend, period, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
while not os.path.exists(stop):
    try:
        s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect("/run/haproxy/admin.sock")
        s.sendall(b"show stat\n"); data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        lines = data.decode().splitlines()
        names = lines[0][2:].split(",")
        rows = [dict(zip(names, line.split(","))) for line in lines[1:] if line]
        mine = [r for r in rows if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")]
        print(json.dumps({"t": time.monotonic(), "servers": {r["svname"]: r["status"] for r in mine},
                          "stot": {r["svname"]: int(r["stot"] or 0) for r in mine}}), flush=True)
    except OSError as e:
        print(json.dumps({"t": time.monotonic(), "error": str(e)}), flush=True)
    time.sleep(period)
"""


#: The seed's way on each host: a plain gunicorn unit, no reloader (the baseline of bench/seed-restart.yml).
SEED_UNIT = """[Unit]
Description=The seed's way: a plain gunicorn serving /srv/seedapp (the fleet baseline)

[Service]
WorkingDirectory=/srv/seedapp
ExecStart=/opt/venv/bin/gunicorn --bind 127.0.0.1:8001 --workers 4 --graceful-timeout 30 app:app
ExecReload=/bin/kill -HUP $MAINPID
KillMode=mixed
"""

SEED_NGINX = """server {
    listen 8000;
    location / {
        proxy_pass http://127.0.0.1:8001;
        proxy_set_header Host $host;
    }
}
"""

SEED_HAPROXY = """# The seed's way, side by side with the product's backend (same defaults, same server options).
frontend seed
    bind :8080
    default_backend seed

backend seed
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host flaskapp.example
    http-check expect status 200
{default_server}
{servers}"""


@dataclass
class Run:
    """One ansible-playbook run: exit status, combined output, wall time."""

    rc: int
    out: str
    seconds: float
    started: float = 0.0  # time.monotonic() when it started
    tasks: list[dict] = field(default_factory=list)  # {"task", "start", "end"} in order (the timeline callback)

    def seconds_in(self, *words: str) -> float:
        """Wall time of the tasks whose name contains any of *words*."""
        return sum(t["end"] - t["start"] for t in self.tasks if any(w in t["task"] for w in words))

    def split(self) -> dict[str, float]:
        """deploy.yml's wall time by phase, from the task timeline: ansible-playbook's start-up (before the
        first task), the pre-flight and shipping, each batch's `reloader deploy` task (the canary's, then the
        waves'), the canary's judgement at HAProxy, and the rest (Ansible between tasks, the recap)."""
        gates = [t for t in self.tasks if t["task"].startswith("reloader_roll : reloader deploy ")]
        judged = [t for t in self.tasks if "Judge the canary" in t["task"]]
        if not self.tasks or not gates:
            return {}
        phases = {
            "start-up": self.tasks[0]["start"] - self.started,
            "pre-flight and ship": gates[0]["start"] - self.tasks[0]["start"],
            "canary deploy": gates[0]["end"] - gates[0]["start"],
            "canary judged": sum(t["end"] - t["start"] for t in judged[:1]),
            "waves deploy": sum(t["end"] - t["start"] for t in gates[1:]),
        }
        phases["Ansible between tasks, recap"] = self.seconds - sum(phases.values())
        return {k: round(v, 1) for k, v in phases.items()}

    def timeline(self) -> str:
        """One line per task: offset from the start and duration, for the test's log."""
        return "\n".join(f"  {t['start'] - self.started:6.1f} +{t['end'] - t['start']:5.1f}  {t['task'][:90]}"
                         for t in self.tasks)

    def deploys(self) -> dict[str, float]:
        """Seconds each host's `reloader deploy` took, from its own output ("deploy success in 3.9 s")."""
        found: dict[str, float] = {}
        for m in re.finditer(r"^(?:changed|ok): \[(\S+)\] => .*?deploy success in ([0-9.]+) s", self.out, re.M):
            found.setdefault(m.group(1), float(m.group(2)))
        return found

    def canary_window(self) -> float:
        """Seconds the canary was judged at HAProxy (the judge's own report), 0 without a canary."""
        m = re.search(r'\\"window_s\\": ([0-9.]+)', self.out) or re.search(r'"window_s": ([0-9.]+)', self.out)
        return float(m.group(1)) if m else 0.0

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counters per host (ok, changed, unreachable, failed, ...)."""
        hosts: dict[str, dict[str, int]] = {}
        for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", self.out, re.M):
            hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return hosts


@dataclass
class Samples:
    """HAProxy server states sampled on the balancer during a run."""

    rows: list[dict] = field(default_factory=list)

    def statuses(self) -> list[dict[str, str]]:
        return [r["servers"] for r in self.rows if "servers" in r]

    def min_up(self) -> int:
        return min((sum(s.startswith("UP") for s in row.values()) for row in self.statuses()), default=0)

    def max_drained(self) -> int:
        return max((sum(s.startswith("DRAIN") for s in row.values()) for row in self.statuses()), default=0)

    def mean_up(self) -> float:
        rows = self.statuses()
        return sum(sum(s.startswith("UP") for s in row.values()) for row in rows) / len(rows) if rows else 0.0


class Sampler:
    """Background sampling of HAProxy's server states (a python loop in the LB container)."""

    def __init__(self, lb: testbed.Container, backend: str = APP, period: float = 0.2) -> None:
        self.samples = Samples()
        self._lb = lb
        self._stop_file = f"/run/sampler-{time.monotonic_ns()}.stop"
        self._p = lb.popen(["python3", "-c", SAMPLER, backend, str(period), self._stop_file],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._p.stdout is not None
        for line in self._p.stdout:
            self.samples.rows.append(json.loads(line))

    def wait_for(self, predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
        """Wait until a sample satisfies *predicate* (a dict server -> status)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            rows = self.samples.statuses()
            if any(predicate(r) for r in rows[seen:]):
                return True
            seen = len(rows)
            time.sleep(0.1)
        return False

    def wait_traffic(self, requests: int, timeout: float = 30) -> None:
        """Wait until HAProxy has sent *requests* more sessions to the servers than at the first sample."""
        if not self.wait_for(lambda r: True, timeout):
            raise testbed.TestbedError("no HAProxy sample")
        base = sum(next(r for r in self.samples.rows if "stot" in r)["stot"].values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = next((r for r in reversed(self.samples.rows) if "stot" in r), None)
            if last and sum(last["stot"].values()) >= base + requests:
                return
            time.sleep(0.1)
        raise testbed.TestbedError(f"HAProxy saw fewer than {requests} requests in {timeout:g} s")

    def stop(self) -> Samples:
        """Ask the loop to end (a stop file, so nothing is killed) and collect what it printed."""
        self._lb.run(["touch", self._stop_file])
        self._p.wait(timeout=30)
        self._thread.join(timeout=30)
        return self.samples


class Load:
    """The load generator (reloader/loadgen.py) on the host, inside the network namespace, aimed at HAProxy."""

    def __init__(self, net: testbed.Network, tmp: Path, url: str, *, concurrency: int = 6, long: int = 2,
                 interval: float = 0.05, records: bool = False) -> None:
        """*interval*: each regular client pauses this long between requests (~100 requests/s in all), so the
        load is continuous without starving Ansible and the hosts of CPU on a 2-core machine."""
        self.out = tmp / f"load-{time.monotonic_ns()}.json"
        self.stop_file = self.out.with_suffix(".stop")
        cmd = [
            "python3", "-m", "reloader.loadgen", url, "--concurrency", str(concurrency), "--long", str(long),
            "--long-path", "/slow?s=2", "-H", f"Host: {HTTP_HOST}", "--until-file", str(self.stop_file),
            "--out", str(self.out), "--max-duration", "900", "--interval", str(interval),
            *(["--records"] if records else []),
        ]
        self._p = subprocess.Popen(net.argv(cmd), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)

    def stop(self) -> dict:
        self.stop_file.touch()
        try:
            self._p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait()
            raise
        if not self.out.exists():
            raise testbed.TestbedError(f"load generator wrote no report: {self._p.stderr.read()}")
        return json.loads(self.out.read_text())


def write_release(root: Path, name: str, version: str, *, extra: str = "") -> Path:
    """A release directory of the example app on the controller, VERSION = *version*, *extra* appended."""
    src = (REPO / "examples/flaskapp/app.py").read_text()
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "app.py").write_text(src.replace('VERSION = "v1"', f"VERSION = {version!r}") + extra)
    return d


class Fleet:
    """App hosts app1..appN and the balancer lb, set up with ansible/site.yml.  Use as a context manager."""

    def __init__(self, tmp: Path, hosts: int = 3) -> None:
        self.tmp = tmp
        self.n = hosts
        self.net = testbed.Network()
        self.lb: testbed.Container | None = None
        self.apps: dict[str, testbed.Container] = {}
        self.releases = tmp / "releases"
        self.key = tmp / "id_ed25519"
        self.inventory = tmp / "inventory.yml"
        self.cp_dir = tmp / "cp"
        self.site: Run | None = None

    # --- set-up -------------------------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self.net.__enter__()
        self.cp_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "reloader-fleet-test", "-f",
                        str(self.key)], check=True)
        pub = self.key.with_suffix(".pub").read_text()
        self.lb = testbed.boot(network=self.net, address=self.net.address(LB_ADDRESS))
        for i in range(1, self.n + 1):
            self.apps[f"app{i}"] = testbed.boot(network=self.net, address=self.net.address(APP_ADDRESS + i - 1))
        for c in self.containers():
            c.write_file("/root/.ssh/authorized_keys", pub, mode=0o600)
            c.run("chmod 700 /root/.ssh && systemctl start ssh.service")
        for c in self.apps.values():
            # The app's virtualenv is the image's (provisioning the venv is the app's business, not reloader's).
            c.run("mkdir -p /srv/flaskapp && ln -sfn /opt/venv /srv/flaskapp/venv")
        self.write_inventory()
        write_release(self.releases, "r1", "v1")
        self.site = self.playbook("site.yml", reloader_initial_release=str(self.releases / "r1"))
        if self.site.rc != 0:
            raise testbed.TestbedError(f"site.yml failed ({self.site.rc}):\n{self.site.out[-6000:]}")

    def containers(self) -> list[testbed.Container]:
        return ([self.lb] if self.lb else []) + list(self.apps.values())

    def write_inventory(self, path: Path | None = None, app_hosts: list[str] | None = None) -> Path:
        """The inventory: group ``app`` (app1..N, or *app_hosts*), group ``loadbalancer`` (lb)."""
        address = {"lb": self.net.address(LB_ADDRESS)}
        address |= {f"app{i}": self.net.address(APP_ADDRESS + i - 1) for i in range(1, self.n + 1)}
        hosts = app_hosts or list(self.apps)
        doc = {
            "all": {
                "vars": {
                    "ansible_user": "root",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "reloader_app_name": APP,
                    "reloader_app_config": str(REPO / "examples/flaskapp.toml"),
                    "reloader_http_host": HTTP_HOST,
                },
                "children": {
                    "app": {"hosts": {h: {"ansible_host": address[h]} for h in hosts}},
                    "loadbalancer": {"hosts": {"lb": {"ansible_host": address["lb"]}}},
                },
            }
        }
        path = path or self.inventory
        path.write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML
        return path

    # --- driving ------------------------------------------------------------------------------------------
    def playbook(self, name: str, *, inventory: Path | None = None, timeout: float = 600, cwd: Path = REPO,
                 **extra: object) -> Run:
        """ansible-playbook ansible/NAME (or the playbook at path NAME) with extra vars, on the host inside the
        namespace, run from the checkout's root as the docs show: the repo's ansible.cfg (SSH keepalive and
        timeouts included) is the one Ansible finds there.  The test bed adds only what a throw-away fleet
        needs (its key, no known_hosts); it sets no SSH keepalive of its own, so it cannot hide a missing one."""
        timeline = self.tmp / f"timeline-{time.monotonic_ns()}.jsonl"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_PRIVATE_KEY_FILE": str(self.key),
            "ANSIBLE_LOCAL_TEMP": str(self.tmp / "ansible-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.cp_dir),
            "ANSIBLE_SSH_EXTRA_ARGS": "-o UserKnownHostsFile=/dev/null",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORKS": "10",
            # the test bed's own callback: when each task started and ended (Run.tasks)
            "ANSIBLE_CALLBACK_PLUGINS": str(Path(__file__).resolve().parent / "ansible_plugins"),
            "ANSIBLE_CALLBACKS_ENABLED": "timeline",
            "RELOADER_TIMELINE": str(timeline),
        }
        path = Path(name) if os.path.isabs(name) else ANSIBLE / name
        cmd = ["ansible-playbook", "-v", "-i", str(inventory or self.inventory),
               str(path.relative_to(REPO)) if cwd == REPO else str(path)]
        if extra:
            cmd += ["-e", json.dumps(extra)]
        t0 = time.monotonic()
        p = subprocess.run(self.net.argv(cmd), env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout, check=False)
        tasks = [json.loads(line) for line in timeline.read_text().splitlines()] if timeline.exists() else []
        run = Run(p.returncode, p.stdout, time.monotonic() - t0, t0, tasks)
        testbed.log(f"ansible-playbook {name} {shlex.join(cmd[4:])}: rc={run.rc} in {run.seconds:.1f}s")
        return run

    def load(self, **kw: object) -> Load:
        return Load(self.net, self.tmp, f"http://{self.net.address(LB_ADDRESS)}/", **kw)  # type: ignore[arg-type]

    def sampler(self, period: float = 0.2, backend: str = APP) -> Sampler:
        assert self.lb is not None
        return Sampler(self.lb, backend, period)

    # --- observing ----------------------------------------------------------------------------------------
    def served(self, host: str) -> dict:
        """What *host*'s nginx answers on / (version, release), asked on the host itself."""
        r = self.apps[host].run(f"curl -s -m 10 -H 'Host: {HTTP_HOST}' http://127.0.0.1/", check=False)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": r.stdout[-200:] or r.stderr[-200:]}

    def current(self, host: str) -> str:
        """The release ``current`` points at on *host*."""
        return os.path.basename(self.apps[host].run("readlink /srv/flaskapp/current").stdout.strip())

    def releases_on(self, host: str) -> list[str]:
        return sorted(self.apps[host].run("ls /srv/flaskapp/releases").stdout.split())

    def haproxy_states(self, backend: str = APP) -> dict[str, str]:
        """HAProxy's status of every backend server now (UP, DRAIN, DOWN, MAINT)."""
        assert self.lb is not None
        out = {}
        for host in self.apps:
            r = self.lb.run(["haproxy-server", "show", backend, host], check=False)
            out[host] = json.loads(r.stdout)["status"] if r.returncode == 0 else f"<{r.stderr.strip()}>"
        return out

    def stop_host(self, host: str) -> None:
        """The host dies: its container is stopped (the rest of the fleet keeps running)."""
        self.apps[host].stop()

    def cut_host(self, host: str) -> tuple[float, float]:
        """The host's network goes away without a word (a power loss, a pulled cable): its port on the test's
        bridge is set down, so nothing it had open gets a reset or a FIN; then its container is stopped.
        Returns the monotonic times just before and just after the port went down: the cut happened in
        between (finding the port first takes a while on a loaded machine, and requests keep coming)."""
        iflink = self.apps[host].run("cat /sys/class/net/host0/iflink").stdout.strip()
        links = subprocess.run(["ip", "-n", self.net.name, "-o", "link", "show"], capture_output=True,
                               text=True, check=True).stdout
        port = next((line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
                     if line.split(":")[0].strip() == iflink), None)
        if port is None:
            raise testbed.TestbedError(f"{host}: no bridge port with ifindex {iflink}:\n{links}")
        before = time.monotonic()
        subprocess.run(["ip", "-n", self.net.name, "link", "set", "dev", port, "down"], check=True)
        after = time.monotonic()
        testbed.log(f"{host}: bridge port {port} down")
        self.apps[host].stop()
        return before, after

    # --- the seed's way, side by side (the baseline) -----------------------------------------------------
    def install_seed(self) -> None:
        """The seed's setup on every app host, beside reloader's app: nginx on :8000 -> a plain gunicorn
        unit (seedapp.service, code in /srv/seedapp, updated in place), and a second HAProxy frontend
        (:8080, backend ``seed``) with the same defaults and server options as the product's backend."""
        assert self.lb is not None
        for c in self.apps.values():
            c.run("mkdir -p /srv/seedapp && cp /srv/flaskapp/current/app.py /srv/seedapp/app.py")
            c.write_file("/etc/systemd/system/seedapp.service", SEED_UNIT)
            c.write_file("/etc/nginx/sites-enabled/seedapp", SEED_NGINX)
            c.run("systemctl daemon-reload && systemctl start seedapp.service && systemctl reload nginx")
        rendered = self.lb.run("cat /etc/haproxy/haproxy.cfg").stdout
        default_server = next(line for line in rendered.splitlines() if line.strip().startswith("default-server"))
        servers = "".join(f"    server {h} {self.net.address(APP_ADDRESS + i)}:8000\n" for i, h in enumerate(self.apps))
        self.lb.write_file("/etc/haproxy/seed.cfg", SEED_HAPROXY.format(default_server=default_server,
                                                                         servers=servers))
        self.lb.write_file("/etc/default/haproxy",
                           'EXTRAOPTS="-S /run/haproxy-master.sock -f /etc/haproxy/seed.cfg"\n')
        self.lb.run("haproxy -c -f /etc/haproxy/haproxy.cfg -f /etc/haproxy/seed.cfg && systemctl restart haproxy")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(self.haproxy_states(backend).get(h, "").startswith("UP") for backend in (APP, "seed")
                   for h in self.apps):
                return
            time.sleep(0.3)
        raise testbed.TestbedError(f"seed backend not up: {self.haproxy_states('seed')}")

    def seed_load(self, **kw: object) -> Load:
        return Load(self.net, self.tmp, f"http://{self.net.address(LB_ADDRESS)}:8080/", **kw)  # type: ignore[arg-type]

    def seed_served(self, host: str) -> dict:
        """What *host*'s seed app answers on / (through its nginx on :8000)."""
        r = self.apps[host].run(f"curl -s -m 10 -H 'Host: {HTTP_HOST}' http://127.0.0.1:8000/", check=False)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"error": r.stdout[-200:] or r.stderr[-200:]}

    # --- clean-up -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """End the SSH masters Ansible left behind, stop every container, delete the network."""
        for sock in self.cp_dir.glob("*") if self.cp_dir.is_dir() else []:
            subprocess.run(self.net.argv(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "fleet"]),
                           capture_output=True, check=False, timeout=30)
        for c in self.containers():
            c.stop()
        self.net.close()
