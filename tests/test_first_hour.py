"""The first hour with a real app (issue 23), in a real systemd: a multi-module Flask app shaped like the
Mega-Tutorial's microblog (Flask-SQLAlchemy, Flask-Migrate, Flask-Babel; tests/apps/microblog) goes from a
checkout to a verified deploy with `reloader init`, the build step and `--from`, on the first attempt; then
a migration release, another release, a refused one and a rollback, under load, without one failed
request. Beside it, the first installs a new user hits: an app writing next to its code refused by the
sandboxed pre-flight with the path and the fix, and a setup command's own error in `install`'s output.

The app's packages are downloaded on the host (the host's pip configuration) into a cache, bound into the
container, and installed by the build step's virtualenv with pip's own variables (PIP_NO_INDEX,
PIP_FIND_LINKS), as an offline operator would.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testbed
from appbed import install_wrapper
from realapps import RealApp
from test_hooks import parse_prometheus

REQUIREMENTS = ("flask", "flask-sqlalchemy", "flask-migrate", "flask-babel", "gunicorn==27.0.1")
CHECKOUT = "/opt/checkout/microblog"
PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
PROM = "/var/lib/prometheus/node-exporter/reloader_microblog.prom"
MIGRATION = '''"""post.author"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("post", sa.Column("author", sa.String(64), nullable=True))


def downgrade():
    op.drop_column("post", "author")
'''


@pytest.fixture(scope="session")
def wheels(testbed_image: Path) -> Path:
    """The app's wheels for the image's Python, downloaded once on the host (cached, file-locked)."""
    pyver = testbed._image_python_version(testbed_image)
    cache = testbed.CACHE_DIR / f"first-hour-wheels-{pyver}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{cache}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / ".complete").exists():
            shutil.rmtree(cache, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                            "--only-binary=:all:", "--python-version", pyver, "--platform",
                            f"manylinux2014_{os.uname().machine}", "--implementation", "cp", "-d", str(cache),
                            *REQUIREMENTS], check=True, timeout=900, capture_output=True)
            (cache / ".complete").write_text("")
    cache.chmod(0o755)
    return cache


def reloader(c: testbed.Container, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return c.run(["reloader", *args], check=False, timeout=timeout, env=PIP)


def out(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


def checkout(c: testbed.Container, version: str, *, files: dict[str, str] | None = None) -> None:
    """The developer's working copy at *version* (VERSION in app/version.py, plus changed files)."""
    c.write_file(f"{CHECKOUT}/app/version.py", f'VERSION = "{version}"\n')
    for name, text in (files or {}).items():
        c.write_file(f"{CHECKOUT}/{name}", text)


def test_microblog_from_a_checkout_to_a_rollback_under_load(wheels: Path) -> None:
    with testbed.boot("bookworm", binds=[f"{wheels}:/wheels"]) as c:
        install_wrapper(c)
        c.run(f"mkdir -p /opt/checkout && cp -R /src/tests/apps/microblog {CHECKOUT} && "
              "mkdir -p /var/lib/prometheus/node-exporter")
        app = RealApp(c, "microblog", "microblog.example", "microblog", "app/version.py")

        # init: detects the Flask app, Migrate, Babel, the requirements; never overwrites.
        r = c.run(f"cd /root && reloader init {CHECKOUT}", check=False)
        assert r.returncode == 0, out(r)
        toml = c.read_file("/root/microblog.toml")
        for expected in ('wsgi = "microblog:app"', 'state_directory = "microblog"', 'requirements = "requirements.txt"',
                         '"pybabel compile -d app/translations"', '"flask db upgrade"',
                         'DATABASE_URL = "sqlite:////var/lib/microblog/app.db"', 'LOG_TO_STDOUT = "1"',
                         'virtualenv = "/srv/microblog/current/venv"', 'releases_root = "/srv/microblog/releases"'):
            assert expected in toml, (expected, toml)
        r = c.run(f"cd /root && reloader init {CHECKOUT}", check=False)
        assert r.returncode == 2 and "exists; not overwriting" in r.stderr, out(r)
        hook = "sh -c 'env | grep ^RELOADER_ | sort | tr \"\\\\n\" \" \" >> /root/hooks.log; echo >> /root/hooks.log'"
        for key in ("after_deploy", "after_refusal", "after_rollback"):
            toml = toml.replace(f"{key} = []", f"{key} = [{json.dumps(hook)}]")
        toml = toml.replace('server_name = ["_"]', 'server_name = ["microblog.example"]')
        c.write_file("/root/microblog.toml", toml)
        r = c.run("reloader check /root/microblog.toml", check=False)
        assert r.returncode == 0 and "[build] requirements creates it" in r.stderr, out(r)
        assert "not pre-flighted in its sandbox" in r.stderr, out(r)  # says what it could not check

        # install --from: release 1 built (venv, compiled catalogs), migrated, pre-flighted, live: first attempt.
        r = reloader(c, "install", "/root/microblog.toml", "--from", CHECKOUT)
        assert r.returncode == 0, out(r) + app.journal(40)
        assert "microblog: built release 1" in r.stdout and "answers 200 through nginx" in r.stdout, out(r)
        assert "pre-flight of the first start in microblog.service's sandbox: / answered 200" in r.stdout, out(r)
        home = app.json("/")
        assert home == {"version": "v1", "greeting": "Hola", "posts": 0}, "catalogs compiled at build time"
        assert app.get("/post", method="POST", data="first post").status == 200
        assert c.run("stat -c %U /srv/microblog/releases/1/app/version.py").stdout.strip() == "root"
        r = c.run("reloader check /root/microblog.toml", check=False)
        assert r.returncode == 0 and "microblog:app imports in microblog.service's sandbox" in r.stdout, out(r)

        load = app.start_load(concurrency=4)
        try:
            # A migration release from the checkout: the data survives, the column is added.
            checkout(c, "v2", files={"migrations/versions/0002_author.py": MIGRATION})
            r = reloader(c, "deploy", "microblog", "--from", CHECKOUT)
            assert r.returncode == 0, out(r) + app.journal(40)
            assert app.json("/") == {"version": "v2", "greeting": "Hola", "posts": 1}
            columns = c.run(["python3", "-c", "import sqlite3; print([r[1] for r in sqlite3.connect("
                             "'/var/lib/microblog/app.db').execute('pragma table_info(post)')])"]).stdout
            assert "'author'" in columns, columns

            checkout(c, "v3")
            r = reloader(c, "deploy", "microblog", "--from", CHECKOUT)
            assert r.returncode == 0 and app.json("/")["version"] == "v3", out(r)

            # A refused release, from a tarball: flask db upgrade cannot import it; file and line named.
            routes = c.read_file(f"{CHECKOUT}/app/main/routes.py")
            checkout(c, "v4", files={"app/main/routes.py": "from app.nosuch import helper  # noqa\n" + routes})
            c.run("tar czf /root/microblog-v4.tar.gz -C /opt/checkout microblog")
            r = reloader(c, "deploy", "microblog", "--from", "/root/microblog-v4.tar.gz")
            assert r.returncode == 1 and "current put back" in r.stdout, out(r)
            assert "No module named 'app.nosuch' (app/main/routes.py:1)" in r.stdout, out(r)
            assert app.json("/")["version"] == "v3"

            # Rollback onto the previous proven release (2): verified, under the same load.
            r = reloader(c, "rollback", "microblog")
            assert r.returncode == 0, out(r) + app.journal(40)
            assert app.json("/") == {"version": "v2", "greeting": "Hola", "posts": 1}
        finally:
            report = app.stop_load(load)
        print(f"microblog: 3 deploys --from, a refusal, a rollback: {report['summary']}")
        assert report["total"] > 0 and report["failures"] == {}, (report["summary"], report.get("first_failures"))

        listed = {row["release"]: row["state"]
                  for row in json.loads(reloader(c, "releases", "microblog", "--json").stdout)["releases"]}
        assert listed == {"1": "proven", "2": "live", "3": "previous", "4": "refused"}, listed
        records = json.loads(c.read_file("/var/lib/reloader/microblog/releases.json"))
        assert [(h["action"], h["result"], h["release"], h["performer"]) for h in records["history"]] == [
            ("deploy", "success", "2", "root"), ("deploy", "success", "3", "root"),
            ("deploy", "refused", "4", "root"), ("rollback", "success", "2", "root")], records["history"]
        hooks = c.read_file("/root/hooks.log").splitlines()
        assert len(hooks) == 4, hooks
        assert "RELOADER_RESULT=refused" in hooks[2] and "RELOADER_RELEASE=4" in hooks[2], hooks[2]
        assert "app/main/routes.py:1" in hooks[2] and "RELOADER_PREVIOUS=3" in hooks[2], hooks[2]
        assert "RELOADER_ACTION=rollback" in hooks[3] and "RELOADER_PERFORMER=root" in hooks[3], hooks[3]
        journal = c.run("journalctl -t reloader -o cat --no-pager", check=False).stdout
        assert "microblog: rollback of release 2 by root: success" in journal, journal
        metrics = parse_prometheus(c.read_file(PROM))
        deploys = metrics["reloader_deploys_total"]["samples"]
        assert deploys[frozenset({"app": "microblog", "action": "deploy", "result": "success"}.items())] == 2
        assert metrics["reloader_refusals_total"]["samples"] == {frozenset({"app": "microblog"}.items()): 1}
        assert frozenset({"app": "microblog", "release": "2", "previous": "3"}.items()) in \
            metrics["reloader_live_release_info"]["samples"]


def test_first_installs_say_what_the_sandbox_refused_and_why_setup_failed(wheels: Path) -> None:
    """The two first installs of issue 23: logs/ next to the code (refused before anything is written,
    with the path and the keys that fix it), and a setup step that writes into the release (the OSError
    and its path in install's output, not systemd's "Failed with result")."""
    with testbed.boot("bookworm", binds=[f"{wheels}:/wheels"]) as c:
        install_wrapper(c)
        c.run(f"mkdir -p /opt/checkout && cp -R /src/tests/apps/microblog {CHECKOUT}")
        r = c.run(f"cd /root && reloader init {CHECKOUT} --name badblog", check=False)
        assert r.returncode == 0, out(r)
        toml = c.read_file("/root/badblog.toml").replace(', LOG_TO_STDOUT = "1"', "")
        c.write_file("/root/badblog.toml", toml)
        started = time.monotonic()
        r = reloader(c, "install", "/root/badblog.toml", "--from", CHECKOUT)
        assert r.returncode == 1, out(r)
        line = r.stderr.strip().splitlines()[-1]
        assert "OSError: [Errno 30] Read-only file system: 'logs' (app/__init__.py:" in line, out(r)
        assert "writes /srv/badblog/releases/1/logs" in line and "logs_directory" in line, line
        assert "LOG_TO_STDOUT" in line and "state_directory" in line, line
        assert c.run("test -e /etc/systemd/system/badblog.service", check=False).returncode != 0, "nothing written"
        print(f"refused before the first start in {time.monotonic() - started:.1f} s (with the build): {line}")

        # The tutorial's deploy step `flask translate compile` as a setup command: the release is read-only.
        toml = toml.replace('state_directory = "badblog"', 'state_directory = "badblog"\nlogs_directory = "badblog"')
        toml = toml.replace('commands = ["flask db upgrade"]', 'commands = ["pybabel compile -d app/translations"]')
        c.write_file("/root/badblog.toml", toml)
        r = reloader(c, "install", "/root/badblog.toml")
        assert r.returncode == 1, out(r)
        line = r.stderr.strip().splitlines()[-1]
        assert "setup commands failed" in line, out(r)
        assert "Read-only file system: 'app/translations/es/LC_MESSAGES/messages.mo'" in line, out(r)
        assert "[build] commands" in line and "Failed with result" not in r.stderr, out(r)
        assert "Consumed" not in r.stderr, out(r)
