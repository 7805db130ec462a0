"""The application factory, shaped like the Mega-Tutorial's: extensions, a blueprint, file logging."""
import logging
import os
from logging.handlers import RotatingFileHandler

from config import Config
from flask import Flask, request
from flask_babel import Babel
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy


def get_locale():
    return request.accept_languages.best_match(["en", "es"])


db = SQLAlchemy()
migrate = Migrate()
babel = Babel()


def create_app(config_class=Config):
    app = Flask(__name__)
    app.config.from_object(config_class)
    db.init_app(app)
    migrate.init_app(app, db)
    babel.init_app(app, locale_selector=get_locale)

    from app.main import bp as main_bp

    app.register_blueprint(main_bp)

    if not app.debug and not app.testing:
        if app.config["LOG_TO_STDOUT"]:
            handler = logging.StreamHandler()
        else:
            # As the tutorial: a logs/ directory next to the code, unless systemd gave us one.
            logs = os.environ.get("LOGS_DIRECTORY") or "logs"
            if not os.path.exists(logs):
                os.mkdir(logs)
            handler = RotatingFileHandler(os.path.join(logs, "microblog.log"), maxBytes=10240, backupCount=10)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s [in %(pathname)s:%(lineno)d]"))
        handler.setLevel(logging.INFO)
        app.logger.addHandler(handler)
        app.logger.setLevel(logging.INFO)
        app.logger.info("Microblog startup")
    return app


from app import models  # noqa: E402,F401
