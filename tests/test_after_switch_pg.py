"""[setup] after_switch on a real PostgreSQL under load: a two-phase (expand/contract) schema change.

tests/test_after_switch.py proves the ordering on SQLite; this is the same proof against the database such
migrations are written for. The container is the test bed's image with the cached ``postgresql`` layer
(testbed.LAYERS: Debian's PostgreSQL 15, whose cluster starts at boot, and psycopg 3 in the app's venv), so
CI builds it once (about 20 s) and no other container carries it. The app connects over the Unix socket
with peer authentication, as the app's own user, from inside its sandbox.

A shop's products move from ``price_cents`` (integer, release 1 reads it) to ``price`` (numeric, release 2
reads it). The expand step (``ADD COLUMN price``, backfill) is a [setup] command before the switch; the
contract step (``DROP COLUMN price_cents``) is [setup] after_switch, once release 1's generation retired.
Every answer names its release and the prices it read in ``X-App-Version``, so the load generator's
per-version counts check every single answer: release 1's from ``price_cents``, release 2's from ``price``.

The migrations set ``lock_timeout`` and retry, as a careful operator's do: an ``ALTER TABLE`` waiting for
its ACCESS EXCLUSIVE lock queues every later query of the table behind it, so an unbounded wait stalls the
app. The failure case shows it: a stray session holding a transaction open blocks release 3's contract step
(``SET NOT NULL``); the step gives up, the deploy exits 3 with release 3 serving and no request failed;
once the session is gone, ``reloader setup --after-switch`` (by hand, as the app's user) finishes the job.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import testbed
from appbed import App

DSN = "dbname=shop host=/run/postgresql"
#: (sku, price in cents) of the shop's products: release 1 shows the cents, release 2 the price.
PRODUCTS = (("mug", 1299), ("poster", 2500), ("sticker", 99))

APP = """import os
import psycopg
from flask import Flask, jsonify, request

VERSION = {version!r}
COLUMN = {column!r}
app = Flask(__name__)
_conn = None


def db():
    # One connection per worker, autocommit: no transaction (and no lock) outlives a request.
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True, application_name="shop-" + VERSION)
    return _conn


def products():
    rows = db().execute(f"SELECT sku, {{COLUMN}} FROM products ORDER BY id").fetchall()
    return [{{"sku": sku, COLUMN: str(value)}} for sku, value in rows]


def answer(items):
    response = jsonify(version=VERSION, products=items)
    # The release and what it read, so the load generator counts every answer by its content.
    response.headers["X-App-Version"] = VERSION + " " + COLUMN + "=" + ",".join(i[COLUMN] for i in items)
    return response


@app.get("/")
def index():
    return answer(products())


@app.get("/slow")
def slow():
    db().execute("SELECT pg_sleep(%s)", [float(request.args.get("s", "1"))])
    return answer(products())


@app.get("/health")
def health():
    products()
    return jsonify(status="ok", version=VERSION)
"""

MIGRATE = """import os, sys, time
import psycopg

# phase -> SQL statements, run in one transaction. lock_timeout: an ALTER TABLE waiting for its lock
# queues every later query of the table behind it; give up quickly and retry rather than stall the app.
STEPS = {steps!r}
ATTEMPTS, LOCK_TIMEOUT = 3, "1s"

phase = sys.argv[1]
for attempt in range(1, ATTEMPTS + 1):
    t0 = time.monotonic()
    try:
        with psycopg.connect(os.environ["DATABASE_URL"], application_name="migrate") as conn:
            conn.execute(f"SET lock_timeout = '{{LOCK_TIMEOUT}}'")
            # Whose connections are open now: the old release's ones must be gone before a contract step.
            apps = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND application_name LIKE 'shop-%' GROUP BY 1 ORDER BY 1")
            print(f"{{phase}}: app sessions {{dict(apps.fetchall())}}", flush=True)
            for sql in STEPS.get(phase, []):
                conn.execute(sql)
    except psycopg.errors.LockNotAvailable as e:
        print(f"{{phase}}: attempt {{attempt}}: {{e}}".strip(), flush=True)
        time.sleep(0.5)
        continue
    print(f"{{phase}}: done in {{(time.monotonic() - t0) * 1000:.0f}} ms (attempt {{attempt}})", flush=True)
    break
else:
    sys.exit(f"{{phase}}: lock not granted within {{LOCK_TIMEOUT}} in {{ATTEMPTS}} attempts")
"""

CREATE = ["CREATE TABLE IF NOT EXISTS products (id serial PRIMARY KEY, sku text NOT NULL, price_cents integer)",
          "INSERT INTO products (sku, price_cents) SELECT * FROM (VALUES "
          + ", ".join(f"('{sku}', {cents})" for sku, cents in PRODUCTS)
          + ") AS v WHERE NOT EXISTS (SELECT 1 FROM products)"]
EXPAND = ["ALTER TABLE products ADD COLUMN IF NOT EXISTS price numeric(10, 2)",
          "UPDATE products SET price = price_cents / 100.0 WHERE price IS NULL"]
CONTRACT = ["ALTER TABLE products DROP COLUMN IF EXISTS price_cents"]
NOT_NULL = ["ALTER TABLE products ALTER COLUMN price SET NOT NULL"]

V1 = "v1 price_cents=" + ",".join(str(cents) for _, cents in PRODUCTS)
V2 = "v2 price=" + ",".join(f"{cents / 100:.2f}" for _, cents in PRODUCTS)
V3 = V2.replace("v2", "v3", 1)


@pytest.fixture
def pg_container(testbed_image: Path) -> Iterator[testbed.Container]:
    """A bookworm container with the ``postgresql`` layer, its cluster up, a role and database for the app."""
    with testbed.boot("bookworm", layer="postgresql") as c:
        deadline = time.monotonic() + 60
        while c.run(["pg_isready", "-q", "-h", "/run/postgresql"], check=False).returncode != 0:
            assert time.monotonic() < deadline, c.run("journalctl -u 'postgresql*' --no-pager", check=False).stdout
            time.sleep(0.2)
        c.run(["runuser", "-u", "postgres", "--", "psql", "-q", "-v", "ON_ERROR_STOP=1",
               "-c", "CREATE ROLE flaskapp LOGIN", "-c", "CREATE DATABASE shop OWNER flaskapp"])
        yield c


def psql(app: App, sql: str) -> str:
    """One query's rows as PostgreSQL's superuser sees them (unaligned, no headers)."""
    return app.c.run(["runuser", "-u", "postgres", "--", "psql", "-d", "shop", "-At", "-v", "ON_ERROR_STOP=1",
                      "-c", sql]).stdout.strip()


def columns(app: App) -> str:
    return psql(app, "SELECT string_agg(column_name || ':' || is_nullable, ' ' ORDER BY ordinal_position) "
                     "FROM information_schema.columns WHERE table_name = 'products'")


def release(app: App, version: str, column: str, steps: dict) -> int:
    return app.ship(code=APP.format(version=version, column=column), files={"migrate.py": MIGRATE.format(steps=steps)})


def test_a_two_phase_migration_on_postgresql_drops_the_old_column_after_the_switch_with_no_failed_request(
        pg_container: testbed.Container) -> None:
    app = App(pg_container)
    # Readable by the app's user: the operator re-runs the contract step as that user, below.
    config = app.variant(setup='commands = ["python migrate.py expand"]\n'
                               'after_switch = ["python migrate.py contract"]', path="/srv/flaskapp/flaskapp.toml")
    app.c.write_file(config, app.c.read_file(config).replace(
        "[app]\n", f'[app]\nenvironment = {{ DATABASE_URL = "{DSN}" }}\n', 1))
    # Release 1 reads price_cents; its setup step creates and fills the table.
    r = app.install(config, check=False, code=APP.format(version="v1", column="price_cents"),
                    files={"migrate.py": MIGRATE.format(steps={"expand": CREATE})})
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal())
    assert app.get("/").json["products"][0] == {"sku": "mug", "price_cents": "1299"}
    assert columns(app) == "id:NO sku:NO price_cents:YES"

    # Release 2 reads price: expand adds and backfills it (release 1 keeps reading price_cents), contract
    # drops price_cents once release 1 is gone.
    release(app, "v2", "price", {"expand": EXPAND, "contract": CONTRACT})
    load = app.start_load(concurrency=6, long=2, long_path="/slow?s=1")
    try:
        t0 = time.monotonic()
        deploy = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=300)
        deploy_seconds = time.monotonic() - t0
        after_deploy = columns(app)
        st = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)

        # Release 3 (same code) makes price NOT NULL after its switch, while a stray session sits idle in a
        # transaction that read the table: the step's lock waits time out, the app keeps answering.
        release(app, "v3", "price", {"contract": NOT_NULL})
        blocker = app.c.popen(["runuser", "-u", "postgres", "--", "psql", "-d", "shop", "-q", "-c",
                               "BEGIN", "-c", "SELECT count(*) FROM products", "-c", "SELECT pg_sleep(600)"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while psql(app, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.application_name = 'psql' AND l.relation = 'products'::regclass") != "1":
            assert time.monotonic() < deadline and blocker.poll() is None, "the blocking session took no lock"
            time.sleep(0.2)
        failed = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=300)
        blocked_columns = columns(app)
        psql(app, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'psql' "
                  "AND pid <> pg_backend_pid()")
        blocker.wait(timeout=30)
        # By hand, as the app's user with its environment (`reloader setup` uses the caller's).
        healed = app.c.run(["runuser", "-u", "flaskapp", "--", "env", f"DATABASE_URL={DSN}", "reloader", "setup",
                            config, "--after-switch"], check=False, timeout=120)
    finally:
        report = app.stop_load(load)

    assert deploy.returncode == 0, (deploy.stdout, deploy.stderr)
    assert after_deploy == "id:NO sku:NO price:YES", after_deploy
    assert st["after_switch"]["last"]["result"] == "ok", st["after_switch"]
    journal = app.journal_with("reloader: flaskapp:")
    retired = journal.find("retiring old master")
    contracted = journal.find("after_switch: running")
    assert 0 <= retired < contracted, journal[-3000:]
    dropped = re.search(r"contract: done in (\d+) ms \(attempt (\d+)\)", journal)
    assert dropped, journal[-3000:]
    # PostgreSQL's own view: release 1's connections were open during the expand step, gone at the contract.
    sessions = re.findall(r"(expand|contract): app sessions (\{[^}]*\})", journal)
    assert [phase for phase, _ in sessions[:2]] == ["expand", "contract"], sessions
    assert "shop-v1" in sessions[0][1] and "shop-v1" not in sessions[1][1], sessions
    assert "shop-v2" in sessions[1][1], sessions

    assert failed.returncode == 3, (failed.returncode, failed.stdout, failed.stderr)
    assert "after_switch failed" in failed.stdout and "not rolled back" in failed.stdout, failed.stdout
    assert blocked_columns == "id:NO sku:NO price:YES", blocked_columns
    assert app.version() == "v3"
    props = app.props()
    assert props["ReloadResult"] == "success" and "lock not granted" in props["StatusText"], props
    assert healed.returncode == 0, (healed.stdout, healed.stderr)
    assert columns(app) == "id:NO sku:NO price:NO"

    # Every answer came, from its release, with the prices of the column that release reads.
    assert report["failures"] == {} and report["total"] > 0, (report["summary"], report.get("first_failures"))
    assert report["long"]["failed"] == 0, report["long"]
    assert set(report["versions"]) == {V1, V2, V3}, report["versions"]
    counts = {v: d["count"] for v, d in report["versions"].items()}
    print(f"\nmeasured: {report['total']} requests, {report['failed']} failed, answers by content {counts}; "
          f"deploy with the contract step {deploy_seconds:.1f} s, after_switch "
          f"{st['after_switch']['last']['seconds']} s, DROP COLUMN {dropped.group(1)} ms "
          f"(attempt {dropped.group(2)}); sessions {sessions[:2]}; latency ms {report['latency_ms']}")
