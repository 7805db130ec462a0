"""Real apps, not only the example (issue 11): a Django project, a FastAPI app with a lifespan handler and a
Flask app factory writing SQLite, each installed from scratch with its setup commands, deployed 5 times per
worker class under load through nginx, shown a broken release, and written to.

One container per app; its worker classes share it (a worker-class change is itself a verified reload).
"""

from __future__ import annotations

import re

import pytest
from realapps import RealApp

DEPLOYS = 5


def assert_no_failures(report: dict) -> None:
    assert report["total"] > 0, report["summary"]
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"))
    assert report["keepalive_retries"] == 0, report["summary"]


def deploy_under_load(app: RealApp, first: int) -> int:
    """DEPLOYS reloads of changed code under load: each returns with the new code serving. Returns the last n."""
    load = app.start_load()
    n = first
    for n in range(first, first + DEPLOYS):
        app.ship(f"v{n}")
        r = app.reload()
        props = app.props()
        assert r.returncode == 0, (r.stderr, props, app.journal(40))
        assert props["ReloadResult"] == "success" and props["SubState"] == "running", props
        assert app.version() == f"v{n}", "reload returned before the new release was serving"
    report = app.stop_load(load)
    print(f"{app.name}: {DEPLOYS} deploys: {report['summary']}")
    assert report["failures"] == {}, (report["summary"], report.get("first_failures"),
                                      app.c.run("tail -n 20 /var/log/nginx/error.log", check=False).stdout)
    assert_no_failures(report)
    assert f"v{n}" in report["versions"], report["versions"]
    return n


def assert_refused(app: RealApp, files: dict[str, str], reason: str, serving: str) -> None:
    master = app.props()["MainPID"]
    app.ship("broken", files=files)
    r = app.reload()
    props = app.props()
    assert r.returncode != 0, f"a broken release must be refused: {reason}"
    assert props["MainPID"] == master and props["SubState"] == "running", props
    status = app.status_text()
    assert "reload refused" in status and reason in status, status
    assert app.version() == serving


def installed_from_scratch(app: RealApp, config: str) -> None:
    app.ship("v1")
    r = app.install_config(config)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal(40))
    assert f"{app.name}: running the setup commands ({app.name}-setup.service)" in r.stdout, r.stdout
    assert "answers 200 through nginx" in r.stdout, r.stdout
    assert app.version() == "v1"
    # A second install changes nothing, and still checks the app through nginx.
    r = app.install_config(config)
    assert r.returncode == 0 and "nothing changed" in r.stdout and "answers 200 through nginx" in r.stdout, r


def test_flask_app_factory_writing_sqlite_on_sync_gthread_and_gevent(container) -> None:
    app = RealApp(container, "flaskr", "flaskr.example", "flaskr", "flaskr/__init__.py")
    installed_from_scratch(app, app.config("flaskr"))
    assert app.json("/posts", method="POST", data="first")["id"] == 1, "the app can write its database"
    n = 2
    for worker, extra in (("sync", {}), ("gthread", {"threads": "4"}), ("gevent", {"max_requests": "500"})):
        if worker != "sync":
            r = app.install_config(app.config("flaskr", worker_class=f'"{worker}"', **extra))
            assert r.returncode == 0 and "reloading the running service" in r.stdout, (r.stdout, r.stderr)
            assert f"Using worker: {worker}" in app.journal_with("Using worker:"), worker
        n = deploy_under_load(app, n) + 1
        assert app.json("/posts", method="POST", data=worker)["version"] == f"v{n - 1}"
    assert app.json("/")["posts"] == 4, "every write of every generation landed in the one database"
    # No access log of gunicorn's by default (docs/steady-state.md): nginx's has every request.
    journal = app.c.run("journalctl -u flaskr --no-pager -o cat", check=False).stdout
    assert not re.search(r'"GET /health HTTP/1\.[01]" 200', journal), app.journal(20)
    assert re.search(r'"GET /health HTTP/1\.[01]" 200', app.c.read_file("/var/log/nginx/access.log"))
    # A new writable directory needs a restart (a reload's generation keeps the old mount namespace):
    # refused without --restart, nothing changed; with it, restarted while the socket holds connections.
    config = app.config("flaskr", worker_class='"gevent"', max_requests="500",
                        state_directory='"flaskr"\ncache_directory = "flaskr"')
    before = app.c.read_file("/etc/systemd/system/flaskr.service")
    r = app.install_config(config)
    assert r.returncode == 1 and "flaskr.service: CacheDirectory= changed" in r.stderr and "--restart" in r.stderr, r
    assert app.c.read_file("/etc/systemd/system/flaskr.service") == before, "a refused install changed the unit"
    load = app.start_load()
    r = app.install_config(config, "--restart")
    assert r.returncode == 0 and "restarting flaskr.service for flaskr.service: CacheDirectory=" in r.stdout, r
    assert_no_failures(app.stop_load(load))
    assert app.c.run("test -d /var/cache/flaskr", check=False).returncode == 0
    # The setup command imports the release first: its failure is the refusal.
    assert_refused(app, {"flaskr/__init__.py": "import nosuchmodule\n"},
                   "setup command 'flask --app flaskr init-db' failed with exit status 2: ModuleNotFoundError: "
                   "No module named 'nosuchmodule'", f"v{n - 1}")
    # Past the setup command, an exception in a view: the pre-flight names the view's line, not "answered 500".
    broken_view = app.read("flaskr/__init__.py").replace('        db.get_db().execute("SELECT 1")',
                                                         '        db.get_db().execute("SELECT * FROM nosuchtable")')
    assert_refused(app, {"flaskr/__init__.py": broken_view},
                   "OperationalError: no such table: nosuchtable (flaskr/__init__.py:26)", f"v{n - 1}")


@pytest.mark.parametrize("unused", [None], ids=["uvicorn-worker+asgi"])
def test_fastapi_with_lifespan_on_uvicorn_worker_and_gunicorns_asgi_worker(container, unused) -> None:
    app = RealApp(container, "fastapi", "api.example", "fastapiapp", "main.py")
    app.ship("v1")
    r = app.install_config(app.config("fastapi"))
    assert r.returncode == 0 and "answers 200 through nginx" in r.stdout, (r.stdout, r.stderr, app.journal(40))
    n = 2
    for worker in ("uvicorn_worker.UvicornWorker", "asgi"):
        if worker == "asgi":
            r = app.install_config(app.config("fastapi", worker_class='"asgi"'))
            assert r.returncode == 0 and "reloading the running service" in r.stdout, (r.stdout, r.stderr)
        n = deploy_under_load(app, n) + 1
        assert app.json("/notes", method="POST", data=worker)["version"] == f"v{n - 1}", "writes succeed"
        assert app.json("/")["host"] == "api.example"
    passed = app.c.run("journalctl -u fastapi --no-pager -o cat -g 'pre-flight passed'", check=False).stdout
    assert passed.count("pre-flight passed: /health answered 200 OK") == 2 * DEPLOYS + 1, passed
    failing = app.read("main.py").replace("    conn = sqlite3.connect(",
                                          "    raise RuntimeError('database unreachable')\n    conn = sqlite3.connect(")
    assert failing != app.read("main.py")
    assert_refused(app, {"main.py": failing}, "RuntimeError: database unreachable (main.py:16)", f"v{n - 1}")
    assert_refused(app, {"main.py": "import nosuchmodule\n"},
                   "ModuleNotFoundError: No module named 'nosuchmodule' (main.py:1)", f"v{n - 1}")


def test_django_project_with_migrations_static_files_and_sessions(container) -> None:
    app = RealApp(container, "djangoapp", "django.example", "djangoapp", "notes/views.py")
    installed_from_scratch(app, app.config("djangoapp"))
    cookies = "/root/django.cookies"
    assert [app.json("/", cookies=cookies)["visits"] for _ in range(3)] == [1, 2, 3], "sessions are saved"
    css = app.get("/static/notes/site.css")
    assert css.status == 200 and "color" in css.body, "collectstatic ran and nginx serves its output"
    last = deploy_under_load(app, 2)
    assert app.json("/", cookies=cookies)["visits"] == 4, "the session survived 5 deploys"
    assert app.json("/notes", method="POST", data="hello")["id"] == 1
    views = app.read("notes/views.py")
    settings = app.read("mysite/settings.py")
    assert_refused(app, {"notes/views.py": "import nosuchmodule\n" + views},
                   "No module named 'nosuchmodule'", f"v{last}")
    assert_refused(app, {"mysite/settings.py": settings.replace("    'notes',\n", "    'notes',\n    'notez',\n")},
                   "No module named 'notez'", f"v{last}")
    migration = ("from django.db import migrations\n\n\ndef backfill(apps, schema_editor):\n"
                 "    raise RuntimeError('backfill failed: no default for notes.author')\n\n\n"
                 "class Migration(migrations.Migration):\n    dependencies = [('notes', '0001_initial')]\n"
                 "    operations = [migrations.RunPython(backfill)]\n")
    assert_refused(app, {"notes/migrations/0002_backfill.py": migration},
                   "RuntimeError: backfill failed: no default for notes.author", f"v{last}")
    assert "setup command 'python manage.py migrate --noinput' failed" in app.status_text()
    # The failed migration was rolled back: the old code and its data are intact, and the next release deploys.
    assert app.json("/health")["notes"] == 1
    app.ship(f"v{last + 1}")
    r = app.reload()
    assert r.returncode == 0 and app.version() == f"v{last + 1}", (r.stderr, app.journal(40))
