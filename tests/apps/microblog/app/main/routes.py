from flask import jsonify, request
from flask_babel import force_locale, gettext

from app import db
from app.main import bp
from app.models import Post
from app.version import VERSION


@bp.route("/")
def index():
    with force_locale("es"):
        greeting = gettext("Hello")
    return jsonify(version=VERSION, greeting=greeting, posts=db.session.query(Post).count())


@bp.route("/health")
def health():
    return VERSION


@bp.route("/post", methods=["POST"])
def post():
    db.session.add(Post(body=request.get_data(as_text=True)[:140]))
    db.session.commit()
    return jsonify(posts=db.session.query(Post).count())
