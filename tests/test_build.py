"""reloader.build (host tests, as root with the host's `nobody` user): a release made from a directory, a
tarball or a git ref, built as the app's user with the release writable, handed to root; a failed build
leaves nothing behind."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from configbed import cfg

from reloader import build, config, releases
from reloader.config import parse

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds switch to the app's user: root only")


@pytest.fixture
def tmp_path(monkeypatch: pytest.MonkeyPatch):
    """A directory the app's user can reach (pytest's own is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="reloader-build-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config, "STATE_DIR", tmp_path / "state")
    venv = Path(sys.executable).parent.parent
    data = cfg({"working_directory": str(tmp_path / "srv/current"), "virtualenv": str(venv), "user": "nobody",
                "group": "nogroup"},
               build={"commands": ["sh -c 'mkdir -p app/translations && id -un > app/translations/built-by'"]})
    return parse(data)


def checkout(tmp_path: Path) -> Path:
    src = tmp_path / "checkout"
    (src / "app").mkdir(parents=True)
    (src / "app" / "__init__.py").write_text("VERSION = 'v1'\n")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("x")
    (src / "__pycache__").mkdir()
    return src


def test_a_directory_becomes_release_1_built_as_the_app_user_then_owned_by_root(app, tmp_path: Path) -> None:
    said: list[str] = []
    path = build.make_release(app, str(checkout(tmp_path)), said.append)
    release = Path(path)
    assert release == tmp_path / "srv/releases/1"
    assert (release / "app/__init__.py").read_text() == "VERSION = 'v1'\n"
    assert (release / "app/translations/built-by").read_text() == "nobody\n", "built as the app's user"
    assert not (release / ".git").exists() and not (release / "__pycache__").exists()
    assert not (release / build.BUILDING).exists()
    for p in [release, *release.rglob("*")]:
        assert p.lstat().st_uid == 0, f"{p} still belongs to the app"
    assert any("built release 1" in line for line in said), said
    assert build.point_current(app, path) is None and os.readlink(app.working_directory) == path
    second = build.make_release(app, str(tmp_path / "checkout"), said.append)
    assert Path(second).name == "2"
    assert build.point_current(app, second) == path
    assert [row["release"] for row in releases.listing(app)] == ["2", "1"]


def test_a_failed_build_names_the_cause_and_leaves_nothing(app, tmp_path: Path) -> None:
    src = checkout(tmp_path)
    (src / "compile.py").write_text("print('compiling')\nopen('/proc/nope/x', 'w')\n")
    broken = replace(app, build=replace(app.build, commands=(("/usr/bin/python3", "compile.py"),)))
    with pytest.raises(build.BuildFailed) as e:
        build.make_release(broken, str(src), lambda _: None)
    assert "build command" in str(e.value) and "compile.py:2" in str(e.value), e.value
    assert "FileNotFoundError" in str(e.value) and "release 1 removed" in str(e.value)
    assert list((tmp_path / "srv/releases").iterdir()) == [], "nothing half-made left"


def test_a_tarball_with_one_top_directory_is_stripped_and_bad_members_refused(app, tmp_path: Path) -> None:
    tarball = tmp_path / "app-1.0.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, text in (("app-1.0/app/__init__.py", "VERSION = 'v2'\n"), ("app-1.0/README", "hi\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    release = Path(build.make_release(app, str(tarball), lambda _: None))
    assert (release / "app/__init__.py").read_text() == "VERSION = 'v2'\n" and (release / "README").exists()
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(build.BuildFailed, match=r"refusing the member '../../etc/evil'"):
        build.make_release(app, str(evil), lambda _: None)
    assert sorted(p.name for p in release.parent.iterdir()) == [release.name]


def test_a_git_ref_is_archived_with_its_revision(app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = checkout(tmp_path)
    subprocess.run(["rm", "-rf", str(repo / ".git")], check=True)
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "app"], check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "app/__init__.py").write_text("VERSION = 'uncommitted'\n")
    release = Path(build.make_release(app, f"{repo}@main", lambda _: None))
    assert (release / "app/__init__.py").read_text() == "VERSION = 'v1'\n", "the ref, not the work tree"
    assert (release / "REVISION").read_text() == commit + "\n"
    monkeypatch.chdir(repo)
    assert (Path(build.make_release(app, "main", lambda _: None)) / "REVISION").exists()
    with pytest.raises(build.BuildFailed, match=r"--from nosuch-ref: not a directory, a tarball, or a git ref in "):
        build.make_release(app, "nosuch-ref", lambda _: None)


def test_requirements_need_a_virtualenv_inside_the_release(app, tmp_path: Path) -> None:
    asked = replace(app, build=replace(app.build, requirements="requirements.txt"))
    with pytest.raises(build.BuildFailed, match=r"\[build\] requirements: \[app\] virtualenv .* is not inside the "
                                                r"release; set it to e.g. .*/srv/current/venv"):
        build.make_release(asked, str(checkout(tmp_path)), lambda _: None)
    assert list((tmp_path / "srv/releases").iterdir()) == []
