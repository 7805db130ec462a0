"""reloader.releases and its config keys (host tests on temporary directories): the records that decide
what a master boots, the operator's --release input, listing and pruning."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from configbed import cfg, rejected

from reloader import commands, config, registry, releases
from reloader.config import ConfigError, parse


def test_release_keys_default_and_parse() -> None:
    app = parse(cfg())
    assert (app.releases_root, app.keep_releases) == ("", 5)
    app = parse(cfg(reload={"releases_root": "/srv/myapp/releases/", "keep_releases": 3}))
    assert (app.releases_root, app.keep_releases) == ("/srv/myapp/releases", 3)


@pytest.mark.parametrize("reload, fragment", [
    ({"keep_releases": 1}, "[reload] keep_releases: 1 is out of range; allowed 2..1000"),
    ({"keep_releases": "5"}, "[reload] keep_releases: must be an integer"),
    ({"releases_root": "srv/releases"}, "[reload] releases_root: 'srv/releases' must be an absolute path"),
    ({"releases_root": "/"}, "[reload] releases_root: refusing '/'"),
    ({"releases_root": "/srv/a b"}, "[reload] releases_root: '/srv/a b' contains ' '"),
    ({"keep_release": 3}, "[reload] keep_release: unknown key; did you mean 'keep_releases'?"),
])
def test_release_keys_reject_bad_values(reload: dict, fragment: str) -> None:
    assert fragment in rejected(cfg(reload=reload))


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """/srv-like tree: releases/1..3, current -> 2, and a state dir; returns (app, root)."""
    root = tmp_path / "releases"
    for n in (1, 2, 3):
        (root / str(n)).mkdir(parents=True)
        os.utime(root / str(n), (1000 + n, 1000 + n))
    (tmp_path / "current").symlink_to(root / "2")
    monkeypatch.setattr(config, "STATE_DIR", tmp_path / "state")
    app = replace(parse(cfg({"working_directory": str(tmp_path / "current")})), keep_releases=2)
    return app, root


def test_records_live_previous_refused_and_pending(layout) -> None:
    app, root = layout
    assert releases.read(app) == releases.Records()
    assert releases.pending(app) == "", "before the first live release, current is what boots"
    releases.record_live(app, releases.Release(str(root / "1")))
    releases.record_live(app, releases.Release(str(root / "2")))
    records = releases.record_refused(app, str(root / "3"), "ImportError: x")
    assert records.live.release == str(root / "2") and records.previous.release == str(root / "1")
    assert os.readlink(Path(app.state_dir) / "live") == str(root / "2")
    assert os.readlink(Path(app.state_dir) / "previous") == str(root / "1")
    (Path(app.working_directory)).unlink()
    Path(app.working_directory).symlink_to(root / "3")
    assert releases.pending(app).startswith("current → 3 was refused: ImportError: x; serving the live release 2")
    states = {row["release"]: row["state"] for row in releases.listing(app)}
    assert states == {"3": "refused", "2": "live", "1": "previous"}
    data = json.loads((Path(app.state_dir) / "releases.json").read_text())
    assert data["live"]["release"] == str(root / "2"), "the gunicorn config reads this key"


@pytest.mark.parametrize("name, fragment", [
    ("nosuch", "nosuch: no such release directory"),
    ("afile", "afile: not a directory"),
    ("loop", "loop: symlink loop"),
])
def test_check_release_rejects_bad_input(layout, name: str, fragment: str) -> None:
    app, root = layout
    (root / "afile").write_text("")
    (root / "loop").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop")
    with pytest.raises(releases.BadRelease) as e:
        releases.check_release(app, name)
    assert str(e.value) == fragment or str(e.value).startswith(fragment), e.value


def test_check_release_accepts_only_dirs_in_the_root(layout, tmp_path: Path) -> None:
    app, root = layout
    assert releases.check_release(app, "3") == str(root / "3")
    assert releases.check_release(app, str(root / "1")) == str(root / "1")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(releases.BadRelease, match=r"not a release in .*releases \(set \[reload\] releases_root"):
        releases.check_release(app, str(tmp_path / "elsewhere"))
    other = replace(app, releases_root=str(tmp_path))
    assert releases.check_release(other, str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


def test_prune_keeps_the_newest_and_never_live_previous_or_current(layout) -> None:
    app, root = layout
    for n in (4, 5):
        (root / str(n)).mkdir()
        os.utime(root / str(n), (1000 + n, 1000 + n))
    releases.record_live(app, releases.Release(str(root / "1")))  # oldest, but previous after the next line
    releases.record_live(app, releases.Release(str(root / "5")))
    removed = releases.prune(app, app.keep_releases)
    # Kept: 5 live, 1 previous (2 of keep_releases = 2), 2 current; of the never tried 4 and 3, both go.
    assert removed == [str(root / "4"), str(root / "3")]
    assert sorted(p.name for p in root.iterdir()) == ["1", "2", "5"]


def test_prune_removes_refused_and_never_tried_before_any_proven_release(layout) -> None:
    """The issue's case: after two refusals, a rollback's prune must keep the rollback targets (proven
    releases), not the refused ones, which can never be deployed."""
    app, root = layout
    for n in range(4, 9):
        (root / str(n)).mkdir()
        os.utime(root / str(n), (1000 + n, 1000 + n))
    app = replace(app, keep_releases=4)
    for n in (1, 2, 3, 4, 5, 6):
        releases.record_live(app, releases.Release(str(root / str(n))))
    for n in (7, 8):
        releases.record_refused(app, str(root / str(n)), f"release {n}: ImportError")
    Path(app.working_directory).unlink()
    Path(app.working_directory).symlink_to(root / "5")
    releases.record_live(app, releases.Release(str(root / "5")))  # the rollback onto 5: live 5, previous 6
    states = {row["release"]: row["state"] for row in releases.listing(app)}
    assert (states["7"], states["8"]) == ("refused", "refused")
    order = releases.prune_order(app, releases.read(app), releases.listing(app))
    assert [os.path.basename(p) for p in order] == ["5", "6", "4", "3", "2", "1", "8", "7"]
    removed = releases.prune(app, app.keep_releases)
    assert sorted(os.path.basename(p) for p in removed) == ["1", "2", "7", "8"], removed
    assert sorted(p.name for p in root.iterdir()) == ["3", "4", "5", "6"]
    records = releases.read(app)
    assert records.refused == {}, "the records forget what was removed"
    assert [os.path.basename(p) for p in records.proven] == ["3", "4", "6", "5"]


def test_prune_with_room_to_spare_keeps_a_refused_release_to_inspect(layout) -> None:
    app, root = layout
    app = replace(app, keep_releases=5)
    releases.record_live(app, releases.Release(str(root / "1")))
    releases.record_live(app, releases.Release(str(root / "2")))
    releases.record_refused(app, str(root / "3"), "boom")
    assert releases.prune(app, app.keep_releases) == []
    app = replace(app, keep_releases=2)
    assert releases.prune(app, app.keep_releases) == [str(root / "3")], "refused goes before previous 1"
    assert sorted(p.name for p in root.iterdir()) == ["1", "2"]


def test_rollback_goes_only_to_a_proven_release(layout) -> None:
    app, root = layout
    with pytest.raises(releases.BadRelease, match="no previous release"):
        releases.rollback_target(app)
    releases.record_live(app, releases.Release(str(root / "1")))
    releases.record_live(app, releases.Release(str(root / "2")))
    releases.record_refused(app, str(root / "3"), "boom")
    assert releases.rollback_target(app) == str(root / "1")
    assert releases.rollback_target(app, "1") == str(root / "1")
    with pytest.raises(releases.BadRelease, match="3: was refused"):
        releases.rollback_target(app, "3")


def test_boot_request_drops_systemd_per_process_variables(layout, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    app, root = layout
    monkeypatch.setattr(releases, "boot_request_path", lambda app: tmp_path / "run" / "boot-request.json")
    env = {"GREETING": "two", "MAINPID": "1", "LISTEN_FDS": "1", "JOURNAL_STREAM": "8:1", "PATH": "/usr/bin"}
    releases.write_boot_request(app, 42, releases.Release(str(root / "2"), "/opt/venv"), env)
    path = tmp_path / "run" / "boot-request.json"
    assert path.stat().st_mode & 0o777 == 0o600, "it holds the app's secrets"
    body = json.loads(path.read_text())
    assert body["environ"] == {"GREETING": "two", "PATH": "/usr/bin"}
    assert body["master"] == 42 and body["release"] == str(root / "2") and body["python"] == "/opt/venv/bin/python3"
    assert "LISTEN_FDS" in body["keep"] and "JOURNAL_STREAM" in body["keep"]



def test_rolling_rollback_and_releases_read_the_same_records(layout, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Blue-green/rolling use the single-master records: rollback refuses, before any D-Bus call, what
    was never live; `releases --json` lists the records' states and the instances each release is pinned on."""
    single, root = layout
    app = parse(cfg({"working_directory": single.working_directory}, reload={"strategy": "rolling", "instances": 3}))
    monkeypatch.setattr(registry, "app_for", lambda name: app)
    with pytest.raises(ConfigError, match=r"^rollback: no previous release recorded"):
        commands.cmd_rollback(argparse.Namespace(name=app.name, release=""))
    releases.record_live(app, releases.Release(str(root / "1")))
    releases.record_refused(app, str(root / "3"), "instance 1: boom")
    for name, fragment in (("2", "2: was never live"), ("3", "3: was refused"), ("9", "9: no such release")):
        with pytest.raises(ConfigError, match=f"^rollback: {fragment}"):
            commands.cmd_rollback(argparse.Namespace(name=app.name, release=name))
    Path(app.instance_link("1")).parent.mkdir(parents=True)
    for instance, n in (("1", "3"), ("2", "1"), ("3", "1")):
        Path(app.instance_link(instance)).symlink_to(root / n)
    assert commands.cmd_releases(argparse.Namespace(name=app.name, json=True)) == 0
    rows = {row["release"]: row for row in json.loads(capsys.readouterr().out)["releases"]}
    assert (rows["1"]["state"], rows["1"]["instances"]) == ("live", ["2", "3"]), rows
    assert (rows["3"]["state"], rows["3"]["reason"], rows["3"]["instances"]) == ("refused", "instance 1: boom", ["1"])
    assert rows["2"]["state"] == "never tried" and "instances" not in rows["2"]
