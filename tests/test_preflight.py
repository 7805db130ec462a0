"""reloader/preflight.py on the host: WSGI and ASGI apps (stdlib-only ones, under this python3), the Host
and forwarded headers nginx sends, the passing status range, and where a refusal points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "reloader" / "preflight.py"

ECHO_WSGI = """
import json
def app(environ, start_response):
    seen = {k: environ.get(k) for k in ("HTTP_HOST", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO",
                                         "HTTP_X_REAL_IP")}
    print(json.dumps(seen), flush=True)  # the app's stdout must not break the JSON line
    status = "200 OK" if environ["HTTP_HOST"] == "shop.example" else "400 Bad Request"
    start_response(status, [])
    return [b""]
"""

LIFESPAN_ASGI = """
import json, os
events = []
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["db"] = "open"
                events.append("startup")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                events.append("shutdown")
                with open(os.environ["EVENTS"], "w") as f:
                    json.dump(events, f)
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    headers = dict(scope["headers"])
    events.append({"state": scope["state"].get("db"), "host": headers[b"host"].decode(),
                   "proto": headers[b"x-forwarded-proto"].decode(), "path": scope["path"],
                   "query": scope["query_string"].decode()})
    await receive()
    await send({"type": "http.response.start", "status": 302, "headers": [(b"location", b"/x")]})
    await send({"type": "http.response.body", "body": b""})
"""

FAILING_LIFESPAN = """
class Pool:
    def connect(self):
        raise ConnectionError("database unreachable")

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        try:
            Pool().connect()
        except Exception as e:
            await send({"type": "lifespan.startup.failed", "message": str(e)})
            raise
"""

NO_LIFESPAN = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        raise RuntimeError("only http")
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
"""


def run(tmp_path: Path, source: str, *args: str, env: dict | None = None) -> tuple[int, dict]:
    (tmp_path / "app.py").write_text(source)
    p = subprocess.run([sys.executable, str(SCRIPT), "app:app", "/health?x=1", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env)
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


def test_wsgi_request_carries_the_site_host_and_nginx_headers(tmp_path) -> None:
    code, result = run(tmp_path, ECHO_WSGI, "--host", "shop.example")
    assert (code, result) == (0, {"ok": True, "status": "200 OK"})


def test_a_4xx_answer_is_refused_by_default_and_names_the_host(tmp_path) -> None:
    code, result = run(tmp_path, ECHO_WSGI, "--host", "other.example")
    assert code == 1 and not result["ok"]
    assert "/health?x=1 answered 400 Bad Request" in result["error"]
    assert "Host: other.example" in result["error"]


def test_the_passing_range_is_configurable(tmp_path) -> None:
    code, result = run(tmp_path, ECHO_WSGI, "--host", "other.example", "--ok", "200-499")
    assert (code, result["ok"]) == (0, True)


def test_asgi_app_runs_inside_its_lifespan(tmp_path) -> None:
    events = tmp_path / "events.json"
    code, result = run(tmp_path, LIFESPAN_ASGI, "--asgi", "--host", "api.example",
                       env={"EVENTS": str(events), "PATH": "/usr/bin:/bin"})
    assert (code, result) == (0, {"ok": True, "status": "302 Found"})
    assert json.loads(events.read_text()) == [
        "startup", {"state": "open", "host": "api.example", "proto": "http", "path": "/health", "query": "x=1"},
        "shutdown"]


def test_failing_lifespan_startup_is_refused_with_the_apps_line(tmp_path) -> None:
    code, result = run(tmp_path, FAILING_LIFESPAN, "--asgi")
    assert code == 1
    assert result["error"] == "ConnectionError: database unreachable (app.py:4)"


def test_asgi_app_without_lifespan_is_still_requested(tmp_path) -> None:
    code, result = run(tmp_path, NO_LIFESPAN, "--asgi")
    assert (code, result) == (0, {"ok": True, "status": "204 No Content"})


def test_an_asgi_app_called_as_wsgi_says_which_worker_class_to_use(tmp_path) -> None:
    code, result = run(tmp_path, NO_LIFESPAN)
    assert code == 1
    assert "this is an ASGI app: set [gunicorn] worker_class" in result["error"]
    assert "preflight.py" not in result["error"]


@pytest.mark.parametrize("asgi", [False, True], ids=["wsgi", "asgi"])
def test_an_error_raised_by_reloaders_call_never_points_at_preflight_py(tmp_path, asgi: bool) -> None:
    source = "def app(environ):\n    return []\n" if not asgi else "async def app(scope):\n    pass\n"
    code, result = run(tmp_path, source, *(["--asgi"] if asgi else []))
    assert code == 1 and "TypeError" in result["error"], result
    assert "preflight.py" not in result["error"], result
