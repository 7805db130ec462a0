"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import testbed  # noqa: E402

# ==========================================================================
# Real-systemd test bed (tests/testbed.py)
#
# A missing prerequisite FAILS the test (a silently skipped integration
# suite looks green while testing nothing).  Set RELOADER_SKIP_CONTAINER=1
# to skip them deliberately instead.
# ==========================================================================


def _require_testbed() -> None:
    """Fail (or skip on request) when this host cannot run the test bed."""
    problems = testbed.missing_prerequisites()
    if not problems:
        return
    msg = "container test bed unavailable: " + "; ".join(problems)
    if os.environ.get("RELOADER_SKIP_CONTAINER") == "1":
        pytest.skip(msg)
    pytest.fail(msg + " (set RELOADER_SKIP_CONTAINER=1 to skip these tests)", pytrace=False)


@pytest.fixture(scope="session")
def testbed_image() -> Path:
    """The cached bookworm rootfs (built on first use, ~2 min cold)."""
    _require_testbed()
    return testbed.ensure_image("bookworm")


@pytest.fixture(scope="session")
def trixie_image() -> Path:
    """The cached trixie rootfs (systemd 257), built only when a test asks."""
    _require_testbed()
    return testbed.ensure_image("trixie")


@pytest.fixture
def container(request: pytest.FixtureRequest) -> Iterator[testbed.Container]:
    """A freshly booted container, stopped after the test: bookworm, or the suite given by an indirect
    parameter (``@pytest.mark.parametrize("container", ["trixie"], indirect=True)``, also through ``app``),
    so one test function proves a guarantee on both Debian releases."""
    suite = getattr(request, "param", "bookworm")
    request.getfixturevalue("testbed_image" if suite == "bookworm" else f"{suite}_image")
    with testbed.boot(suite) as c:
        yield c


@pytest.fixture
def trixie_container(trixie_image: Path) -> Iterator[testbed.Container]:
    """A freshly booted trixie container, stopped after the test."""
    with testbed.boot("trixie") as c:
        yield c


# ==========================================================================
# The example app installed in a container (tests/appbed.py)
# ==========================================================================
import appbed  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "app_config(gunicorn='', reload='', setup='', analysis='', flags=()): how the `app` fixture "
        "installs the example app: extra [gunicorn] / [reload] / [setup] / [analysis] lines (App.variant) and "
        "`reloader install` flags")


@pytest.fixture
def app(container: testbed.Container, request: pytest.FixtureRequest) -> appbed.App:
    """A booted container with examples/flaskapp.toml installed by `reloader install` and serving v1.

    ``@pytest.mark.app_config(gunicorn="preload_app = true", reload="bake_seconds = 1", flags=(...))``
    (also on a ``pytest.param``) installs a variant of the example instead."""
    a = appbed.App(container)
    marker = request.node.get_closest_marker("app_config")
    settings = dict(marker.kwargs) if marker else {}
    flags = settings.pop("flags", ())
    a.install(a.variant(**settings) if settings else appbed.EXAMPLE, *flags)
    assert a.wait_version("v1"), a.journal()
    return a
