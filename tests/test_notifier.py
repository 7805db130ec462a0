"""The helper's journal lines carry a syslog priority when, and only when, stderr is the journal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from reloader.engine import Notifier


class FakeSdnotify:
    """sdnotify (a Debian package, not on every test host): records what would reach $NOTIFY_SOCKET."""

    sent: list[str] = []

    class SystemdNotifier:
        def notify(self, text: str) -> None:
            FakeSdnotify.sent.append(text)


@pytest.fixture(autouse=True)
def sdnotify(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    FakeSdnotify.sent = []
    monkeypatch.setitem(sys.modules, "sdnotify", FakeSdnotify)
    return FakeSdnotify.sent


@contextmanager
def stderr_to(path: Path) -> Iterator[str]:
    """stderr redirected to *path* (inside the test: pytest re-installs its capture between set-up and
    the call); yields the JOURNAL_STREAM value that names that file."""
    saved = sys.stderr
    with open(path, "w") as f:
        sys.stderr = f
        try:
            st = os.fstat(f.fileno())
            yield f"{st.st_dev}:{st.st_ino}"
        finally:
            sys.stderr = saved


def report(n: Notifier) -> None:
    n.status("pre-flight: importing app:app")
    n.warn("reload refused: release 3: /health answered 500")
    n.log("helper cost: peak RSS 31.5 MB")


def test_lines_to_the_journal_are_notice_and_refusals_warning(tmp_path, monkeypatch, sdnotify) -> None:
    path = tmp_path / "stderr"
    with stderr_to(path) as stream:
        monkeypatch.setenv("JOURNAL_STREAM", stream)
        report(Notifier("flaskapp"))
    assert sdnotify == ["STATUS=pre-flight: importing app:app",  # STATUS= never carries the prefix
                        "STATUS=reload refused: release 3: /health answered 500"]
    assert path.read_text().splitlines() == [
        "<5>reloader: flaskapp: pre-flight: importing app:app",
        "<4>reloader: flaskapp: reload refused: release 3: /health answered 500",
        "<5>reloader: flaskapp: helper cost: peak RSS 31.5 MB",
    ]


@pytest.mark.parametrize("journal_stream", [None, "0:0", "garbage"])
def test_lines_elsewhere_have_no_prefix(tmp_path, monkeypatch, journal_stream) -> None:
    """A terminal, a pipe, or a journal stream inherited by a process whose stderr went elsewhere."""
    path = tmp_path / "stderr"
    if journal_stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    with stderr_to(path):
        report(Notifier("flaskapp"))
    assert [line[:20] for line in path.read_text().splitlines()] == ["reloader: flaskapp: "] * 3
