"""The Debian package (issue 6): built by ``debian/build`` (lintian clean), installed with apt in a clean
container from Debian packages only, then driving the example app with the packaged /usr/bin/reloader;
removal and purge leave the app serving; reinstall and upgrade never restart it. Also an app shipped as
its own .deb (examples/myapp-deb): ``apt install ./myapp_2_all.deb`` is a zero-downtime reload.

The container's apt has no network: everything must resolve from the image's installed packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import appbed
import pytest
import testbed

#: One .deb build per run: with pytest-xdist every test here runs on the same worker (apt's and
#: dist/'s locks are not shared between workers' session fixtures).
pytestmark = pytest.mark.xdist_group("deb")

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
#: What the .deb is made of: a file newer than dist/'s .deb means it must be rebuilt.
SOURCES = ("reloader", "templates", "debian", "examples", "pyproject.toml")
_SKIP_ANYWHERE = shutil.ignore_patterns(".git", ".pytest_cache", ".ruff_cache", ".benchmarks", "__pycache__",
                                       "*.egg-info")


def SKIP_COPY(directory: str, names: list[str]) -> set[str]:  # noqa: N802 - a copytree ignore=
    """Caches everywhere; build output (dist/, build/, .pybuild/) only at the top (not debian/build)."""
    top = {"dist", "build", ".pybuild"} if Path(directory) in (ROOT, ROOT / "examples/myapp-deb") else set()
    return set(_SKIP_ANYWHERE(directory, names)) | (top & set(names))
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def _version(tree: Path) -> str:
    """The top debian/changelog entry's version (parsed here: dpkg-dev may not be installed yet)."""
    return re.match(r"\S+ \(([^)]+)\)", (tree / "debian/changelog").read_text())[1]


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        paths = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
        for p in paths:
            if "__pycache__" not in p.parts:
                newest = max(newest, p.stat().st_mtime)
    return newest


def _build(tree: Path, dist: Path, *, no_deps: bool) -> float:
    """``bash debian/build`` of *tree* into *dist*; returns seconds taken. It fails on lintian E:/W: tags."""
    env = {**os.environ, "DIST": str(dist), "NO_DEPS": "1" if no_deps else "0"}
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(tree / "debian/build")], env=env, capture_output=True, text=True,
                       timeout=1800, check=False)
    took = time.monotonic() - t0
    testbed.log(f"debian/build of {tree} in {took:.1f}s:\n{r.stderr[-3000:]}")
    assert r.returncode == 0, f"debian/build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return took


def _bumped_copy(src: Path, dest: Path, suffix: str) -> Path:
    """A copy of the tree *src* whose debian/changelog top entry is its version + *suffix*."""
    shutil.copytree(src, dest, ignore=SKIP_COPY, symlinks=True)
    changelog = dest / "debian/changelog"
    text = changelog.read_text()
    changelog.write_text(re.sub(r"^(\S+) \(([^)]+)\)", lambda m: f"{m[1]} ({m[2]}{suffix})", text, count=1))
    return dest


@pytest.fixture(scope="session")
def reloader_deb() -> Path:
    """dist/reloader_VERSION_all.deb, built (with its build deps installed) unless newer than the sources."""
    deb = DIST / f"reloader_{_version(ROOT)}_all.deb"
    if deb.exists() and deb.stat().st_mtime >= _newest_source_mtime():
        testbed.log(f"reusing {deb} (newer than the sources)")
    else:
        _build(ROOT, DIST, no_deps=False)
    assert deb.is_file()
    return deb


@pytest.fixture(scope="session")
def upgrade_deb(reloader_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same package with a higher version (VERSION+upgrade1), built from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("upgrade")
    tree = _bumped_copy(ROOT, tmp / "src", "+upgrade1")
    _build(tree, tmp / "dist", no_deps=True)
    (deb,) = (tmp / "dist").glob("reloader_*+upgrade1_all.deb")
    return deb


@pytest.fixture(scope="session")
def myapp_debs(reloader_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """myapp_1_all.deb and myapp_2_all.deb built from examples/myapp-deb with dpkg-buildpackage (debhelper
    is there once reloader_deb's debian/build has installed the build deps)."""
    tmp = tmp_path_factory.mktemp("myapp")
    debs = {}
    for version in ("1", "2"):
        tree = tmp / f"v{version}" / "myapp"
        shutil.copytree(ROOT / "examples/myapp-deb", tree, ignore=SKIP_COPY)
        changelog = tree / "debian/changelog"
        changelog.write_text(re.sub(r"^myapp \([^)]+\)", f"myapp ({version})", changelog.read_text(), count=1))
        r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, capture_output=True, text=True,
                           env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=300, check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        debs[version] = tree.parent / f"myapp_{version}_all.deb"
        assert debs[version].is_file()
    return debs


# --- helpers --------------------------------------------------------------------------------------------
def copy_in(c: testbed.Container, deb: Path) -> str:
    """Copy *deb* into the container's /root/debs (through the overlay); returns the path inside."""
    dest = c.root / "root/debs"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(deb, dest / deb.name)
    return f"/root/debs/{deb.name}"


def apt(c: testbed.Container, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """apt-get in the container, which has no network: a dependency not installed already fails at once.

    Not ``--no-download``: with it, apt 2.6 refuses a local ./x.deb ("Internal Error, Pathname to install
    is not absolute").
    """
    r = c.run(["apt-get", "-y", "-o", "Dpkg::Use-Pty=0", *args], env=APT_ENV,
              check=False, timeout=timeout)
    assert r.returncode == 0, f"apt-get {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def dpkg_status(c: testbed.Container, package: str) -> str:
    r = c.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], check=False)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def assert_no_failures(report: dict) -> None:
    testbed.log(f"load: {report['summary']}")
    assert report["total"] > 0, report["summary"]
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["long"]["total"] > 0 and report["long"]["failed"] == 0, report["long"]


def serving(app: appbed.App, pid: int, restarts: int) -> None:
    """The app answers 200 through nginx from the same master, never restarted."""
    props = app.props()
    assert props["ActiveState"] == "active", (props, app.journal())
    assert props["MainPID"] == pid, props
    assert props["NRestarts"] == restarts, props
    assert app.get("/").status == 200


# --- the package, on the host ---------------------------------------------------------------------------
def test_deb_contents_and_metadata(reloader_deb: Path) -> None:
    files = subprocess.run(["dpkg-deb", "-c", str(reloader_deb)], capture_output=True, text=True,
                           check=True).stdout
    paths = {line.split()[-1].lstrip(".") for line in files.splitlines()}
    for must in ("/usr/bin/reloader", "/usr/lib/python3/dist-packages/reloader/templates/service.j2",
                 "/usr/lib/python3/dist-packages/reloader/cli.py", "/usr/share/man/man1/reloader.1.gz",
                 "/usr/share/doc/reloader/copyright", "/usr/share/doc/reloader/examples/flaskapp.toml"):
        assert must in paths, must
    templates = sorted(p for p in paths if p.startswith("/usr/lib/python3/dist-packages/reloader/templates/"))
    assert {Path(t).name for t in templates} >= {"service.j2", "socket.j2", "gunicorn.conf.py.j2",
                                                  "nginx-site.j2", "nginx-dropin.j2"}
    # One version everywhere: debian/changelog (the .deb), pyproject.toml and `reloader --version`.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("version")
    init = re.search(r'^__version__ = "([^"]+)"', (ROOT / "reloader/__init__.py").read_text(), re.M)[1]
    assert _version(ROOT) == init and pyproject in (None, init), (_version(ROOT), init, pyproject)
    # No unit of its own, nothing in /etc: the units belong to the apps.
    assert not [p for p in paths if re.match(r"/(usr/)?lib/systemd/|/etc/", p)], paths

    info = subprocess.run(["dpkg-deb", "-f", str(reloader_deb)], capture_output=True, text=True,
                          check=True).stdout
    assert "Architecture: all" in info
    depends = re.search(r"^Depends: (.*)$", info, re.M)[1]
    for dep in ("python3-pystemd (>= 0.11)", "python3-sdnotify", "python3-jinja2"):
        assert dep in depends
    assert re.search(r"^Recommends: .*nginx", info, re.M)

    # Maintainer scripts (dh_python3's byte-compiling only) never touch a unit.
    with_scripts = Path(str(reloader_deb) + ".ctrl")
    shutil.rmtree(with_scripts, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-e", str(reloader_deb), str(with_scripts)], check=True)
    try:
        for script in with_scripts.iterdir():
            if script.name in ("preinst", "postinst", "prerm", "postrm"):
                text = script.read_text()
                assert not re.search(r"systemctl|deb-systemd|invoke-rc\.d|service ", text), (script.name, text)
    finally:
        shutil.rmtree(with_scripts)


# --- the package in a clean container, driving the example app -----------------------------------------
# The .deb built on Debian 12 must install from Debian 13's own packages too (python3-pystemd 0.13,
# python3 3.13, systemd 257): the same checks in a trixie container.
@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_apt_install_reload_remove_purge_reinstall_upgrade(reloader_deb: Path, upgrade_deb: Path,
                                                           testbed_image: Path, suite: str) -> None:
    with testbed.boot(suite) as c:
        assert c.run("command -v reloader", check=False).returncode != 0, "reloader on PATH before the .deb"
        t0 = time.monotonic()
        apt(c, "install", copy_in(c, reloader_deb))
        testbed.log(f"apt install reloader: {time.monotonic() - t0:.1f}s")
        assert dpkg_status(c, "reloader").startswith("install ok installed")
        c.run(["apt-get", "check"])
        deps = ("python3", "python3-pystemd", "python3-sdnotify", "python3-jinja2", "systemd")
        testbed.log(f"{suite}: " + ", ".join(f"{d} {dpkg_status(c, d).split()[-1]}" for d in deps))
        assert c.run("command -v reloader").stdout.strip() == "/usr/bin/reloader"
        where = c.run(["python3", "-c", "import reloader.render as r; print(r.__file__, r.templates_dir())"],
                      env={"PYTHONSAFEPATH": "1"}).stdout.split()
        assert where == ["/usr/lib/python3/dist-packages/reloader/render.py",
                         "/usr/lib/python3/dist-packages/reloader/templates"], where
        assert c.run(["reloader", "--version"]).stdout.strip() == f"reloader {_version(ROOT)}"
        assert c.run(["test", "-s", "/usr/share/man/man1/reloader.1.gz"], check=False).returncode == 0
        assert c.run("systemctl list-units --all --no-legend '*reloader*'").stdout.strip() == ""

        app = appbed.App(c)
        app.install(wrapper=False)
        assert app.wait_version("v1"), app.journal()
        unit = c.read_file("/etc/systemd/system/flaskapp.service")
        assert "ExecReload=/usr/bin/reloader exec-reload /etc/reloader/flaskapp.toml" in unit

        # systemctl reload under load: zero failed requests, a new generation.
        before = app.props()
        app.ship("v2")
        load = app.start_load()
        time.sleep(1)
        t0 = time.monotonic()
        r = app.reload()
        testbed.log(f"systemctl reload under load: {time.monotonic() - t0:.1f}s")
        assert r.returncode == 0, (r.stderr, app.journal())
        time.sleep(1)
        assert_no_failures(app.stop_load(load))
        assert app.version() == "v2"
        after = app.props()
        assert after["MainPID"] != before["MainPID"] and after["ReloadResult"] == "success", after
        pid, restarts = after["MainPID"], after["NRestarts"]

        # remove: the app keeps serving from the same master; its files stay; reloads now fail.
        apt(c, "remove", "reloader")
        assert "ok installed" not in dpkg_status(c, "reloader")
        assert c.run(["test", "-e", "/usr/bin/reloader"], check=False).returncode != 0
        serving(app, pid, restarts)
        for kept in ("/etc/reloader/flaskapp.toml", "/etc/systemd/system/flaskapp.service",
                     "/var/lib/reloader/flaskapp.json", "/etc/nginx/conf.d/flaskapp.conf"):
            assert c.run(["test", "-e", kept], check=False).returncode == 0, kept
        assert app.reload(timeout=120).returncode != 0
        serving(app, pid, restarts)

        # purge (of the installed package: with no conffiles, remove already left nothing to purge):
        # everything the package owned is gone, nothing else.
        apt(c, "install", copy_in(c, reloader_deb))
        serving(app, pid, restarts)
        apt(c, "purge", "reloader")
        status = dpkg_status(c, "reloader")
        assert "ok installed" not in status and "config-files" not in status, status
        left = c.run("ls -d /usr/lib/python3/dist-packages/reloader* /usr/share/doc/reloader "
                     "/usr/share/man/man1/reloader.1.gz 2>/dev/null", check=False).stdout.strip()
        assert left == ""
        c.run(["apt-get", "check"])
        serving(app, pid, restarts)

        # reinstall, then upgrade: the app is not restarted, nor reloaded.
        apt(c, "install", copy_in(c, reloader_deb))
        serving(app, pid, restarts)
        t0 = time.monotonic()
        apt(c, "install", copy_in(c, upgrade_deb))
        testbed.log(f"apt upgrade reloader: {time.monotonic() - t0:.1f}s")
        assert dpkg_status(c, "reloader").endswith("+upgrade1")
        serving(app, pid, restarts)
        assert app.version() == "v2"

        # The upgraded package reloads again, still with zero failures.
        app.ship("v3")
        load = app.start_load()
        time.sleep(1)
        assert app.reload().returncode == 0, app.journal()
        time.sleep(1)
        assert_no_failures(app.stop_load(load))
        assert app.version() == "v3"


# --- an app shipped as its own .deb ----------------------------------------------------------------------
def test_app_deb_upgrade_is_a_zero_downtime_reload(reloader_deb: Path, myapp_debs: dict[str, Path],
                                                   testbed_image: Path) -> None:
    with testbed.boot("bookworm") as c:
        apt(c, "install", copy_in(c, reloader_deb))
        # The site provides the venv myapp.toml names (gunicorn + flask): the image's /opt/venv.
        c.run("mkdir -p /srv/myapp && ln -sfn /opt/venv /srv/myapp/venv")
        app = appbed.App(c, name="myapp")

        t0 = time.monotonic()
        r = apt(c, "install", copy_in(c, myapp_debs["1"]))
        testbed.log(f"apt install myapp 1 (reloader install): {time.monotonic() - t0:.1f}s")
        assert app.get("/").status == 200, (r.stdout, app.journal())
        assert app.get("/").json["version"] == "1"
        first = app.props()
        assert first["ActiveState"] == "active", first

        # The upgrade: postinst stages release 2 and runs `reloader deploy myapp` under load.
        load = app.start_load()
        time.sleep(1)
        t0 = time.monotonic()
        r = apt(c, "install", copy_in(c, myapp_debs["2"]))
        testbed.log(f"apt install myapp 2 (reloader deploy) under load: {time.monotonic() - t0:.1f}s")
        time.sleep(1)
        report = app.stop_load(load)
        assert_no_failures(report)
        assert "deploy success" in r.stdout, r.stdout
        assert app.get("/").json["version"] == "2"
        second = app.props()
        assert second["ActiveState"] == "active", second
        assert second["MainPID"] != first["MainPID"], (first, second)
        assert second["NRestarts"] == first["NRestarts"] and second["ReloadResult"] == "success", second
        assert c.run("readlink /srv/myapp/current").stdout.strip() == "/srv/myapp/releases/2"
        assert set(c.run("ls /srv/myapp/releases").stdout.split()) == {"1", "2"}

        # remove: prerm uninstalls the app (units, site); purge removes the staged releases.
        apt(c, "remove", "myapp")
        assert app.props()["LoadState"] == "not-found"
        assert c.run(["test", "-e", "/etc/reloader/myapp.toml"], check=False).returncode != 0
        apt(c, "purge", "myapp")
        assert c.run(["test", "-e", "/srv/myapp/releases"], check=False).returncode != 0
        assert dpkg_status(c, "reloader").startswith("install ok installed")


def test_removed_package_leaves_nginx_reloadable(reloader_deb: Path, testbed_image: Path) -> None:
    with testbed.boot("bookworm") as c:
        apt(c, "install", copy_in(c, reloader_deb))
        app = appbed.App(c)
        app.install(wrapper=False)
        assert app.wait_version("v1"), app.journal()
        apt(c, "remove", "reloader")
        r = c.run("systemctl reload nginx", check=False)
        assert r.returncode == 0, c.run("journalctl -u nginx --no-pager -n 5", check=False).stdout
        assert app.get("/").status == 200
