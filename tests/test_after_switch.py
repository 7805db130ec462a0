"""[setup] after_switch in a real systemd under load: a two-phase (expand/contract) schema change on SQLite.

The expand step (add the new column) runs before the switch, as a [setup] command; the contract step (drop
the old column, which the old release still reads) runs as after_switch, once the old generation has
retired. Had it run any earlier, the old release's requests would fail: the load proves it did not. A
failing after_switch leaves the new release serving (not a rollback) and `reloader deploy` exits 3.

SQLite here (no database server in the container); tests/test_after_switch_pg.py proves the same on a real
PostgreSQL (a cached test-bed layer), with the migrations' lock_timeout and a contract step it blocks.
"""

from __future__ import annotations

import json

from appbed import App

DB = "/var/lib/flaskapp/db.sqlite3"

APP = """import os, sqlite3, time
from contextlib import closing
from flask import Flask, jsonify, request

VERSION = {version!r}
COLUMN = {column!r}
app = Flask(__name__)


def item():
    with closing(sqlite3.connect({db!r}, timeout=10)) as c:
        return c.execute(f"SELECT {{COLUMN}} FROM items WHERE id = 1").fetchone()[0]


@app.get("/")
def index():
    return jsonify(version=VERSION, item=item())


@app.get("/health")
def health():
    item()
    return jsonify(status="ok", version=VERSION)


@app.get("/slow")
def slow():
    time.sleep(float(request.args.get("s", "1")))
    return jsonify(version=VERSION, item=item())


@app.after_request
def version_header(response):
    response.headers["X-App-Version"] = VERSION
    return response
"""

def migrate(phases: dict) -> str:
    """migrate.py for a release: phase -> ("FAIL" | (column that must be absent/present, [SQL]))."""
    return f"""import sqlite3, sys
PHASES = {phases!r}
c = sqlite3.connect({DB!r}, timeout=10)
columns = [row[1] for row in c.execute("PRAGMA table_info(items)")]
step = PHASES.get(sys.argv[1])
if step == "FAIL":
    raise sqlite3.OperationalError("error in index idx_items_name after drop column")
if step:
    only_if, statements = step
    wanted = only_if.lstrip("!")
    if (wanted in columns) != only_if.startswith("!"):
        for sql in statements:
            c.execute(sql)
        c.commit()
print(sys.argv[1], "done; columns now", [row[1] for row in c.execute("PRAGMA table_info(items)")])
"""


def release(app: App, version: str, column: str, phases: dict) -> int:
    return app.ship(code=APP.format(version=version, column=column, db=DB),
                    files={"migrate.py": migrate(phases)})


def test_a_two_phase_migration_contracts_after_the_switch_under_load_and_a_failure_is_not_a_rollback(
        container) -> None:
    app = App(container)
    config = app.variant(setup='commands = ["python migrate.py expand"]\n'
                               'after_switch = ["python migrate.py contract"]')
    app.c.write_file(config, app.c.read_file(config).replace("[app]\n", '[app]\nstate_directory = "flaskapp"\n', 1))
    # Release 1 reads `name`; its expand step creates the table.
    r = app.install(config, check=False, code=APP.format(version="v1", column="name", db=DB),
                    files={"migrate.py": migrate({"expand": ("!id", [
                        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)",
                        "INSERT INTO items VALUES (1, 'widget')"])})})
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert app.get("/").json == {"version": "v1", "item": "widget"}

    # Release 2 reads `title`: expand adds it (v1 keeps reading `name`), contract drops `name`.
    release(app, "v2", "title", {
        "expand": ("!title", ["ALTER TABLE items ADD COLUMN title TEXT", "UPDATE items SET title = name"]),
        "contract": ("name", ["ALTER TABLE items DROP COLUMN name"])})
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    r = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=300)
    report = app.stop_load(load)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert report["failures"] == {} and report["total"] > 0, (report["summary"], report.get("first_failures"))
    assert report["long"]["failed"] == 0, report["long"]
    assert set(report["versions"]) == {"v1", "v2"}, report["versions"]
    columns = app.c.run(["python3", "-c", f"import sqlite3; print([r[1] for r in sqlite3.connect({DB!r})"
                                          ".execute('PRAGMA table_info(items)')])"]).stdout.strip()
    assert columns == "['id', 'title']", columns
    journal = app.journal_with("reloader: flaskapp:")
    retired, contracted = journal.find("retiring old master"), journal.find("after_switch: running")
    assert 0 <= retired < contracted, journal[-2000:]
    st = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)
    assert st["after_switch"]["last"]["result"] == "ok", st["after_switch"]

    # A failing contract step: release 3 serves, the failure is reported, deploy exits 3, no rollback.
    release(app, "v3", "title", {"contract": "FAIL"})
    r = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=300)
    props = app.props()
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "after_switch failed" in r.stdout and "not rolled back" in r.stdout, r.stdout
    assert app.version() == "v3"
    assert props["ReloadResult"] == "success" and props["SubState"] == "running", props
    assert "after_switch failed" in props["StatusText"] and "OperationalError" in props["StatusText"], props
    st = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)
    assert st["after_switch"]["last"]["result"] == "failed" and st["after_switch"]["last"]["release"] == "3", st
    assert st["live_release"].endswith("/3"), st["live_release"]
    assert "after_switch FAILED" in app.c.run(["reloader", "status", "flaskapp"]).stdout

    # Fixed, and run again by hand as root (as the failure tells): as the service runs it, as flaskapp in
    # its sandbox with [app] environment, not as root with the operator's environment; recorded.
    config_text = app.c.read_file("/etc/reloader/flaskapp.toml")
    assert "[app]\n" in config_text
    app.c.write_file("/etc/reloader/flaskapp.toml",
                     config_text.replace("[app]\n", '[app]\nenvironment = { MIGRATION_TAG = "from-the-unit" }\n', 1))
    app.c.write_file("/srv/flaskapp/releases/3/migrate.py", f"""import getpass, os, sqlite3
c = sqlite3.connect({DB!r}, timeout=10)
c.execute("CREATE TABLE ran (who TEXT, tag TEXT)")
c.execute("INSERT INTO ran VALUES (?, ?)", (getpass.getuser(), os.environ.get("MIGRATION_TAG", "")))
c.commit()
""")
    r = app.c.run(["env", "MIGRATION_TAG=from-root", "reloader", "setup", "/etc/reloader/flaskapp.toml",
                   "--after-switch", "--release", "/srv/flaskapp/releases/3"], check=False, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    ran = app.c.run(["python3", "-c", f"import sqlite3; print(sqlite3.connect({DB!r})"
                                      ".execute('SELECT who, tag FROM ran').fetchall())"]).stdout.strip()
    assert ran == "[('flaskapp', 'from-the-unit')]", ran
    st = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)
    assert st["after_switch"]["last"]["result"] == "ok" and st["after_switch"]["last"]["release"] == "3", st
    assert app.version() == "v3"
