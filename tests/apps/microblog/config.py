import os

basedir = os.path.abspath(os.path.dirname(__file__))


class Config:
    SECRET_KEY = os.environ.get("SECRET_KEY") or "you-will-never-guess"
    # The tutorial's default keeps app.db next to the code: in a release, that is per release (and
    # read-only under reloader); DATABASE_URL points it at the state directory instead.
    SQLALCHEMY_DATABASE_URI = os.environ.get("DATABASE_URL") or "sqlite:///" + os.path.join(basedir, "app.db")
    LOG_TO_STDOUT = os.environ.get("LOG_TO_STDOUT")
    LANGUAGES = ["en", "es"]
