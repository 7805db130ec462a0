#!/usr/bin/env python3
"""Real-systemd test bed: a debootstrapped Debian booted with systemd-nspawn.

Why this exists: reloader drives gunicorn and nginx through systemd (D-Bus,
unit files, reload semantics).  Mocks cannot tell us whether systemd really
does what we expect, so the tests boot a throw-away Debian with systemd as
PID 1 and run the product inside it.

Design decisions (each learned the hard way on the CI host):

* The image is built once with debootstrap and cached under
  ``/var/cache/reloader-testbed/<suite>-<key>/rootfs``; ``key`` hashes the
  recipe so editing the recipe invalidates the cache automatically.
* Every boot gets its own overlayfs on top of the cached tree, so tests can
  never pollute each other or the image.
* Software only one test needs (PostgreSQL) is a cached layer over the image
  (``LAYERS``, ``boot(layer=...)``): adding it to the recipe would rebuild
  every image and enlarge every container.
* The host's PID 1 is not systemd, so nspawn runs with ``--register=no
  --keep-unit`` and we place it in a fresh cgroup ourselves.
* ``--console=read-only``: a passive console fills up and blocks PID 1.
* We enter the container with ``nsenter -a`` on the container's PID 1
  instead of ``machinectl``/``systemd-run -M`` (there is no host systemd).
* Python packages are downloaded on the host (the container has a private
  network) and installed from local wheels.

Usable from pytest (``boot()``, ``ensure_image()``, ``Container``) and as a
CLI: ``build``, ``shell``, ``run -- CMD...`` and ``cleanup`` (leftovers of a
killed run).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path("/var/cache/reloader-testbed")
RUN_DIR = Path("/var/tmp/reloader-testbed")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
CGROUP_PARENT = "reloader-testbed"
# nspawn leaves these behind when /run is not a tmpfs (as on the CI VM).
NSPAWN_RUN = Path("/run/systemd/nspawn")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))

DEBOOTSTRAP_INCLUDE = ("systemd", "systemd-sysv", "dbus", "ca-certificates")
APT_PACKAGES = (
    "nginx",
    "python3",
    "python3-venv",
    "python3-pystemd",
    "python3-sdnotify",
    "python3-jinja2",
    # For tests/test_pip_install.py: an offline `pip install --no-build-isolation .` needs bdist_wheel.
    "python3-wheel",
    "curl",
    "procps",
    "iproute2",
    "less",
    # Fleet tests (tests/test_ansible_fleet.py): Ansible reaches the containers over SSH and one of them is
    # the HAProxy load balancer.  Both units are disabled in the image; only those tests start them.
    "openssh-server",
    "haproxy",
    "socat",
    # Ansible's apt module (the reloader_app and haproxy roles) needs it on the managed host.
    "python3-apt",
)
#: Installed but not started at boot, so the other tests' containers boot as fast as before.
DISABLED_UNITS = ("ssh.service", "ssh.socket", "haproxy.service")
# One /opt/venv shared by every app of a container: the example app (flask), the real apps of tests/apps/
# (Django 5.2 LTS, FastAPI on uvicorn-worker and on gunicorn's asgi worker) and gunicorn's gevent worker.
PIP_REQUIREMENTS = (
    "gunicorn[gevent]==27.0.1",
    "flask",
    "django==5.2.8",
    "fastapi==0.165.0",
    "uvicorn-worker==0.4.0",
    "uvicorn==0.54.0",
)
#: Cached layers on top of an image, for the few tests that need software no other container should carry
#: (in the recipe above it would rebuild every image and enlarge every container): name -> (apt packages,
#: pip requirements added to /opt/venv).  :func:`ensure_layer` builds one once, like the image; a test boots
#: it with ``boot(layer=NAME)``.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # tests/test_after_switch_pg.py: Debian's PostgreSQL (its cluster starts at boot) and psycopg 3 for the app.
    "postgresql": (("postgresql",), ("psycopg[binary]==3.3.9",)),
}
# Units that only slow a container down or fail on a read-only console.
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "console-getty.service",
    "getty@.service",
    "serial-getty@.service",
)

INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

_T0 = time.monotonic()


class TestbedError(RuntimeError):
    """Anything that went wrong building, booting or driving the test bed."""


def log(msg: str) -> None:
    """Progress on stderr with elapsed seconds, so slow steps are visible in CI."""
    print(f"[testbed {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _sh(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    quiet: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command, raising with its output on failure (why: debugging CI)."""
    proc = subprocess.run(
        list(cmd),
        env=dict(env) if env is not None else None,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise TestbedError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout[-8000:]}")
    if not quiet and proc.stdout.strip():
        for line in proc.stdout.strip().splitlines()[-3:]:
            log(f"  | {line}")
    return proc


# --------------------------------------------------------------------------
# Host prerequisites
# --------------------------------------------------------------------------


def missing_prerequisites() -> list[str]:
    """Why the bed cannot run on this host (empty list if it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (debootstrap, mount, nspawn need it)")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "mount", "chroot"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found in PATH (run: bash tests/bootstrap-host.sh)")
    return problems


# --------------------------------------------------------------------------
# Mirror discovery
# --------------------------------------------------------------------------


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    """Parse deb822 into dicts (continuation lines joined, comments dropped)."""
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, ""
            continue
        if raw[0] in " \t" and key:
            cur[key] += " " + raw.strip()
            continue
        name, _, value = raw.partition(":")
        key = name.strip().lower()
        cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def _debian_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) pairs of the host's binary Debian sources."""
    found: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for st in _deb822_stanzas(path.read_text()):
            if st.get("enabled", "yes").lower() == "no" or "deb" not in st.get("types", "").split():
                continue
            for uri in st.get("uris", "").split():
                found.append((uri, st.get("suites", "").split()))
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]]))
    return found


def find_mirror(suite: str) -> str:
    """Debian archive URL from the host's apt config (never hard-coded: CI hosts
    may only reach a local mirror/proxy).

    Prefer a source listing ``suite`` itself; otherwise (e.g. trixie on a
    bookworm host) use the main archive, i.e. a source with a plain suite name
    that is not a -security/-updates pocket.
    """
    sources = _debian_sources()
    for uri, suites in sources:
        if suite in suites:
            return uri
    for uri, suites in sources:
        if any("-" not in s and "/" not in s for s in suites) and "security" not in uri:
            return uri
    raise TestbedError(f"no Debian mirror for {suite!r} found in /etc/apt sources")


# --------------------------------------------------------------------------
# Image build
# --------------------------------------------------------------------------


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/mounts."""
    prefix = str(path.resolve())
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mp = line.split()[1].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            points.append(mp)
    return sorted(points, key=len, reverse=True)


def _unmount_all(path: Path) -> None:
    """Unmount everything below ``path``; lazily if busy.  Why: a crashed build or
    boot must never leave a bind of the host's /dev around for ``rm -rf``."""
    for _ in range(5):
        points = _mounts_under(path)
        if not points:
            return
        for mp in points:
            if subprocess.run(["umount", mp], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    if _mounts_under(path):
        raise TestbedError(f"could not unmount {_mounts_under(path)}")


def _safe_rmtree(path: Path) -> None:
    """Remove a tree we created, refusing to cross into any mount."""
    if not path.exists():
        return
    _unmount_all(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev for maintainer scripts; a policy-rc.d so nothing starts
    on the HOST; the host's resolv.conf so apt resolves.  All undone after."""
    policy = root / "usr/sbin/policy-rc.d"
    resolv = root / "etc/resolv.conf"
    resolv_saved = root / "etc/resolv.conf.testbed-saved"
    try:
        _sh(["mount", "-t", "proc", "proc", str(root / "proc")])
        _sh(["mount", "-t", "sysfs", "-o", "ro", "sysfs", str(root / "sys")])
        _sh(["mount", "--bind", "/dev", str(root / "dev")])
        _sh(["mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", str(root / "dev/pts")])
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        if resolv.exists() or resolv.is_symlink():
            resolv.rename(resolv_saved)
        shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        policy.unlink(missing_ok=True)
        if resolv_saved.exists() or resolv_saved.is_symlink():
            resolv.unlink(missing_ok=True)
            resolv_saved.rename(resolv)
        _unmount_all(root / "dev/pts")
        _unmount_all(root / "dev")
        _unmount_all(root / "sys")
        _unmount_all(root / "proc")


def _chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the tree with a clean, non-interactive environment."""
    env = {
        "PATH": INNER_PATH,
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
    }
    return _sh(["chroot", str(root), *cmd], env=env)


def _image_python_version(root: Path) -> str:
    """X.Y of the image's python3 (wheels must match it, not the host's)."""
    versions = sorted(
        (
            p.name[len("python") :]
            for p in (root / "usr/bin").glob("python3.*")
            if re.fullmatch(r"python3\.\d+", p.name)
        ),
        key=lambda v: int(v.split(".")[1]),
    )
    if not versions:
        raise TestbedError(f"no python3.X in {root}/usr/bin")
    return versions[-1]


def _download_wheels(pyver: str, dest: Path) -> None:
    """Fetch wheels on the host (the host's own pip config decides the index)."""
    dest.mkdir(parents=True, exist_ok=True)
    _sh(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            pyver,
            "--platform",
            f"manylinux2014_{os.uname().machine}",
            "--implementation",
            "cp",
            "-d",
            str(dest),
            *PIP_REQUIREMENTS,
        ],
        timeout=600,
    )


def _build_rootfs(suite: str, root: Path, mirror: str) -> None:
    """The image recipe.  Its source is part of the cache key."""
    debootstrap = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
    ]
    if KEYRING.exists():
        debootstrap.append(f"--keyring={KEYRING}")
    log(f"debootstrap {suite} from {mirror}")
    _sh([*debootstrap, suite, str(root), mirror], timeout=1800)

    with _chroot_mounts(root):
        log("apt-get install " + " ".join(APT_PACKAGES))
        _chroot(root, "apt-get", "update")
        _chroot(root, "apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES)
        _chroot(root, "apt-get", "clean")

        pyver = _image_python_version(root)
        wheel_dir = root / "root/wheels"
        log(f"pip download for python {pyver}: {' '.join(PIP_REQUIREMENTS)}")
        _download_wheels(pyver, wheel_dir)
        log("venv /opt/venv")
        _chroot(root, "python3", "-m", "venv", "/opt/venv")
        _chroot(
            root,
            "/opt/venv/bin/pip",
            "install",
            "--no-index",
            "--find-links",
            "/root/wheels",
            *PIP_REQUIREMENTS,
        )
        shutil.rmtree(wheel_dir)

    log("configure image")
    (root / "etc/nginx/sites-enabled/default").unlink(missing_ok=True)
    default_target = root / "etc/systemd/system/default.target"
    default_target.unlink(missing_ok=True)
    default_target.symlink_to("/lib/systemd/system/multi-user.target")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for unit in DISABLED_UNITS:
        # Not glob(): it follows the links, and their absolute targets do not exist on the host.
        for wants in (root / "etc/systemd/system").glob("*.wants"):
            (wants / unit).unlink(missing_ok=True)
    _chroot(root, "passwd", "-d", "root")
    # Empty machine-id: each boot gets a fresh transient one, no first-boot logic.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("testbed\n")


def recipe_key(suite: str) -> str:
    """Short hash of everything that decides the image content."""
    h = hashlib.sha256()
    for part in (
        suite,
        repr(DEBOOTSTRAP_INCLUDE),
        repr(APT_PACKAGES),
        repr(PIP_REQUIREMENTS),
        repr(MASKED_UNITS),
        repr(DISABLED_UNITS),
        inspect.getsource(_build_rootfs),
        inspect.getsource(_chroot_mounts),
        inspect.getsource(_chroot),
        inspect.getsource(_download_wheels),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def image_dir(suite: str) -> Path:
    """Cache directory of the current recipe for ``suite``."""
    return CACHE_DIR / f"{suite}-{recipe_key(suite)}"


def ensure_image(suite: str = "bookworm") -> Path:
    """Return the cached rootfs for ``suite``, building it if needed.

    A file lock serialises concurrent pytest workers; the ``.complete`` stamp
    is written last so a half-built tree is detected and rebuilt.
    """
    problems = missing_prerequisites()
    if problems:
        raise TestbedError("; ".join(problems))
    base = image_dir(suite)
    root = base / "rootfs"
    stamp = base / ".complete"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return root
        t0 = time.monotonic()
        log(f"building {suite} image in {base}")
        _safe_rmtree(base)
        base.mkdir(parents=True)
        try:
            _build_rootfs(suite, root, find_mirror(suite))
        except BaseException:
            log(f"build of {suite} failed; removing {base}")
            _safe_rmtree(base)
            raise
        stamp.write_text(f"built in {time.monotonic() - t0:.0f}s\n")
        log(f"{suite} image ready after {time.monotonic() - t0:.1f}s")
        return root


def layer_dir(suite: str, name: str) -> Path:
    """Cache directory of layer ``name`` on the current ``suite`` image (keyed by both recipes)."""
    h = hashlib.sha256()
    for part in (recipe_key(suite), name, repr(LAYERS[name]), inspect.getsource(_build_layer)):
        h.update(part.encode())
        h.update(b"\0")
    return CACHE_DIR / f"{suite}-{recipe_key(suite)}-{name}-{h.hexdigest()[:12]}"


def _build_layer(image: Path, base: Path, apt: Sequence[str], pip: Sequence[str]) -> None:
    """Install ``apt`` and ``pip`` into an overlay on ``image`` whose upper dir, ``base/upper``, is the layer."""
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    _sh(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={image},upperdir={upper},workdir={work}",
         str(merged)])
    try:
        with _chroot_mounts(merged):
            log("layer: apt-get install " + " ".join(apt))
            _chroot(merged, "apt-get", "update")
            _chroot(merged, "apt-get", "install", "-y", "--no-install-recommends", *apt)
            _chroot(merged, "apt-get", "clean")
            if pip:
                wheels = merged / "root/layer-wheels"
                wheels.mkdir()
                log("layer: pip install " + " ".join(pip))
                _sh([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                     "--python-version", _image_python_version(merged), "--platform",
                     f"manylinux2014_{os.uname().machine}", "--implementation", "cp", "-d", str(wheels), *pip],
                    timeout=600)
                _chroot(merged, "/opt/venv/bin/pip", "install", "--no-index", "--find-links", "/root/layer-wheels",
                        *pip)
                shutil.rmtree(wheels)
    finally:
        _unmount_all(merged)
    _safe_rmtree(work)
    merged.rmdir()


def ensure_layer(suite: str, name: str) -> Path:
    """Return the cached layer ``name`` (a key of :data:`LAYERS`) for ``suite``, building it if needed:
    an overlay upper dir that :func:`boot` stacks on the image.  Locked and stamped like the image."""
    image = ensure_image(suite)
    base = layer_dir(suite, name)
    stamp = base / ".complete"
    with open(CACHE_DIR / f"{suite}-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return base / "upper"
        t0 = time.monotonic()
        log(f"building layer {name} in {base}")
        _safe_rmtree(base)
        base.mkdir(parents=True)
        apt, pip = LAYERS[name]
        try:
            _build_layer(image, base, apt, pip)
        except BaseException:
            log(f"build of layer {name} failed; removing {base}")
            _safe_rmtree(base)
            raise
        stamp.write_text(f"built in {time.monotonic() - t0:.0f}s\n")
        log(f"layer {name} ready after {time.monotonic() - t0:.1f}s")
        return base / "upper"


# --------------------------------------------------------------------------
# Boot
# --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc/<pid>/task/*/children)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _nspid(pid: int) -> list[str]:
    """The NSpid: line of a process (its pid in each nested pid namespace)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return line.split()[1:]
    return []


def _find_container_pid1(nspawn_pid: int) -> int | None:
    """Host pid of the container's init: a descendant of nspawn that is pid 1
    in a nested pid namespace."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        ns = _nspid(pid)
        if len(ns) >= 2 and ns[-1] == "1":
            return pid
        todo += _children(pid)
    return None


class Container:
    """A booted container; build with :func:`boot`, always :meth:`stop` it."""

    def __init__(self, suite: str, image: Path, binds: Sequence[str] = (), network: Network | None = None,
                 address: str = "", layers: Sequence[Path] = ()) -> None:
        self.suite = suite
        #: Cached layers (:func:`ensure_layer`) stacked over the image, topmost first.
        self.layers = list(layers)
        self.network = network
        self.address = address
        self.image = image
        self.name = f"rt-{os.getpid()}-{secrets.token_hex(3)}"
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=RUN_DIR))
        self.root = self.tmpdir / "merged"
        self.log_path = self.tmpdir / "nspawn.log"
        self.pid1: int = 0
        self.binds = list(binds)
        self.cgroups: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._popens: list[subprocess.Popen] = []  # type: ignore[type-arg]
        self._stopped = False
        self._root_lock: Path | None = None

    # -- lifecycle ---------------------------------------------------------

    def _start(self) -> None:
        """Mount the overlay, start nspawn in its own cgroup, wait for boot."""
        upper, work = self.tmpdir / "upper", self.tmpdir / "work"
        for d in (upper, work, self.root):
            d.mkdir()
        _sh(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={':'.join(map(str, [*self.layers, self.image]))},upperdir={upper},workdir={work}",
                str(self.root),
            ]
        )
        st = self.root.stat()
        self._root_lock = NSPAWN_RUN / f"locks/inode-{st.st_dev}:{st.st_ino}"
        cgroup_procs = []
        for base in CGROUP_ROOTS:
            if not (base / "cgroup.procs").exists():
                continue
            cg = base / CGROUP_PARENT / self.name
            try:
                cg.mkdir(parents=True)
            except OSError:
                continue
            self.cgroups.append(cg)
            cgroup_procs.append(str(cg / "cgroup.procs"))
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "-D",
            str(self.root),
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            *(["--private-network"] if self.network is None else [f"--network-bridge={self.network.bridge}"]),
            f"--machine={self.name}",
            f"--bind-ro={REPO_ROOT}:/src",
            *(f"--bind={b}" for b in self.binds),
        ]
        if self.network is not None:
            # nspawn creates its veth in the namespace it runs in: the test's, where the bridge is.
            cmd = ["nsenter", f"--net={self.network.path}", "--", *cmd]
        # A tiny wrapper moves itself into the new cgroups, then execs nspawn,
        # so nspawn never runs (or forks) in the caller's cgroup.
        wrapper = (
            'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f"; done; '
            'while [ "$1" != -- ]; do shift; done; shift; exec "$@"'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
        # Pure cgroup v2 inside, like a stock Debian 12/13 host (and systemd
        # >= 256 refuses v1 anyway): rooted at our fresh unified cgroup.
        env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        with open(self.log_path, "wb") as logf:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", wrapper, "sh", *cgroup_procs, "--", *cmd],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._wait_running()
        if self.network is not None:
            self.network.configure(self)

    def _nspawn_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _wait_running(self) -> None:
        """Poll until systemd reports running/degraded, within BOOT_TIMEOUT."""
        assert self._proc is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TestbedError(f"systemd-nspawn exited with {self._proc.returncode}:\n{self._nspawn_log()}")
            if not self.pid1:
                self.pid1 = _find_container_pid1(self._proc.pid) or 0
            if self.pid1:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    if state == "degraded":
                        failed = self.run(["systemctl", "--failed", "--no-pager"], check=False)
                        log(f"{self.name} is degraded:\n{failed.stdout}")
                    return
            time.sleep(0.1)
        raise TestbedError(
            f"{self.name} not running after {BOOT_TIMEOUT}s (state={state!r}, pid1={self.pid1}):\n{self._nspawn_log()}"
        )

    def stop(self) -> None:
        """Power off (gracefully if possible), unmount, remove all traces.

        Idempotent; only ever kills the nspawn process we started and the
        processes in the cgroups we created for it.
        """
        if self._stopped:
            return
        self._stopped = True
        proc = self._proc
        try:
            self._kill_popens()
            if proc is not None and proc.poll() is None:
                if self.pid1:
                    with contextlib.suppress(Exception):
                        self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log(f"{self.name}: no clean poweroff in {STOP_TIMEOUT}s, killing")
                    self._kill_all()
                    proc.wait(timeout=10)
            self._kill_all()  # stragglers (e.g. popen'ed nsenter clients)
        finally:
            _unmount_all(self.tmpdir)
            _safe_rmtree(self.tmpdir)
            self._remove_cgroups()
            _remove_nspawn_leftovers(self.name, self._root_lock)

    def _kill_popens(self) -> None:
        """End every unfinished :meth:`popen` from the inside out.

        Why not just kill nsenter: its child would be orphaned to the HOST's
        init (nsenter lives outside the pid namespace), and systemd-shutdown
        then waits ~10 s for that unreaped zombie.  Worse, leaving nsenter
        alive deadlocks poweroff: systemd-shutdown SIGSTOPs everything in the
        namespace, nsenter sees its child stop, stops itself, never reaps the
        child, and the container's PID 1 hangs in zap_pid_ns_processes.  So:
        SIGKILL the inner process tree (all started by us), let nsenter reap
        its child and exit, and only kill nsenter as a last resort.
        """
        for p in self._popens:
            if p.poll() is not None:
                continue
            todo, tree = [p.pid], []
            while todo:
                kids = _children(todo.pop())
                tree += kids
                todo += kids
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for cg in self.cgroups:
            for procs in cg.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids |= {int(p) for p in procs.read_text().split()}
        return pids

    def _kill_all(self) -> None:
        """SIGKILL our nspawn and whatever still lives in our cgroups."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if hasattr(self, "_popens"):
            self._kill_popens()
        for _ in range(50):
            pids = self._cgroup_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        for cg in self.cgroups:
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()
            with contextlib.suppress(OSError):  # fails while others still use it
                cg.parent.rmdir()

    def __enter__(self) -> Container:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- driving -----------------------------------------------------------

    def _argv(self, cmd: Sequence[str] | str, env: Mapping[str, str] | None) -> list[str]:
        """nsenter into all namespaces of PID 1, with a clean environment."""
        if not self.pid1:
            raise TestbedError("container is not running")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        inner_env = {"PATH": INNER_PATH, "LANG": "C.UTF-8", **(env or {})}
        return [
            "nsenter",
            "-t",
            str(self.pid1),
            "-a",
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in inner_env.items()),
            *argv,
        ]

    def run(
        self,
        cmd: list[str] | str,
        *,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside (a str goes through /bin/sh -c); capture text output."""
        proc = subprocess.run(
            self._argv(cmd, env),
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise TestbedError(
                f"in {self.name}: {cmd!r} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        return proc

    def popen(self, cmd: list[str] | str, *, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start ``cmd`` inside in the background (e.g. a load generator).

        The returned process is the host-side ``nsenter``; :meth:`stop` kills
        it if still running, and the inner process dies with the container.
        """
        p = subprocess.Popen(self._argv(cmd, env), **kw)  # type: ignore[call-overload]
        self._popens.append(p)
        return p

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write through the container (so /tmp and other inner mounts work)."""
        self.run(
            [
                "/bin/sh",
                "-c",
                'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                "sh",
                path,
                f"{mode:o}",
            ],
            input=text,
        )

    def read_file(self, path: str) -> str:
        """Read a file as the container sees it."""
        return self.run(["cat", path]).stdout


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an unreaped corpse is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _remove_nspawn_leftovers(name: str, lock: Path | None = None) -> None:
    """Drop the empty propagate dir and image lock nspawn fails to remove
    ("Attempted to remove disk file system ... can't allow that")."""
    with contextlib.suppress(OSError):
        (NSPAWN_RUN / "propagate" / name).rmdir()
    if lock is not None:
        lock.unlink(missing_ok=True)


def cleanup_stale(*, kill: bool = False) -> list[str]:
    """Remove leftovers of containers whose creating process died (e.g. a
    SIGKILLed pytest): overlay mounts, temp dirs, cgroups.

    Dirs are named ``rt-<creator pid>-<hex>.*``.  If processes still live in
    such a container's cgroups they are only killed with ``kill=True`` (the
    ``cleanup`` CLI); otherwise the leftover is reported and kept.
    """
    removed: list[str] = []
    if not RUN_DIR.is_dir():
        return removed
    for tmp in sorted(RUN_DIR.iterdir()):
        m = re.fullmatch(r"(rt-(\d+)-[0-9a-f]+)\..*", tmp.name)
        if not m or _alive(int(m.group(2))):
            continue
        name = m.group(1)
        cgroups = [base / CGROUP_PARENT / name for base in CGROUP_ROOTS]
        c = Container.__new__(Container)
        c.cgroups = [cg for cg in cgroups if cg.exists()]
        c._proc = None
        if c._cgroup_pids():
            if not kill:
                log(f"stale container {name} still has processes; run: testbed.py cleanup")
                continue
            c._kill_all()
        _safe_rmtree(tmp)
        c._remove_cgroups()
        _remove_nspawn_leftovers(name)
        removed.append(name)
    for ns in sorted(NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []:
        m = re.fullmatch(r"rt-(\d+)-[0-9a-f]+", ns.name)
        if m and not _alive(int(m.group(1))):
            delete_netns(ns.name)
            removed.append(f"netns {ns.name}")
    propagate = NSPAWN_RUN / "propagate"
    for d in propagate.iterdir() if propagate.is_dir() else []:
        m = re.fullmatch(r"rt-(\d+)-[0-9a-f]+", d.name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                d.rmdir()
    return removed


# --------------------------------------------------------------------------
# A private network for several containers
# --------------------------------------------------------------------------

NETNS_DIR = Path("/run/netns")


class Network:
    """A network namespace of the test's own with one bridge in it.

    Containers booted with ``boot(network=net, address=...)`` get a veth on the bridge and a static
    address on ``host0`` (no DHCP: nothing to wait for).  The host side (Ansible, load generators) joins
    the namespace with :meth:`argv`, the bridge's own address is the controller's, so test traffic never
    leaves the namespace.

    Why ``nsenter --net`` and not ``ip netns exec``: the latter remounts a fresh /sys, which hides the
    cgroup tree nspawn needs ("No medium found").  Always use it as a context manager (or call
    :meth:`close`): the namespace, its bridge and veths are deleted on the way out.
    """

    def __init__(self, prefix: str = "10.77.0") -> None:
        self.name = f"rt-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = str(NETNS_DIR / self.name)
        self.bridge = "br0"
        self.prefix = prefix
        self.controller = self.address(1)
        self._created = False

    def address(self, n: int) -> str:
        """The ``n``-th address of the subnet (1 is the controller on the bridge)."""
        return f"{self.prefix}.{n}"

    def __enter__(self) -> Network:
        _sh(["ip", "netns", "add", self.name])
        self._created = True
        try:
            ip = ["ip", "-n", self.name]
            _sh([*ip, "link", "set", "lo", "up"])
            _sh([*ip, "link", "add", self.bridge, "type", "bridge"])
            _sh([*ip, "addr", "add", f"{self.controller}/24", "dev", self.bridge])
            _sh([*ip, "link", "set", self.bridge, "up"])
        except BaseException:
            self.close()
            raise
        log(f"network {self.name}: bridge {self.bridge} {self.controller}/24")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def configure(self, c: Container) -> None:
        """Give a freshly booted container its static address on ``host0``."""
        if not c.address:
            raise TestbedError(f"{c.name}: boot(network=...) needs an address")
        c.run(["ip", "addr", "add", f"{c.address}/24", "dev", "host0"])
        c.run(["ip", "link", "set", "host0", "up"])

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on the host but inside this network namespace."""
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def close(self) -> None:
        """Delete the veths, the bridge and the namespace (idempotent)."""
        if not self._created:
            return
        self._created = False
        delete_netns(self.name)


def delete_netns(name: str) -> None:
    """Remove every link of namespace ``name`` but lo, then the namespace itself."""
    r = subprocess.run(["ip", "-n", name, "-o", "link", "show"], capture_output=True, text=True, check=False)
    links = [line.split(":")[1].strip().split("@")[0] for line in r.stdout.splitlines() if ":" in line]
    for link in sorted((x for x in links if x != "lo"), key=lambda x: x == "br0"):  # veths first
        subprocess.run(["ip", "-n", name, "link", "del", link], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def boot(suite: str = "bookworm", binds: Sequence[str] = (), *, network: Network | None = None,
         address: str = "", layer: str = "") -> Container:
    """Boot a fresh container of ``suite``; ``binds`` are nspawn ``--bind=`` specs.

    With ``network``, the container sits on that :class:`Network`'s bridge at ``address`` instead of
    having a private network of its own.  With ``layer`` (a key of :data:`LAYERS`), that cached layer
    lies over the image.
    """
    image = ensure_image(suite)
    layers = [ensure_layer(suite, layer)] if layer else []
    cleanup_stale()
    t0 = time.monotonic()
    c = Container(suite, image, binds, network, address, layers)
    try:
        c._start()
    except BaseException:
        c.stop()
        raise
    log(f"{c.name} ({suite}) running after {time.monotonic() - t0:.2f}s, pid1={c.pid1}")
    return c


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``build``, ``shell``, ``run -- CMD...`` or ``cleanup``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--suite", default="bookworm", choices=("bookworm", "trixie"))
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("build", "shell", "run", "cleanup"):
        p = sub.add_parser(name)
        p.add_argument("--suite", default=argparse.SUPPRESS, choices=("bookworm", "trixie"))
        if name == "run":
            p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.action == "cleanup":
        for name in cleanup_stale(kill=True):
            print(f"removed {name}")
        return 0
    if args.action == "build":
        print(ensure_image(args.suite))
        return 0

    # SIGTERM -> KeyboardInterrupt so the finally below always cleans up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with boot(args.suite) as c:
        if args.action == "shell":
            print(
                f"container {c.name} is up (root: {c.root}). Enter it with:\n"
                f"  nsenter -t {c.pid1} -a -- /bin/bash -l\n"
                "Ctrl-C here stops it.",
                flush=True,
            )
            try:
                while c._proc is not None and c._proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command: run -- CMD...")
        return c.popen(cmd).wait()


if __name__ == "__main__":
    sys.exit(main())
