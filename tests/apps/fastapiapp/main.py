"""A FastAPI app with a lifespan handler: it opens its "database" (a SQLite file in $STATE_DIRECTORY)
at startup and closes it at shutdown, like real apps do with a connection pool."""

import contextlib
import os
import sqlite3

from fastapi import FastAPI, Request

VERSION = "v1"
DB = os.path.join(os.environ.get("STATE_DIRECTORY", "/tmp"), "notes.db")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    conn = sqlite3.connect(DB, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    app.state.db = conn
    yield
    conn.close()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index(request: Request):
    return {"version": VERSION, "host": request.headers.get("host")}


@app.get("/health")
async def health(request: Request):
    request.app.state.db.execute("SELECT 1")
    return {"ok": True, "version": VERSION}


@app.post("/notes")
async def add_note(request: Request):
    text = (await request.body()).decode() or "note"
    cur = request.app.state.db.execute("INSERT INTO notes (text) VALUES (?)", (text,))
    return {"id": cur.lastrowid, "version": VERSION}
