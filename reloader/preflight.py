"""Pre-flight a release: import the WSGI app and make one in-process request to its health path.

This file runs as a *script* under the app's own interpreter (its virtualenv), as the unit's user, in the
release's working directory, with the unit's environment; so it must use nothing but the standard library
and nothing from reloader. It prints one JSON object on stdout and exits 0 when the release may go live:
``{"ok": true, "status": "200 OK"}`` or ``{"ok": false, "error": "ModuleNotFoundError: ... (app.py:3)"}``.
The caller bounds it with a timeout, so a hanging import is refused rather than waited for.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import traceback


def _where(exc: BaseException, root: str) -> str:
    """'file:line' of the innermost frame in the app's own code, so the operator knows where to look."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{os.path.relpath(exc.filename, root)}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
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
        raise TypeError(f"{target} is not a WSGI callable (got {type(app).__name__})")
    return app


def request(app, path: str) -> str:
    """One GET through the WSGI interface; returns the status line."""
    path_info, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost", "HTTP_USER_AGENT": "reloader-preflight",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "REMOTE_ADDR": "127.0.0.1",
    }
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


def main(argv: list[str]) -> int:
    target, health_path = argv[1], argv[2]
    root = os.getcwd()
    # Run as a file, sys.path[0] is reloader's own directory: replace it, or an app module named like
    # one of ours ("config") would import the wrong file. Like gunicorn's chdir, the app dir comes first.
    sys.path[0] = root
    # Keep the app's own output off stdout, which carries our one JSON line.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        app = load_app(target)
        status = request(app, health_path)
        code = int(status.split()[0]) if status[:3].isdigit() else 0
        if code >= 500 or code == 0:
            result = {"ok": False, "error": f"{health_path} answered {status}", "status": status}
        else:
            result = {"ok": True, "status": status}
    except BaseException as e:  # noqa: BLE001 - anything the release raises is a refusal
        if isinstance(e, KeyboardInterrupt):
            raise
        result = {"ok": False, "error": _describe(e, root)}
    sys.stdout = real_stdout
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
