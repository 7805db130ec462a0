"""``reloader init [DIR]``: read an existing app's checkout and write a commented TOML to start from.

It looks for what an operator would: a Django project (``manage.py``, the settings module, ``wsgi.py`` /
``asgi.py``, ``STATIC_ROOT``), a Flask app or app factory (Flask-Migrate and Flask-Babel too), or a FastAPI
app; the virtualenv and the requirements file. The TOML it writes uses the release layout reloader
deploys (``/srv/NAME/releases/N``, ``current`` → the live one), keeps writable data under
``state_directory`` (a per-release directory would start every release with an empty database), and
suggests the build steps (writing into the release) and setup steps (migrations, in the sandbox). The
file is validated before it is written, and an existing file is never overwritten.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, parse

_NAME = re.compile(r"[^a-z0-9-]+")
_SKIP = {"venv", ".venv", "env", "node_modules", ".git", "__pycache__", "tests", "migrations", "site-packages"}


@dataclass
class Found:
    """What :func:`detect` learned about the checkout; each note explains one guess in the TOML."""

    framework: str = ""
    wsgi: str = ""
    worker_class: str = ""
    build: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    static: dict[str, str] = field(default_factory=dict)
    requirements: str = ""
    virtualenv: str = ""
    notes: list[str] = field(default_factory=list)


def _python_files(root: Path, depth: int = 2) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and not d.startswith("."))
        if len(rel.parts) >= depth:
            dirnames[:] = []
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _module(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def detect(root: Path) -> Found:
    found = Found()
    requirements = next((n for n in ("requirements.txt", "requirements/production.txt", "requirements/prod.txt")
                         if (root / n).is_file()), "")
    found.requirements = requirements
    reqs = _read(root / requirements).lower() if requirements else ""
    for venv in ("venv", ".venv", "env"):
        if (root / venv / "bin" / "python3").exists() or (root / venv / "pyvenv.cfg").exists():
            found.virtualenv = venv
    files = _python_files(root)
    sources = {p: _read(p) for p in files}
    everything = "\n".join(sources.values())

    manage = root / "manage.py"
    if manage.is_file():
        _django(root, found, _read(manage))
    else:
        for path, text in sources.items():
            if re.search(r"^\s*\w+\s*=\s*FastAPI\(", text, re.M):
                var = re.search(r"^\s*(\w+)\s*=\s*FastAPI\(", text, re.M).group(1)  # type: ignore[union-attr]
                found.framework, found.wsgi = "FastAPI", f"{_module(root, path)}:{var}"
                found.worker_class = "uvicorn_worker.UvicornWorker" if "uvicorn-worker" in reqs or \
                    "uvicorn_worker" in reqs else "asgi"
                break
        if not found.framework:
            _flask(root, found, sources)
    if "flask_migrate" in everything or "flask-migrate" in reqs:
        found.setup.append("flask db upgrade")
        found.notes.append("Flask-Migrate found: `flask db upgrade` runs before each release goes live")
    if "flask_babel" in everything or "flask-babel" in reqs:
        translations = next((str(p.relative_to(root)) for p in sorted(root.glob("**/translations"))
                             if p.is_dir() and not set(p.relative_to(root).parts) & _SKIP), "")
        if translations:
            found.build.append(f"pybabel compile -d {translations}")
            found.notes.append(f"Flask-Babel found: the .mo files of {translations} are compiled into the "
                               "release at build time (the release is read-only once deployed)")
    if "LOG_TO_STDOUT" in everything:
        found.environment["LOG_TO_STDOUT"] = "1"
        found.notes.append("the app reads LOG_TO_STDOUT: its logs go to the journal, not to files next to its code")
    if re.search(r"sqlite:///", everything) or "DATABASE_URL" in everything:
        found.environment["DATABASE_URL"] = "sqlite:////var/lib/{name}/app.db"
        found.notes.append("SQLite (or DATABASE_URL) found: the database lives under state_directory, shared by "
                           "every release")
    return found


def _django(root: Path, found: Found, manage: str) -> None:
    found.framework = "Django"
    m = re.search(r"DJANGO_SETTINGS_MODULE['\"]\s*,\s*['\"]([\w.]+)['\"]", manage)
    settings = m.group(1) if m else ""
    package = settings.rsplit(".", 1)[0] if settings else ""
    if package and (root / package.replace(".", "/") / "wsgi.py").is_file():
        found.wsgi = f"{package}.wsgi:application"
    if package and (root / package.replace(".", "/") / "asgi.py").is_file():
        found.notes.append(f"{package}/asgi.py exists: for ASGI use wsgi = \"{package}.asgi:application\" and "
                           "worker_class = \"uvicorn_worker.UvicornWorker\"")
    if not found.wsgi and package:
        found.wsgi = f"{package}.wsgi:application"
    found.setup.append("python manage.py migrate --noinput")
    text = _read(root / (settings.replace(".", "/") + ".py")) if settings else ""
    static_root = re.search(r"^STATIC_ROOT\s*=\s*(.+)$", text, re.M)
    static_url = re.search(r"^STATIC_URL\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    if static_root:
        found.build.append("python manage.py collectstatic --noinput")
        expr = static_root.group(1)
        parts = re.findall(r"['\"]([\w./-]+)['\"]", expr)
        url = "/" + (static_url.group(1) if static_url else "static/").strip("/") + "/"
        if "BASE_DIR" in expr and "environ" not in expr and parts:
            found.static[url] = "/".join(p.strip("/") for p in parts)
            found.notes.append(f"STATIC_ROOT found: collectstatic runs at build time; nginx serves {url}")
        else:
            found.notes.append(f"STATIC_ROOT is {expr.strip()}: collectstatic runs at build time; set [nginx] "
                               f"static = {{ \"{url}\" = \"DIR/\" }} to where it collects")
    else:
        found.notes.append("no STATIC_ROOT in the settings: set one (e.g. BASE_DIR / 'staticfiles') to have "
                           "nginx serve the static files")
    if settings:
        found.environment["DJANGO_SETTINGS_MODULE"] = settings


def _flask(root: Path, found: Found, sources: dict[Path, str]) -> None:
    # A module-level app first (microblog.py: app = create_app()), then a package with a factory.
    for path, text in sources.items():
        m = re.search(r"^(\w+)\s*=\s*(Flask\(|create_app\()", text, re.M)
        if m and len(path.relative_to(root).parts) == 1:
            found.framework, found.wsgi = "Flask", f"{_module(root, path)}:{m.group(1)}"
            found.environment["FLASK_APP"] = path.name
            return
    for path, text in sources.items():
        if re.search(r"^def create_app\(", text, re.M):
            found.framework, found.wsgi = "Flask (app factory)", f"{_module(root, path)}:create_app()"
            found.environment["FLASK_APP"] = _module(root, path)
            return
    for path, text in sources.items():
        m = re.search(r"^(\w+)\s*=\s*Flask\(", text, re.M)
        if m:
            found.framework, found.wsgi = "Flask", f"{_module(root, path)}:{m.group(1)}"
            found.environment["FLASK_APP"] = _module(root, path)
            return


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(root: Path, name: str) -> str:
    """The commented TOML for the checkout at *root*."""
    f = detect(root)
    if not f.wsgi:
        raise ConfigError(f"init: {root}: found no Django project (manage.py), Flask app or factory, or FastAPI "
                          "app; write the config by hand (see examples/flaskapp.toml)")
    srv = f"/srv/{name}"
    env = {k: v.replace("{name}", name) for k, v in f.environment.items()}
    lines = [f"# {name}: generated by `reloader init {root}` — {f.framework} app, wsgi {f.wsgi}.",
             "# Review it, then: reloader check THIS.toml; reloader install THIS.toml --from " + str(root),
             "# and for every new version: reloader deploy " + name + " --from " + str(root) + "  (or a git ref)",
             *[f"# - {note}" for note in f.notes], "",
             "[app]", f"name = {_q(name)}",
             "# Releases are built in /srv/NAME/releases/N; `current` points at the one to run.",
             f"working_directory = {_q(srv + '/current')}"]
    if f.requirements:
        lines += ["# Each release gets its own virtualenv, built from " + f.requirements + " ([build] requirements).",
                  f"virtualenv = {_q(srv + '/current/venv')}"]
    elif f.virtualenv:
        lines += [f"# The checkout has {f.virtualenv}/: make a virtualenv outside the releases for the server.",
                  f"virtualenv = {_q(srv + '/venv')}"]
    else:
        lines += ["# No requirements file found: create this virtualenv (with gunicorn and the app's packages).",
                  f"virtualenv = {_q(srv + '/venv')}"]
    lines += [f"wsgi = {_q(f.wsgi)}", "health_path = \"/\"",
              "# Writable data lives outside the releases (each release is read-only and replaced): systemd",
              f"# creates /var/lib/{name} for the app's user. Point the database (and uploads) there.",
              f"state_directory = {_q(name)}",
              "environment = { " + ", ".join(f"{k} = {_q(v)}" for k, v in sorted(env.items())) + " }", ""]
    if f.worker_class:
        lines += ["[gunicorn]", f"worker_class = {_q(f.worker_class)}", ""]
    lines += ["[reload]", f"releases_root = {_q(srv + '/releases')}", "keep_releases = 5", ""]
    lines += ["# Build: run by `--from` in the new release, as the app's user, with the release writable",
              "# (compiled translations, collected static files, front-end bundles).", "[build]"]
    if f.requirements:
        lines.append(f"requirements = {_q(f.requirements)}")
    lines += ["commands = [" + ", ".join(_q(c) for c in f.build) + "]", "",
              "# Setup: run before each release goes live, in the service's sandbox (migrations).", "[setup]",
              "commands = [" + ", ".join(_q(c) for c in f.setup) + "]", ""]
    lines += ["[nginx]", "server_name = [\"_\"]  # your host names"]
    if f.static:
        lines.append("static = { " + ", ".join(f"{_q(url)} = {_q(srv + '/current/' + d + '/')}"
                                               for url, d in f.static.items()) + " }")
    lines += ["", "# After a deploy, a refusal or a rollback (the facts arrive as RELOADER_* variables).", "[hooks]",
              "after_deploy = []", "after_refusal = []", "after_rollback = []", ""]
    text = "\n".join(lines)
    import tomllib

    parse(tomllib.loads(text), source=f"{name}.toml")  # what init writes must load
    return text


def app_name(root: Path) -> str:
    name = _NAME.sub("-", root.resolve().name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "app-" + name if name else "app"
    return name[:32]


def init(directory: str, output: str = "", name: str = "") -> str:
    """Write the TOML for the checkout in *directory*; returns its path. Never overwrites."""
    root = Path(directory or ".")
    if not root.is_dir():
        raise ConfigError(f"init: {directory}: not a directory")
    name = name or app_name(root)
    text = render(root, name)
    path = Path(output or f"{name}.toml")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"init: {path} exists; not overwriting it (move it away or pass -o FILE)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return str(path)
