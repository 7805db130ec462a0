"""`reloader init` (host tests) on the apps of tests/apps: what it detects, that what it writes loads, and
that it never overwrites."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from reloader import commands, init
from reloader.config import ConfigError, parse

APPS = Path(__file__).resolve().parent / "apps"


def generated(tmp_path: Path, app: str, name: str = "") -> dict:
    path = init.init(str(APPS / app), str(tmp_path / f"{app}.toml"), name)
    text = Path(path).read_text()
    parse(tomllib.loads(text))  # what init writes loads as a config
    return tomllib.loads(text)


def test_a_microblog_shaped_flask_app(tmp_path: Path) -> None:
    data = generated(tmp_path, "microblog")
    app = data["app"]
    assert (app["name"], app["wsgi"]) == ("microblog", "microblog:app")
    assert app["working_directory"] == "/srv/microblog/current" and app["virtualenv"] == "/srv/microblog/current/venv"
    assert app["state_directory"] == "microblog"
    assert app["environment"] == {"DATABASE_URL": "sqlite:////var/lib/microblog/app.db", "FLASK_APP": "microblog.py",
                                  "LOG_TO_STDOUT": "1"}
    assert data["build"] == {"requirements": "requirements.txt", "commands": ["pybabel compile -d app/translations"]}
    assert data["setup"] == {"commands": ["flask db upgrade"]}
    assert data["reload"]["releases_root"] == "/srv/microblog/releases"


def test_a_flask_factory_a_django_project_and_a_fastapi_app(tmp_path: Path) -> None:
    flaskr = generated(tmp_path, "flaskr")
    assert flaskr["app"]["wsgi"] == "flaskr:create_app()" and flaskr["app"]["environment"]["FLASK_APP"] == "flaskr"
    django = generated(tmp_path, "djangoapp")
    assert django["app"]["wsgi"] == "mysite.wsgi:application"
    assert django["app"]["environment"]["DJANGO_SETTINGS_MODULE"] == "mysite.settings"
    assert django["setup"]["commands"] == ["python manage.py migrate --noinput"]
    assert django["build"]["commands"] == ["python manage.py collectstatic --noinput"]
    text = (tmp_path / "djangoapp.toml").read_text()
    assert "mysite/asgi.py exists" in text and "STATIC_ROOT" in text
    fastapi = generated(tmp_path, "fastapiapp", "api")
    assert (fastapi["app"]["name"], fastapi["app"]["wsgi"]) == ("api", "main:app")
    assert fastapi["gunicorn"]["worker_class"] == "asgi"


def test_a_django_static_root_in_the_release_is_served_by_nginx(tmp_path: Path) -> None:
    project = tmp_path / "shop"
    (project / "shop").mkdir(parents=True)
    (project / "manage.py").write_text("os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'shop.settings')\n")
    (project / "shop" / "wsgi.py").write_text("application = None\n")
    (project / "shop" / "settings.py").write_text("STATIC_URL = 'assets/'\nSTATIC_ROOT = BASE_DIR / 'staticfiles'\n")
    path = init.init(str(project), str(tmp_path / "shop.toml"))
    data = tomllib.loads(Path(path).read_text())
    assert data["nginx"]["static"] == {"/assets/": "/srv/shop/current/staticfiles/"}


def test_init_never_overwrites_and_refuses_what_it_cannot_read(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "microblog.toml"
    args = argparse.Namespace(directory=str(APPS / "microblog"), output=str(out), name="")
    assert commands.cmd_init(args) == 0 and "wrote " in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(ConfigError, match=r"microblog.toml exists; not overwriting it"):
        commands.cmd_init(args)
    assert out.read_text() == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"found no Django project"):
        init.init(str(tmp_path / "empty"), str(tmp_path / "x.toml"))
    assert not (tmp_path / "x.toml").exists()
    with pytest.raises(ConfigError, match="not a directory"):
        init.init(str(tmp_path / "nosuch"), str(tmp_path / "y.toml"))
