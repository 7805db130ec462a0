"""releases.replace_symlink, the one atomic re-pointing of a symlink (the live/previous links, ``current``,
the maintenance page), and proc's /proc readers shared by its helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from reloader import proc
from reloader.releases import replace_symlink


def test_a_reader_always_resolves_the_old_or_the_new_target(tmp_path: Path):
    old, new = tmp_path / "1", tmp_path / "2"
    old.mkdir()
    new.mkdir()
    link = tmp_path / "current"
    link.symlink_to(old)
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(os.readlink(link))  # raises (and fails the test) if the link is ever missing

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            replace_symlink(link, str(new if i % 2 == 0 else old))
    finally:
        stop.set()
        reader.join()
    assert seen <= {str(old), str(new)} and os.readlink(link) == str(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "current"], "no temporary link left"


def test_a_stale_temporary_link_is_replaced(tmp_path: Path):
    link = tmp_path / "active"
    (tmp_path / ".active.42").symlink_to("elsewhere")  # left by a writer killed mid-swap
    replace_symlink(link, "on", suffix="42")
    assert os.readlink(link) == "on" and not os.path.lexists(tmp_path / ".active.42")


def test_proc_reads_a_process_whose_name_has_spaces_and_parentheses():
    """/proc/PID/stat's second field is the command name, as the process chose it: cut at the last ")"."""
    code = "import sys, time; open('/proc/self/comm', 'w').write('a) b (c'); print(flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline()  # the name is set
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c"
        assert proc.alive(child.pid) and proc.ppid(child.pid) == os.getpid()
        assert proc.start_time(child.pid) >= proc.start_time(os.getpid()) > 0
        assert child.pid in proc.children(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert not proc.alive(child.pid) and proc.ppid(child.pid) == 0 and proc.start_time(child.pid) == 0
