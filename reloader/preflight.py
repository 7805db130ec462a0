"""Pre-flight a release: import the app and make one in-process request to its health path.

This file runs as a *script* under the app's own interpreter (its virtualenv), as the unit's user, in the
release's working directory, with the unit's environment; so it must use nothing but the standard library
and nothing from reloader. It prints one JSON object on stdout and exits 0 when the release may go live:
``{"ok": true, "status": "200 OK"}`` or ``{"ok": false, "error": "ModuleNotFoundError: ... (app.py:3)"}``.
The caller bounds it with a timeout, so a hanging import is refused rather than waited for.

The request looks like the ones nginx forwards (the site's Host, X-Forwarded-For/-Proto, X-Real-IP), so an
app that checks its host (Django's ALLOWED_HOSTS) answers as it will in production. With ``--asgi`` the app
is called through the ASGI interface instead, inside its lifespan (startup before, shutdown after), as
gunicorn's ``asgi`` worker and uvicorn's workers do.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import json
import os
import sys
import traceback

_SELF = os.path.abspath(__file__)
#: The headers nginx's site adds (templates/nginx-site.j2), as a client on loopback would get them.
_FORWARDED = (("X-Real-IP", "127.0.0.1"), ("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Proto", "http"))


def _where(exc: BaseException, root: str) -> str:
    """'file:line' of the innermost frame in the app's own code, so the operator knows where to look."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{os.path.relpath(exc.filename, root)}:{exc.lineno}"
    # Never this file: an error raised here is about the app, so name the app's innermost frame, or the
    # innermost library frame the app called (e.g. Django's settings loader), not reloader's.
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) != _SELF]
    own = [f for f in frames if f.filename.startswith(root + os.sep) and "site-packages" not in f.filename]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return ""
    name = os.path.relpath(frame.filename, root) if frame.filename.startswith(root) else frame.filename
    return f"{name}:{frame.lineno}"


def _describe(exc: BaseException, root: str) -> str:
    if isinstance(exc, SyntaxError):
        text = f"SyntaxError: {exc.msg}"
    else:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    where = _where(exc, root)
    text = " ".join(text.split())
    return f"{text} ({where})" if where else text


def load_app(target: str):
    """Import ``module:callable`` the way gunicorn does, calling ``factory()`` targets."""
    module_name, _, obj = target.partition(":")
    module = importlib.import_module(module_name)
    call = obj.endswith("()")
    name = obj[:-2] if call else obj
    if not hasattr(module, name):
        raise AttributeError(f"module {module_name!r} has no attribute {name!r} (wsgi = {target!r})")
    app = getattr(module, name)
    if call:
        app = app()
    if not callable(app):
        raise TypeError(f"{target} is not a WSGI/ASGI callable (got {type(app).__name__})")
    return app


def watch_request_exceptions() -> list[BaseException]:
    """Frameworks answer 500 for an exception in a view and, in production settings, log nothing: listen to
    their own signal (Django's and Flask's ``got_request_exception``) so the refusal can name the exception
    and its line instead of only "answered 500". Frameworks the app did not import are left alone."""
    caught: list[BaseException] = []
    if "django" in sys.modules:
        try:
            from django.core.signals import got_request_exception

            def on_django(sender, request=None, **kwargs):
                if sys.exc_info()[1] is not None:
                    caught.append(sys.exc_info()[1])

            got_request_exception.connect(on_django, weak=False)
        except Exception:  # noqa: BLE001 - an unusual Django: go without
            pass
    if "flask" in sys.modules:
        try:
            from flask import got_request_exception as flask_signal

            def on_flask(sender, exception=None, **kwargs):
                if exception is not None:
                    caught.append(exception)

            flask_signal.connect(on_flask, weak=False)
        except Exception:  # noqa: BLE001
            pass
    return caught


def request(app, path: str, host: str = "localhost") -> str:
    """One GET through the WSGI interface; returns the status line."""
    path_info, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": host, "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host, "HTTP_USER_AGENT": "reloader-preflight",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "REMOTE_ADDR": "127.0.0.1",
    }
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in _FORWARDED})
    status: list[str] = []

    def start_response(s, headers, exc_info=None):
        status[:] = [s]
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
    return status[0] if status else "no status"


def _looks_asgi(app) -> bool:
    """An async callable (or an object with an async __call__): served as WSGI it can only fail."""
    import inspect

    return app is not None and (inspect.iscoroutinefunction(app)
                                or inspect.iscoroutinefunction(type(app).__call__))


class LifespanFailed(Exception):
    """The app reported ``lifespan.startup.failed`` (and raised nothing we could point at)."""


async def _asgi_request(app, path: str, host: str, timeout: float) -> str:
    """Lifespan startup, one GET through the ASGI interface, lifespan shutdown; returns the status line.

    Like the ASGI servers' "auto" lifespan mode: an app that raises on the lifespan scope before sending
    anything does not support it and is requested without; one that reports startup failed is refused.
    """
    state: dict = {}
    to_app: asyncio.Queue = asyncio.Queue()
    from_app: asyncio.Queue = asyncio.Queue()

    async def lifespan_send(message):
        await from_app.put(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    await to_app.put({"type": "lifespan.startup"})
    task = asyncio.ensure_future(app(scope, to_app.get, lifespan_send))
    reply = asyncio.ensure_future(from_app.get())
    await asyncio.wait({task, reply}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    lifespan = True
    if reply.done():
        message = reply.result()
        if message.get("type") == "lifespan.startup.failed":
            # Starlette/FastAPI send "failed" and then re-raise the exception: prefer it, it has the line.
            await asyncio.wait({task}, timeout=5)
            if task.done() and task.exception() is not None:
                raise task.exception()
            raise LifespanFailed(f"lifespan startup failed: {message.get('message') or 'no message'}")
    else:
        reply.cancel()
        if not task.done():
            raise TimeoutError(f"lifespan startup did not complete within {timeout:g} s")
        lifespan = False  # returned or raised without a word: no lifespan support
        task.exception() if not task.cancelled() else None  # retrieve, so asyncio does not warn

    raw_path, _, query = path.partition("?")
    headers = [(b"host", host.encode()), (b"user-agent", b"reloader-preflight")]
    headers += [(k.lower().encode(), v.encode()) for k, v in _FORWARDED]
    http = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(),
        "query_string": query.encode(), "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 0), "server": (host, 80), "state": dict(state),
    }
    status: list[int] = []
    done = asyncio.Event()
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status[:] = [int(message["status"])]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await asyncio.wait_for(app(http, receive, send), timeout)
    if lifespan and not task.done():
        await to_app.put({"type": "lifespan.shutdown"})
        await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
    if not status:
        return "no status"
    code = status[0]
    try:
        from http import HTTPStatus

        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preflight.py")
    parser.add_argument("target", help="module:callable, as gunicorn's wsgi_app")
    parser.add_argument("health_path")
    parser.add_argument("--host", default="localhost", help="the Host header (the site's first server_name)")
    parser.add_argument("--asgi", action="store_true", help="call the app as ASGI, with lifespan")
    parser.add_argument("--ok", default="200-399", help="statuses that pass, LOW-HIGH (inclusive)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds for the lifespan steps")
    parser.add_argument("--import-only", action="store_true", help="import (and create) the app, request "
                        "nothing: before setup commands, whose migrations the health path may need")
    args = parser.parse_args(argv[1:])
    low, _, high = args.ok.partition("-")
    root = os.getcwd()
    # Run as a file, sys.path[0] is reloader's own directory: replace it, or an app module named like
    # one of ours ("config") would import the wrong file. Like gunicorn's chdir, the app dir comes first.
    sys.path[0] = root
    # Keep the app's own output off stdout, which carries our one JSON line.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        app = load_app(args.target)
        caught = watch_request_exceptions()
        if args.import_only:
            status = "imported"
        elif args.asgi:
            status = asyncio.run(_asgi_request(app, args.health_path, args.host, args.timeout))
        else:
            status = request(app, args.health_path, args.host)
        code = int(status.split()[0]) if status[:3].isdigit() else 0
        if args.import_only:
            result = {"ok": True, "status": status}
        elif not int(low) <= code <= int(high or low):
            answered = f"{args.health_path} answered {status} (Host: {args.host}; passing: {args.ok})"
            if caught:
                answered = f"{_describe(caught[-1], root)}; {answered}"
            result = {"ok": False, "error": answered, "status": status}
        else:
            result = {"ok": True, "status": status}
    except BaseException as e:  # noqa: BLE001 - anything the release raises is a refusal
        if isinstance(e, KeyboardInterrupt):
            raise
        result = {"ok": False, "error": _describe(e, root)}
        if not args.asgi and isinstance(e, TypeError) and _looks_asgi(locals().get("app")):
            result["error"] += ("; this is an ASGI app: set [gunicorn] worker_class = \"asgi\" or "
                                "\"uvicorn_worker.UvicornWorker\"")
    sys.stdout = real_stdout
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
