"""reloader.bus on the host, with a stand-in for pystemd: what each connection is given (pure host tests;
the real bus is exercised by every container test)."""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import pytest

from reloader.bus import Systemd

#: The variable sd-bus reads a connection's method-call timeout from.
BUS_TIMEOUT_VARIABLE = "SYSTEMD_BUS_TIMEOUT"


class FakeDBus:
    """Records the timeout sd-bus would read: at the open (its Hello) and at the first method call."""

    opened: list[str | None] = []

    def open(self) -> None:
        FakeDBus.opened.append(os.environ.get(BUS_TIMEOUT_VARIABLE))

    def close(self) -> None:
        pass


class FakeManager:
    loaded: list[str | None] = []

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def load(self) -> None:
        FakeManager.loaded.append(os.environ.get(BUS_TIMEOUT_VARIABLE))


@pytest.fixture
def fake_pystemd(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDBus.opened, FakeManager.loaded = [], []
    package = types.ModuleType("pystemd")
    dbuslib = types.ModuleType("pystemd.dbuslib")
    dbuslib.DBus = FakeDBus  # type: ignore[attr-defined]
    systemd1 = types.ModuleType("pystemd.systemd1")
    systemd1.Manager = FakeManager  # type: ignore[attr-defined]
    for name, module in (("pystemd", package), ("pystemd.dbuslib", dbuslib), ("pystemd.systemd1", systemd1)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(BUS_TIMEOUT_VARIABLE, raising=False)


def test_each_connection_gets_its_own_timeout_and_the_variable_does_not_stay(fake_pystemd: None) -> None:
    """The helper opens a 30 s connection, a command a 120 s one: each must get its own, and the variable
    must not stay in the environment (a reload hands its environment to the new master)."""
    with Systemd(timeout=30):
        assert BUS_TIMEOUT_VARIABLE not in os.environ
    with Systemd(timeout=120):
        pass
    assert (FakeDBus.opened, FakeManager.loaded) == (["30s", "120s"], ["30s", "120s"])
    assert BUS_TIMEOUT_VARIABLE not in os.environ


def test_an_operators_own_timeout_variable_is_left_as_it_was(fake_pystemd: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUS_TIMEOUT_VARIABLE, "7s")
    with Systemd(timeout=60.5):
        pass
    assert FakeDBus.opened == ["61s"]
    assert os.environ[BUS_TIMEOUT_VARIABLE] == "7s"
