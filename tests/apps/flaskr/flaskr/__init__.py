"""A Flask app factory in the shape of Flask's tutorial app: SQLite in the instance path, an init-db command.

The database lives in systemd's StateDirectory= ($STATE_DIRECTORY), the one place the sandbox lets the
app write; `flask --app flaskr init-db` is its [setup] command."""

import os

from flask import Flask, jsonify, request

from . import db

VERSION = "v1"


def create_app():
    app = Flask(__name__)
    app.config["DATABASE"] = os.path.join(os.environ.get("STATE_DIRECTORY", app.instance_path), "flaskr.sqlite")
    db.init_app(app)

    @app.get("/")
    def index():
        return jsonify(version=VERSION, posts=db.get_db().execute("SELECT COUNT(*) FROM post").fetchone()[0])

    @app.get("/health")
    def health():
        db.get_db().execute("SELECT 1")
        return jsonify(ok=True, version=VERSION)

    @app.post("/posts")
    def add_post():
        conn = db.get_db()
        cur = conn.execute("INSERT INTO post (body) VALUES (?)", (request.get_data(as_text=True) or "post",))
        conn.commit()
        return jsonify(id=cur.lastrowid, version=VERSION)

    return app
