# Gunicorn settings for flaskapp, generated from flaskapp-rolling.toml by reloader.
# The hooks below record, per master, which workers have *loaded the app*: the reload helper waits for
# all of them before it hands MAINPID over and retires the old generation.
import os

loglevel = "info"
_USER = {}  # no [gunicorn] config_file: no hooks of yours to chain

wsgi_app = 'app:app'
chdir = '/srv/flaskapp/current'
# The listening socket comes from flaskapp.socket (LISTEN_FDS); this bind is only a fallback.
bind = ['unix:/run/flaskapp.sock']
workers = 2
worker_class = 'sync'
threads = 1
timeout = 30
graceful_timeout = 30
preload_app = False
pidfile = '/run/flaskapp/gunicorn.pid'
# Control via signals and systemd only; the default control socket would go to $HOME.
control_socket_disable = True
# The error log goes to stderr, the journal. The access log is off by default (access_log = false): nginx
# logs every request already, and one journal line per request costs throughput (docs/steady-state.md).
accesslog = None
errorlog = "-"

# Instances (NAME@INSTANCE.service) each have their own runtime directory.
_READY_DIR = os.environ.get("RELOADER_READY_DIR", '/run/flaskapp/ready')
_PYTHON = '/srv/flaskapp/venv/bin/python3'


def _user_hook(name, *args):
    """Your own hook of that name (from config_file), run before reloader's."""
    hook = _USER.get(name)
    if callable(hook):
        hook(*args)


def _mark(master_pid, name, text="", mode=0o644):
    directory = os.path.join(_READY_DIR, str(master_pid))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = f"{path}.{os.getpid()}.tmp"  # two processes may write one marker (heir-of: see _detach)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pre_exec(server):
    """Runs in the forked child just before USR2 re-execs the new master.

    gunicorn re-execs sys.executable, which is already resolved into the *old* virtualenv; exec the
    virtualenv the reload resolved (or the configured path), so a virtualenv switched by symlink is used.
    With systemd's sockets, gunicorn passes LISTEN_FDS=n but its listeners are dup()ed close-on-exec
    copies, not fds 3..3+n-1: put them where sd_listen_fds() looks, inheritable."""
    _user_hook("pre_exec", server)
    python = _PYTHON
    # systemd accepts notifications from the main PID and the helper only: the new master's "READY=1" at
    # boot would be refused with a warning in the journal on every reload. The helper sends READY=1 once
    # it has handed MAINPID over; the new master has nothing to say to systemd after that.
    server.cfg.env_orig = {k: v for k, v in server.cfg.env_orig.items() if k != "NOTIFY_SOCKET"}
    if os.path.exists(python):
        server.START_CTX[0] = python
        server.START_CTX["args"][0] = python
    if not getattr(server, "systemd", False):
        return
    import fcntl

    # Copy every listener above the target range first (a plain dup() may return 3 itself, and closing
    # that copy would close the socket), then place them at 3.. inheritable.
    first_free = 3 + len(server.LISTENERS)
    high = [fcntl.fcntl(lnr.fileno(), fcntl.F_DUPFD_CLOEXEC, first_free) for lnr in server.LISTENERS]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)


def when_ready(server):
    """The master is listening: record it so the helper can tell a live master from a booting one."""
    _user_hook("when_ready", server)
    _mark(server.pid, "master", str(server.pid))
    # A master re-exec'd by USR2 runs as "python3"; keep the name `ps -C gunicorn` and operators expect.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"gunicorn", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def post_worker_init(worker):
    """The worker has imported the app (not merely forked)."""
    _user_hook("post_worker_init", worker)
    _mark(worker.ppid, f"worker-{worker.pid}", str(worker.pid))


# Request statistics for the bake's comparison of two generations ([analysis]; reloader/traffic.py reads
# them and documents the format): counted in memory by each worker, published at most every 0.5 s (a canary
# being judged: 0.1 s).
import inspect
import json
import math
import time

_STATS = {"requests": 0, "5xx": 0, "latency": {}}
# When each request in this worker started, by id(req): the asgi worker's request objects take no new
# attribute (__slots__), and an async or threaded worker runs several requests at once.
_STARTED = {}
_PUBLISHED = [0.0]
_PUBLISH_EVERY = [0.5]
_STARTED_AT = time.monotonic()  # when this instance's master read this file
_HEALTH = '/health'


def _user_post_request():
    """Your post_request (from config_file) with gunicorn's 4 arguments, whichever 2-4 it takes."""
    hook = _USER.get("post_request")
    if not callable(hook):
        return None
    arity = len(inspect.signature(hook).parameters)
    if arity >= 4:
        return hook
    return lambda worker, req, environ, resp: hook(*(worker, req, environ)[:arity])


_USER_POST_REQUEST = _user_post_request()


def pre_request(worker, req):
    _user_hook("pre_request", worker, req)
    if len(_STARTED) > 4096:  # requests whose post_request never ran (the app raised past gunicorn)
        _STARTED.clear()
    _STARTED[id(req)] = time.monotonic()


def post_request(worker, req, environ, resp):
    if _USER_POST_REQUEST:
        _USER_POST_REQUEST(worker, req, environ, resp)
    started = _STARTED.pop(id(req), 0.0)
    if not started or req.path == _HEALTH:
        return
    # WSGI: resp.status_code, None when the app raised before answering (gunicorn sends a 500); the asgi
    # worker: resp.status, and no resp at all without its access log (then no status is known).
    status = resp.status_code if hasattr(resp, "status_code") else getattr(resp, "status", 0)
    now, stats = time.monotonic(), _STATS
    stats["requests"] += 1
    stats["5xx"] += status is None or str(status)[:1] == "5"
    bucket = int(math.log2(1 + (now - started) * 1e6) * 4)
    stats["latency"][bucket] = stats["latency"].get(bucket, 0) + 1
    if now - _PUBLISHED[0] >= _PUBLISH_EVERY[0]:
        _PUBLISHED[0] = now
        _mark(worker.ppid, f"stats-{worker.pid}", json.dumps(stats))
        # An instance a deploy started is judged while it is young (booting, then the bake): every 0.05 s
        # then (reloader.traffic.FLEET_LOOK_SECONDS).
        _PUBLISH_EVERY[0] = 0.05 if now - _STARTED_AT < 160.0 else 0.5


def child_exit(server, worker):
    """Runs in the master when a worker died: a new generation that loses workers fails its bake."""
    _user_hook("child_exit", server, worker)
    _mark(server.pid, f"exit-{worker.pid}", str(worker.pid))
    for name in (f"worker-{worker.pid}", f"stats-{worker.pid}"):
        try:
            os.unlink(os.path.join(_READY_DIR, str(server.pid), name))
        except OSError:
            pass


def on_exit(server):
    _user_hook("on_exit", server)
    import shutil

    shutil.rmtree(os.path.join(_READY_DIR, str(server.pid)), ignore_errors=True)
