"""Stand-ins for what the engines and the rendered gunicorn config touch on a real host, so their logic runs
in milliseconds in the test process (tests/test_engine_faults.py, tests/test_render.py).

- :func:`in_tmp`: an app whose runtime and state directories (ready markers, pidfiles, records, routes) are
  under a test's tmp dir.
- :func:`run_gunicorn_config`: executes a rendered gunicorn config and proves it wrote nothing outside
  a tmp dir (and puts back the environment and sys.path it changes).
- :class:`ProcessTable`, :class:`FakeNotifier`, :class:`FakeBus`, :class:`FakeSystemd`: the process table
  (reloader.proc), sd_notify and the systemd bus of the engines, scripted by the tests.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reloader.config import AppConfig


# --- an app laid out under a tmp dir ------------------------------------------------------------------
def in_tmp(app: AppConfig, root: Path) -> AppConfig:
    """*app* with its runtime directory (/run/NAME: pidfiles, ready markers, locks, boot request) at
    ROOT/run and its state directory (/var/lib/reloader/NAME: records, routes, instance links) at ROOT/state.
    Every other derived path follows from those two."""
    run, state = str(root / "run"), str(root / "state")

    class InTmp(type(app)):  # type: ignore[misc,valid-type]
        runtime_dir = property(lambda self: run)
        state_dir = property(lambda self: state)

        def instance_runtime_dir(self, instance: str) -> str:
            return f"{run}-{instance}"

    return InTmp(**{f.name: getattr(app, f.name) for f in dataclasses.fields(app)})


# --- the rendered gunicorn config, executed without side effects ---------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: Audit events (sys.addaudithook) that change the file system: event -> (indexes of the paths in its
#: arguments, index of the dir_fd they are relative to or None).
_FS_EVENTS: dict[str, tuple[tuple[int, ...], int | None]] = {
    "os.mkdir": ((0,), 2), "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.rename": ((0, 1), 2),
    "os.symlink": ((1,), 2), "os.link": ((1,), 3), "os.chmod": ((0,), 2), "os.chown": ((0,), 3),
    "os.truncate": ((0,), None), "os.utime": ((0,), 3), "shutil.rmtree": ((0,), 1)}
_recording: list[str] | None = None


def _absolute(path: Any, dir_fd: Any) -> str:
    """*path* as an absolute path (shutil.rmtree, for one, removes names relative to a directory's fd)."""
    path = os.fsdecode(path)
    if os.path.isabs(path):
        return path
    base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    return os.path.join(base, path)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writes and not isinstance(path, int):
            _recording.append(_absolute(path, None))
    elif event in _FS_EVENTS:
        paths, fd = _FS_EVENTS[event]
        dir_fd = args[fd] if fd is not None and fd < len(args) else None
        _recording.extend(_absolute(args[i], dir_fd) for i in paths if not isinstance(args[i], int))
    elif event == "os.exec":
        _recording.append(f"exec {args[0]}")


sys.addaudithook(_audit)  # inert until writes_recorded() records


@contextmanager
def writes_recorded() -> Iterator[list[str]]:
    """Every path the code in the block creates, writes, renames, removes or chmods (and any exec)."""
    global _recording
    _recording = found = []
    try:
        yield found
    finally:
        _recording = None


@contextmanager
def confined_to(root: Path) -> Iterator[None]:
    """Fail if the block writes anywhere outside *root*; put back os.environ and sys.path as they were."""
    environ, path = dict(os.environ), list(sys.path)
    try:
        with writes_recorded() as writes:
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
    outside = [w for w in writes if os.path.commonpath([os.path.abspath(w), root]) != str(root)]
    assert not outside, f"wrote outside {root}: {outside}"


def run_gunicorn_config(source: str, root: Path) -> dict[str, Any]:
    """Execute a rendered gunicorn config as gunicorn would (its module level only), confined to *root*
    (render it from :func:`in_tmp`'s app, whose paths are there); returns its namespace."""
    code = compile(source, "gunicorn.conf.py", "exec")  # a SyntaxError fails the test
    namespace: dict[str, Any] = {}
    with confined_to(root):
        os.environ.pop("RELOADER_READY_DIR", None)  # the rendered default (under root) applies
        os.environ.pop("RELOADER_MASTER", None)
        exec(code, namespace)
    return namespace
