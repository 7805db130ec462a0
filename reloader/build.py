"""Turn a checkout, a git ref or a tarball into a built release directory, ready to deploy.

``reloader deploy NAME --from SRC`` (and ``reloader install CONFIG --from SRC``, for the first one) create
``RELEASES_ROOT/N`` (the next number), copy SRC into it, create the virtualenv from ``[build]
requirements`` when asked, and run the ``[build] commands`` in it: as the app's user, with its
environment, the release writable and no sandbox, because these steps write *into* the release (compiled
translations, collected static files, front-end bundles). The sandboxed ``[setup]`` commands run later,
on every deploy, for what writes elsewhere (migrations). Once built, the release belongs to root again,
so the app can never change its own code.

A failed build removes its directory: nothing half-made is ever listed, pointed at or deployed.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import causes, releases
from .config import AppConfig
from .errors import Failed
from .run import run

BUILDING = releases.BUILDING
#: Never copied from a checkout: VCS data, bytecode, local virtualenvs (they hold absolute paths).
IGNORED = (".git", ".hg", "__pycache__", "*.pyc", ".venv", "venv", "node_modules", ".tox", ".pytest_cache")
TARBALLS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class BuildFailed(Failed):
    """The release could not be made; its directory is gone, nothing else changed."""


def root_of(app: AppConfig) -> Path:
    """Where the new release goes: ``[reload] releases_root``, else next to the release ``current`` points
    at, else (no release yet) ``releases/`` beside ``current``."""
    if app.releases_root:
        return Path(app.releases_root)
    if os.path.lexists(app.working_directory):
        return Path(releases.releases_root(app))
    return Path(app.working_directory).parent / "releases"


def make_release(app: AppConfig, source: str, say: Callable[[str], None] = print) -> str:
    """Create, fill and build the next release from *source*; returns its directory."""
    if os.geteuid() != 0:
        raise BuildFailed("--from builds as the app's user and hands the release to root: run it as root (sudo)")
    try:
        user = pwd.getpwnam(app.user)
        gid = grp.getgrnam(app.group).gr_gid
    except KeyError:
        raise BuildFailed(f"user {app.user!r} or group {app.group!r} does not exist: run `reloader install` "
                          "first, or `reloader install CONFIG --from SRC` for the first release") from None
    root = root_of(app)
    root.mkdir(parents=True, exist_ok=True)
    target = _new_dir(root)
    started = time.monotonic()
    # HOME for the build's tools (pip's cache, npm's): theirs, never the release, gone afterwards.
    home = Path(tempfile.mkdtemp(prefix=f"reloader-build-{app.name}-"))
    os.chown(home, user.pw_uid, gid)
    try:
        (target / BUILDING).write_text(f"{os.getpid()}\n")
        what = _fill(target, source, app)
        say(f"{app.name}: release {target.name} from {what}")
        _chown(target, user.pw_uid, gid)
        deadline = time.monotonic() + app.build.timeout
        run_as = (user, gid, home)
        if app.build.requirements:
            _virtualenv(app, target, run_as, deadline, say)
        for words in app.build.commands:
            _run(app, target, list(words), run_as, deadline, say)
        _chown(target, 0, 0)
        (target / BUILDING).unlink()
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(home, ignore_errors=True)
    say(f"{app.name}: built release {target.name} in {time.monotonic() - started:.1f} s")
    return str(target)


def point_current(app: AppConfig, target: str) -> str | None:
    """Point ``current`` at *target*; returns what it pointed at before (None: it did not exist)."""
    link = Path(app.working_directory)
    if os.path.lexists(link):
        return releases.point_current(app, target)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return None


def _new_dir(root: Path) -> Path:
    """The next release number, taken atomically (mkdir), so two builds never share one."""
    numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(numbers, default=0) + 1
    while True:
        try:
            (root / str(n)).mkdir()
            return root / str(n)
        except FileExistsError:
            n += 1


def _fill(target: Path, source: str, app: AppConfig) -> str:
    """Copy *source* (a directory, a tarball, or a git ref: ``REF`` in the current directory's repository
    or ``REPO_DIR@REF``) into *target*; returns what it was, for the log."""
    path = Path(source)
    if path.is_dir():
        shutil.copytree(path, target, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*IGNORED))
        return f"directory {path.resolve()}"
    if path.is_file():
        if not source.endswith(TARBALLS) and not tarfile.is_tarfile(path):
            raise BuildFailed(f"--from {source}: not a tarball ({', '.join(TARBALLS)}) nor a directory")
        _untar(path, target)
        return f"tarball {path.resolve()}"
    repo, at, ref = source.rpartition("@")
    if not (at and repo and Path(repo).is_dir()):
        repo, ref = os.getcwd(), source
    git = shutil.which("git")
    commit = ""
    if git:
        r = run([git, "-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], check=False, timeout=60)
        commit = r.stdout.strip() if r.returncode == 0 else ""
    if not commit:
        raise BuildFailed(f"--from {source}: not a directory, a tarball, or a git ref in {repo}"
                          + ("" if git else " (git is not installed)"))
    archive = target / ".reloader-source.tar"
    with open(archive, "wb") as out:
        r = subprocess.run([git, "-C", repo, "archive", "--format=tar", commit], stdout=out,
                           stderr=subprocess.PIPE, text=False, timeout=600)
    if r.returncode != 0:
        raise BuildFailed(f"--from {source}: git archive failed: {r.stderr.decode(errors='replace').strip()}")
    _untar(archive, target, strip=False)
    archive.unlink()
    (target / "REVISION").write_text(commit + "\n")
    return f"git {ref} ({commit[:12]}) of {repo}"


def _untar(path: Path, target: Path, *, strip: bool = True) -> None:
    """Extract safely (no absolute paths, no '..', no devices); a tarball holding one top directory (as
    GitHub's and `git archive --prefix` make) has it stripped."""
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            names = [m.name[2:] if m.name.startswith("./") else m.name for m in members]
            tops = {n.split("/", 1)[0] for n in names if n.strip("./")}
            prefix = ""
            if strip and len(tops) == 1:
                top = next(iter(tops))
                if any(n.startswith(top + "/") for n in names):
                    prefix = top + "/"
            for m, name in zip(members, names, strict=True):
                if prefix:
                    if not name.startswith(prefix):
                        continue
                    name = name[len(prefix):]
                if not name:
                    continue
                if name.startswith("/") or ".." in name.split("/") or not (m.isfile() or m.isdir() or m.issym()):
                    raise BuildFailed(f"--from {path}: refusing the member {m.name!r} (absolute, '..' or "
                                      "not a file, directory or symlink)")
                if m.issym() and (m.linkname.startswith("/") or ".." in m.linkname.split("/")):
                    raise BuildFailed(f"--from {path}: refusing the symlink {m.name!r} -> {m.linkname!r}")
                m.name = name
                m.mode = (m.mode or 0o644) & 0o755
                tar.extract(m, target, set_attrs=not m.issym(), **_filter())
    except tarfile.TarError as e:
        raise BuildFailed(f"--from {path}: not a readable tarball ({e})") from None


def _filter() -> dict:
    """tarfile's "data" filter where this Python has it (3.11.4+), on top of our own checks."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _chown(top: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        os.lchown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def environment(app: AppConfig, target: Path, user: pwd.struct_passwd, home: Path) -> dict[str, str]:
    """The operator's environment (so pip keeps its configuration: PIP_INDEX_URL, PIP_FIND_LINKS, …),
    the app's, and its virtualenv first on PATH as if activated."""
    env = dict(os.environ)
    if app.environment_file:
        from .install import _read_environment_file

        env.update(_read_environment_file(app.environment_file))
    env.update(dict(app.environment))
    venv = _venv_in(app, target)
    env["PATH"] = f"{venv + '/bin' if venv else app.bin_dir}:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"
    if venv or app.virtualenv:
        env["VIRTUAL_ENV"] = venv or app.virtualenv
    env.update(HOME=str(home), USER=user.pw_name, LOGNAME=user.pw_name, RELOADER_RELEASE=str(target))
    for key in ("SUDO_COMMAND", "SUDO_UID", "SUDO_GID", "MAIL"):
        env.pop(key, None)
    return env


def _venv_in(app: AppConfig, target: Path) -> str:
    """The release's own virtualenv, when ``[app] virtualenv`` lies inside the release (current/venv)."""
    prefix = app.working_directory.rstrip("/") + "/"
    if app.virtualenv.startswith(prefix):
        return str(target / app.virtualenv[len(prefix):])
    return ""


RunAs = tuple[pwd.struct_passwd, int, Path]  #: the app's user, its group id, the build's HOME


def _virtualenv(app: AppConfig, target: Path, run_as: RunAs, deadline: float, say: Callable[[str], None]) -> None:
    venv = _venv_in(app, target)
    if not venv:
        raise BuildFailed(f"[build] requirements: [app] virtualenv {app.virtualenv or '(unset)'} is not inside the "
                          f"release; set it to e.g. {app.working_directory.rstrip('/')}/venv so each release has "
                          "its own")
    if not (target / app.build.requirements).is_file():
        raise BuildFailed(f"[build] requirements: {app.build.requirements} is not in the release")
    _run(app, target, ["python3", "-m", "venv", venv], run_as, deadline, say)
    _run(app, target, [f"{venv}/bin/pip", "install", "--disable-pip-version-check", "-r",
                       str(target / app.build.requirements)], run_as, deadline, say)


def _run(app: AppConfig, target: Path, words: list[str], run_as: RunAs, deadline: float,
         say: Callable[[str], None]) -> None:
    user, gid, home = run_as
    line = shlex.join(words)
    say(f"{app.name}: build: {line}")
    left = deadline - time.monotonic()
    if left <= 0:
        raise BuildFailed(f"build command {line!r} not started: [build] timeout = {app.build.timeout} s is used up")
    try:
        r = subprocess.run(words, cwd=target, env=environment(app, target, user, home), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                           timeout=left, user=user.pw_uid, group=gid, extra_groups=[], umask=0o022,
                           start_new_session=True)
    except OSError as e:
        raise BuildFailed(f"build command {line!r} could not start: {e.strerror} ({words[0]})") from None
    except subprocess.TimeoutExpired:
        raise BuildFailed(f"build command {line!r} timed out ([build] timeout = {app.build.timeout} s); "
                          f"release {target.name} removed") from None
    if r.returncode != 0:
        lines = [out for out in r.stdout.splitlines() if out.strip()]
        cause = causes.cause_of(lines, str(target))
        tail = " | ".join(" ".join(out.split()) for out in lines[-3:] if not cause.startswith(" ".join(out.split())))
        raise BuildFailed(f"build command {line!r} failed with exit status {r.returncode}: "
                          + " | ".join(x for x in (cause, tail) if x)[:500] + f"; release {target.name} removed")
