"""The example app: reports its release so a deploy can be seen, and offers slow requests to prove that
in-flight requests survive a reload."""

import os
import time

from flask import Flask, jsonify, request

RELEASE = os.path.basename(os.path.dirname(os.path.realpath(__file__)))
VERSION = "v1"

# A release can simulate an app that is slow to import (IMPORT_DELAY) without changing code.
time.sleep(float(os.environ.get("IMPORT_DELAY", "0")))

app = Flask(__name__)


@app.get("/")
def index():
    return jsonify(version=VERSION, release=RELEASE, pid=os.getpid())


@app.get("/health")
def health():
    return jsonify(status="ok", version=VERSION)


@app.get("/slow")
def slow():
    seconds = min(float(request.args.get("s", "2")), 120.0)
    time.sleep(seconds)
    return jsonify(version=VERSION, slept=seconds)


@app.after_request
def version_header(response):
    response.headers["X-App-Version"] = VERSION
    return response
