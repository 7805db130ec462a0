"""units/ holds the rendered reference files of examples/flaskapp.toml; they must equal a fresh render."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from reloader.config import load
from reloader.render import render

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "units"
NOT_RENDERED = {"regenerate", "README.md"}
HINT = "units/ is out of date: run units/regenerate and commit the result"


def committed() -> dict[str, bytes]:
    return {str(p.relative_to(UNITS)): p.read_bytes() for p in sorted(UNITS.rglob("*"))
            if p.is_file() and str(p.relative_to(UNITS)) not in NOT_RENDERED}


def test_units_equal_a_fresh_render_byte_for_byte():
    fresh = {f.name: f.content.encode("utf-8") for f in render(load(ROOT / "examples" / "flaskapp.toml"))}
    for strategy in ("blue-green", "rolling"):
        for f in render(load(ROOT / "examples" / f"flaskapp-{strategy}.toml")):
            fresh[f"{strategy}/{f.name}"] = f.content.encode("utf-8")
    current = committed()
    assert sorted(current) == sorted(fresh), f"{HINT} (files differ: {sorted(set(current) ^ set(fresh))})"
    for name, content in fresh.items():
        assert current[name] == content, f"{HINT} (units/{name} differs)"


def test_regenerate_is_executable_and_removes_stale_files(tmp_path):
    assert (UNITS / "regenerate").stat().st_mode & 0o111, "units/regenerate must be executable"
    for part in ("reloader", "templates", "examples", "units"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")  # marks a checkout: ../templates
    (tmp_path / "units" / "stale.service").write_text("no longer rendered\n")
    (tmp_path / "units" / "flaskapp.service").write_text("edited by hand\n")
    r = subprocess.run([str(tmp_path / "units" / "regenerate")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    after = {str(p.relative_to(tmp_path / "units")): p.read_bytes() for p in (tmp_path / "units").rglob("*")
             if p.is_file()}
    expected = {name: (UNITS / name).read_bytes() for name in [*committed(), *NOT_RENDERED]}
    assert after == expected
