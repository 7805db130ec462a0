"""Apps of tests/apps/ (Django, FastAPI, a Flask app factory) released and installed in a test-bed container.

``RealApp`` is :class:`appbed.App` for an app whose source tree lives in ``/src/tests/apps/DIR``: each
release is a copy of that tree under ``/srv/NAME/releases/N`` with ``VERSION = "vN"`` in one file, plus
optional replaced files; ``current`` points at the live release.
"""

from __future__ import annotations

import json
import shlex
import subprocess

from appbed import App, Reply, install_wrapper


class RealApp(App):
    def __init__(self, container, name: str, host: str, source: str, version_file: str) -> None:
        super().__init__(container, name)
        self.host, self.source, self.version_file = host, f"/src/tests/apps/{source}", version_file

    def install_config(self, config: str, *flags: str) -> subprocess.CompletedProcess:
        install_wrapper(self.c)
        return self.c.run(["reloader", "install", config, *flags], check=False, timeout=300)

    def config(self, base: str, path: str = "", **replace: str) -> str:
        """Write tests/apps/BASE.toml with lines replaced ("key = ..." → *replace[key]*); returns its path."""
        lines = self.c.read_file(f"/src/tests/apps/{base}.toml").splitlines()
        out = [next((f"{k} = {v}" for k, v in replace.items() if line.split("=")[0].strip() == k), line)
               for line in lines]
        path = path or f"/root/{base}.toml"
        self.c.write_file(path, "\n".join(out) + "\n")
        return path

    def ship(self, version: str | None = None, *, files: dict[str, str] | None = None, **_: object) -> int:
        self.release += 1
        n = self.release
        version = version or f"v{n}"
        d = f"/srv/{self.name}/releases/{n}"
        self.c.run(f"mkdir -p {d} && cp -R {self.source}/. {d}/ && "
                   f"sed -i 's/^VERSION = \"v1\"/VERSION = \"{version}\"/' {d}/{self.version_file}")
        for name, text in (files or {}).items():
            self.c.write_file(f"{d}/{name}", text)
        self.c.run(f"ln -sfn {d} /srv/{self.name}/current.new && mv -T /srv/{self.name}/current.new "
                   f"/srv/{self.name}/current")
        return n

    def read(self, path: str) -> str:
        """A file of the app's pristine source (to derive a broken release from)."""
        return self.c.read_file(f"{self.source}/{path}")

    def get(self, path: str = "/", timeout: float = 10, *, method: str = "GET", data: str | None = None,
            cookies: str = "") -> Reply:
        extra = f"-X {method} " + (f"--data-raw {shlex.quote(data)} " if data is not None else "")
        if cookies:
            extra += f"-b {cookies} -c {cookies} "
        r = self.c.run(f"curl -s -m {timeout} {extra}-H 'Host: {self.host}' -w '\\n%{{http_code}}' "
                       f"http://127.0.0.1{path}", check=False, timeout=timeout + 10)
        body, _, code = r.stdout.rpartition("\n")
        return Reply(int(code or 0), body)

    def start_load(self, *, concurrency: int = 4, out: str = "/run/loadgen.json",  # type: ignore[override]
                   stop: str = "/run/loadgen.stop", **_: object) -> subprocess.Popen:
        self.c.run(["rm", "-f", out, stop])
        cmd = ("cd /src && exec python3 -m reloader.loadgen http://127.0.0.1/health "
               f"--concurrency {concurrency} -H 'Host: {self.host}' --until-file {stop} --out {out} "
               "--max-duration 900")
        return self.c.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def status_text(self) -> str:
        return self.systemctl("status", self.service_name(), "--no-pager", "-l").stdout

    def service_name(self) -> str:
        return f"{self.name}.service"

    def json(self, path: str = "/", **kw: object) -> dict:
        reply = self.get(path, **kw)  # type: ignore[arg-type]
        assert reply.status == 200, (path, reply)
        return json.loads(reply.body)
