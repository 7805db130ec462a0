"""HTTP probing: one GET to an app's socket or to its nginx site, and where that site answers from here.

The reload engines' health checks (reloader.engine), ``reloader verify`` and ``reloader install``'s
final check all ask the same question, "what does this path answer?", through this module. Like the
load generator that builds on its connection class, it uses nothing but the standard library (no
reloader module, no third-party package), so ``python3 -m reloader.loadgen`` keeps running with only
Debian's ``python3``.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse
from typing import Any


class CountingSocket(socket.socket):
    """A socket that counts received bytes.

    Why: a keep-alive failure may only be treated as "transparently retryable" when it happened *before
    any response byte* arrived.  ``http.client`` reads through ``makefile()``, which calls ``recv_into``,
    so counting there tells us exactly whether the server said anything at all.
    """

    bytes_received: int = 0

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        self.bytes_received += n
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.bytes_received += len(data)
        return data


class UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` over a unix stream socket (e.g. gunicorn's ``--bind unix:...``)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = CountingSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def get_status(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """One GET on *conn*, which it closes: ``(HTTP status, "")``, or ``(0, why there was no answer)``."""
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, ""
    except (OSError, http.client.HTTPException) as e:
        return 0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def url_status(url: str, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """:func:`get_status` of an ``http://host:port/path`` URL over TCP."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return get_status(conn, path, headers)


def target_of(listen: str, server_names: tuple[str, ...]) -> tuple[str, str | None]:
    """``(host:port, Host header or None)`` for nginx ``listen`` entry *listen* as seen from this host."""
    if listen.startswith("["):
        addr, _, port = listen[1:].partition("]:")
        host_port = f"[::1]:{port}" if addr in ("::", "0:0:0:0:0:0:0:0") else f"[{addr}]:{port}"
    elif ":" in listen:
        addr, _, port = listen.rpartition(":")
        host_port = f"127.0.0.1:{port}" if addr == "0.0.0.0" else f"{addr}:{port}"
    else:
        host_port = f"127.0.0.1:{listen}"
    name = server_names[0] if server_names else "_"
    if name == "_" or not name:
        return host_port, None
    if name.startswith("*."):
        name = "verify" + name[1:]
    if name.endswith(".*"):
        name = name[:-2] + ".invalid"
    return host_port, name
