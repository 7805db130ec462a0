# Gunicorn settings for flaskapp, generated from flaskapp.toml by reloader.
# The hooks below record, per master, which workers have *loaded the app*: the reload helper waits for
# all of them before it hands MAINPID over and retires the old generation.
import json
import os
import sys

loglevel = "info"
_USER = {}  # no [gunicorn] config_file: no hooks of yours to chain

wsgi_app = 'app:app'
# What this master runs is decided once, here, as a resolved path (see _release): its workers, respawned
# at any time, and every lazy import come from that release, whatever `current` points at later.
_CURRENT = '/srv/flaskapp/current'
_RECORDS = '/var/lib/reloader/flaskapp/releases.json'
_BOOT_REQUEST = '/run/flaskapp/boot-request.json'
# A USR2 new master: the old master that re-exec'd us, which gunicorn names in GUNICORN_PID (set in our
# environment at the exec). We are not its child (pre_exec detaches us), so this, not our parent, says
# which master's generation we are; 0 on a start, a restart, or a HUP after our promotion.
_OLD_MASTER = int(os.environ.get("GUNICORN_PID") or 0)
# The listening socket comes from flaskapp.socket (LISTEN_FDS); this bind is only a fallback.
bind = ['unix:/run/flaskapp.sock']
workers = 4
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


def _boot_request(*masters):
    """The release and environment a reload's helper resolved for this master: written for the master it
    signals, i.e. the one that re-exec'd us (we are the USR2 new master) or ourselves (HUP); or for one
    of *masters*."""
    try:
        with open(_BOOT_REQUEST) as f:
            request = json.load(f)
    except (OSError, ValueError):
        return None
    return request if request.get("master") in (masters or (os.getpid(), _OLD_MASTER)) else None


def _release():
    """A reload's resolved release; else (start, restart, crash restart, reboot) the live release that
    reloader recorded; else, on the very first start, what `current` resolves to."""
    request = _boot_request()
    if request:
        if request.get("master") == os.getpid():  # HUP: this master's workers get the new environment
            env = dict(request["environ"])
            env.update({k: os.environ[k] for k in request["keep"] if k in os.environ})
            os.environ.clear()
            os.environ.update(env)
        return request["release"]
    current = os.path.realpath(_CURRENT)
    try:
        with open(_RECORDS) as f:
            records = json.load(f)
        live = records["live"]["release"]
    except (OSError, ValueError, KeyError, TypeError):
        return current
    if not os.path.isdir(live):
        print(f"reloader: flaskapp: the live release {live} is gone; booting {current}", file=sys.stderr)
        return current
    if live != current:
        why = records.get("refused", {}).get(current, {}).get("reason")
        print(f"reloader: flaskapp: booting the live release {os.path.basename(live)}; current -> "
              f"{os.path.basename(current)} " + (f"was refused: {why}" if why else "is not deployed")
              + " (run `systemctl reload flaskapp` to deploy it)", file=sys.stderr, flush=True)
    return live


def _run_live_virtualenv():
    """On a fresh start (not a HUP: this process evaluates this file for the first time), when the live
    release was proven with another virtualenv than the one systemd started (its symlink was switched to
    one a reload refused), re-exec gunicorn from the live one: same PID, sockets and arguments."""
    fresh = os.environ.get("RELOADER_MASTER") != str(os.getpid())
    os.environ["RELOADER_MASTER"] = str(os.getpid())
    if not fresh or _boot_request():
        return
    try:
        with open(_RECORDS) as f:
            venv = json.load(f)["live"]["virtualenv"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    python, script = os.path.join(venv, "bin", "python3"), os.path.join(venv, "bin", "gunicorn")
    if not venv or os.path.realpath(sys.prefix) == venv or not os.path.exists(script):
        return
    print(f"reloader: flaskapp: booting the live virtualenv {venv}, not {os.path.realpath(sys.prefix)}",
          file=sys.stderr, flush=True)
    os.execv(python, [python, script] + sys.argv[1:])


_run_live_virtualenv()
chdir = _release()
# gunicorn put its start directory on sys.path before reading this file: keep only the release's.
if os.getcwd() != chdir and os.getcwd() in sys.path:
    sys.path.remove(os.getcwd())
_mark(os.getpid(), "boot.json", json.dumps({"release": chdir, "virtualenv": os.path.realpath(sys.prefix),
                                             "environ": dict(os.environ)}), mode=0o600)


def _next_generation():
    """The reload's request to us as its new generation (the master it names re-exec'd us: GUNICORN_PID),
    while the helper that wrote it still runs; None on a start, a restart or a HUP."""
    request = _boot_request()
    if not request or not _OLD_MASTER or request.get("master") != _OLD_MASTER:
        return None
    return request if os.path.exists(f"/proc/{request.get('helper', 0)}") else None


def _start_time(pid):
    """When *pid* started (/proc/PID/stat), "" once it is gone: tells the old master from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


_GENERATION = _next_generation() or {}
_OLD_STARTED = _start_time(_OLD_MASTER) if _OLD_MASTER else ""
if _GENERATION:
    # Who we succeed, for the helper (reloader/swap.py): pre_exec wrote it already, this is in case it could not.
    _mark(os.getpid(), "heir-of", str(_OLD_MASTER))
# Gated: our workers load the app, then wait (see _wait_at_the_gate) until the helper opens the gate.
_GATED = bool(_GENERATION.get("gated"))
# max_surge: start with that many workers; the helper adds the rest (TTIN) as it retires old ones (TTOU).
workers = _GENERATION.get("workers") or workers


def pre_exec(server):
    """Runs in the forked child just before USR2 re-execs the new master.

    gunicorn re-execs sys.executable, which is already resolved into the *old* virtualenv; exec the
    virtualenv the reload resolved (or the configured path), so a virtualenv switched by symlink is used.
    With systemd's sockets, gunicorn passes LISTEN_FDS=n but its listeners are dup()ed close-on-exec
    copies, not fds 3..3+n-1: put them where sd_listen_fds() looks, inheritable."""
    _user_hook("pre_exec", server)
    python = _PYTHON
    request = _boot_request(server.pid)  # we are the old master's fork: server.pid is its pid
    if request:
        # The environment systemd would give a fresh ExecStart= now (the helper's own), but systemd's
        # per-process variables (journal stream, sockets) stay those of this master; gunicorn copies
        # env_orig and chdirs to START_CTX["cwd"] right after this hook.
        env = dict(request["environ"])
        env.update({k: server.cfg.env_orig[k] for k in request["keep"] if k in server.cfg.env_orig})
        server.cfg.env_orig = env
        server.START_CTX["cwd"] = request["release"]
        python = request["python"]
    # systemd accepts notifications from the main PID and the helper only: the new master's "READY=1" at
    # boot would be refused with a warning in the journal on every reload. The helper sends READY=1 once
    # it has handed MAINPID over; the new master has nothing to say to systemd after that.
    server.cfg.env_orig = {k: v for k, v in server.cfg.env_orig.items() if k != "NOTIFY_SOCKET"}
    if os.path.exists(python):
        server.START_CTX[0] = python
        server.START_CTX["args"][0] = python
    if request:
        _detach(server)
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


def _detach(server):
    """Fork once more and let the intermediate exit, so the new master (the grandchild, which goes on to
    exec) is re-parented to PID 1, systemd: when the helper names it in MAINPID=, systemd supervises its
    own child, without the warning "Supervising process N which is not our child" (service_set_main_pid).
    The old master reaps the intermediate at once. Before it exits, the intermediate records which master
    the new one succeeds (ready/NEW/heir-of), so that from then on the helper finds it by that, not by
    its parent. A failed fork leaves things as they were: the new master stays the old one's child."""
    try:
        child = os.fork()
    except OSError:
        return
    if child:
        try:
            _mark(child, "heir-of", str(server.pid))  # server.pid: the old master's (we are its fork)
        finally:
            os._exit(0)


def _promote_when_the_old_master_is_gone(server):
    """gunicorn promotes a USR2 new master (pidfile .2 -> pidfile, a proc name without .2) once its parent
    is not the old master. Detached (see _detach), that is at once, while the old master still serves and
    holds the pidfile (gunicorn's Pidfile.create would refuse to overwrite it, and the master would die):
    promote only once the old master is gone, as gunicorn does for a child."""
    if not _OLD_MASTER or getattr(server, "_reloader_promotion", None):
        return
    promote = server.maybe_promote_master

    def maybe_promote_master():
        if server.master_pid and _start_time(server.master_pid) == _OLD_STARTED and _OLD_STARTED:
            return  # the old master still runs (or is a zombie holding its pid)
        promote()
        if not server.master_pid:  # promoted: we succeed nobody any more (see reloader/swap.py)
            try:
                os.unlink(os.path.join(_READY_DIR, str(server.pid), "heir-of"))
            except OSError:
                pass

    server._reloader_promotion = promote
    server.maybe_promote_master = maybe_promote_master


def _keep_the_socket_for_the_heir(server):
    """gunicorn's stop() unlinks a bound unix socket when the master has neither a parent master nor a
    re-exec child (reexec_pid, which the detached new master is not: the old one reaped the intermediate):
    the old master retiring would unlink the socket the new one serves. While a master of ours succeeds
    this one (its ready directory says heir-of this pid), keep it."""
    stop = getattr(server, "stop", None)
    if stop is None or getattr(server, "_reloader_stop", None):
        return
    server._reloader_stop = stop

    def stop_keeping_the_socket(graceful=True):
        if not server.reexec_pid:
            heir = _heir_of(server.pid)
            if heir:
                server.reexec_pid = heir
        stop(graceful)

    server.stop = stop_keeping_the_socket


def _heir_of(pid):
    """A live new master whose ready directory names *pid* as the master it succeeds, or 0."""
    try:
        entries = os.listdir(_READY_DIR)
    except OSError:
        return 0
    for name in entries:
        try:
            with open(os.path.join(_READY_DIR, name, "heir-of")) as f:
                if name.isdigit() and int(f.read() or 0) == pid and _start_time(int(name)):
                    return int(name)
        except (OSError, ValueError):
            continue
    return 0


def when_ready(server):
    """The master is listening: record it so the helper can tell a live master from a booting one."""
    _user_hook("when_ready", server)
    _mark(server.pid, "master", str(server.pid))
    _promote_when_the_old_master_is_gone(server)
    _keep_the_socket_for_the_heir(server)
    if _GATED:
        # gunicorn starts its workers up to 0.1 s apart (Arbiter.spawn_workers); behind a shut gate the
        # first answer waits for the last of them, so start them all at once, as a HUP does.
        def spawn_workers():
            for _ in range(server.num_workers - len(server.WORKERS)):
                server.spawn_worker()

        server.spawn_workers = spawn_workers
    # A master re-exec'd by USR2 runs as "python3"; keep the name `ps -C gunicorn` and operators expect.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"gunicorn", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _hold_while_paused(worker):
    """`reloader pause`: requests wait while /run/flaskapp/paused exists (the hook file below; without it
    the worker serves unpaused, and `reloader pause` refuses)."""
    import runpy

    hook = '/etc/reloader/flaskapp.pause_hook.py'
    if os.path.exists(hook):
        worker.wsgi = runpy.run_path(hook)["pausable"](worker.wsgi, worker, '/run/flaskapp/paused')


def post_worker_init(worker):
    """The worker has imported the app (not merely forked)."""
    _user_hook("post_worker_init", worker)
    _hold_while_paused(worker)
    _mark(worker.ppid, f"worker-{worker.pid}", str(worker.pid))
    _wait_at_the_gate(worker)


def _wait_at_the_gate(worker):
    """A gated generation's worker has loaded the app but must not accept a connection (that happens in
    worker.run(), after this hook) until the helper has seen the pre-flight pass and every new worker
    ready: it opens the gate by creating gate-open in our master's ready directory. Meanwhile heartbeat
    (the master kills a worker silent for `timeout`) and leave on TERM/QUIT/INT: this worker never took
    a request, so exiting at once loses nothing. Our own handlers, because some worker classes only run
    theirs from an event loop that is not running yet (asgi); time.sleep is gevent's after its patching.
    Workers started after the gate opened (respawns, TTIN) pass straight through; a canary passes on its
    own ticket while the others wait."""
    gate = os.path.join(_READY_DIR, str(worker.ppid), "gate-open")
    ticket = f"{gate}-{worker.pid}"  # the canary's own gate (reloader/traffic.py)
    if not _GATED or os.path.exists(gate) or os.path.exists(ticket):
        return
    import signal
    import time

    stop = []
    saved = {s: signal.signal(s, lambda sig, frame: stop.append(sig))
             for s in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)}
    try:
        while not (os.path.exists(gate) or os.path.exists(ticket)):
            if stop or not worker.alive or os.getppid() != worker.ppid:
                sys.exit(0)
            worker.notify()
            time.sleep(0.005)  # the first answer waits for this poll; a stat() every 5 ms costs nothing
    finally:
        for s, handler in saved.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if not os.path.exists(gate):  # a canary, judged now: its counters go out every 0.1 s until the gate opens
        _PUBLISH_EVERY[0] = 0.1


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
        if _PUBLISH_EVERY[0] < 0.5 and os.path.exists(os.path.join(_READY_DIR, str(worker.ppid), "gate-open")):
            _PUBLISH_EVERY[0] = 0.5


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
