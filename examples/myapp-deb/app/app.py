"""myapp: the smallest app shipped as its own .deb and rolled out by reloader. Its VERSION file is written
at build time from debian/changelog, so each package version is visible over HTTP."""

import os
import time
from pathlib import Path

from flask import Flask, jsonify, request

VERSION = (Path(__file__).resolve().parent / "VERSION").read_text().strip()
app = Flask(__name__)


@app.get("/")
def index():
    return jsonify(version=VERSION, pid=os.getpid())


@app.get("/health")
def health():
    return jsonify(status="ok", version=VERSION)


@app.get("/slow")
def slow():
    seconds = min(float(request.args.get("s", "2")), 60.0)
    time.sleep(seconds)
    return jsonify(version=VERSION, slept=seconds)
