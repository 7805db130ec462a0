"""The README's pip route in a container: ``pip install .`` of this checkout into a virtualenv, then
``reloader install`` from it, ends in a working ``systemctl reload`` (the units call that venv's reloader).

No /usr/bin/reloader here (that is the .deb's): a config naming it is refused before anything is written.
"""

from __future__ import annotations

from appbed import App

VENV = "/opt/reloader"


def test_pip_install_into_a_venv_ends_in_a_working_reload(container) -> None:
    c = container
    # The README's steps, offline: the test bed has no package index, Debian's python3-* provide the deps.
    c.run("mkdir -p /root/reloader-src && tar -C /src --exclude=.git --exclude=__pycache__ -cf - . "
          "| tar -C /root/reloader-src -xf -")
    c.run(f"python3 -m venv --system-site-packages {VENV}")
    r = c.run(f"{VENV}/bin/pip install --no-index --no-build-isolation /root/reloader-src", check=False, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert c.run(["test", "-e", "/usr/bin/reloader"], check=False).returncode == 1

    app = App(c)
    c.run("mkdir -p /srv/flaskapp && ln -sfn /opt/venv /srv/flaskapp/venv")
    app.ship("v1")
    explicit = c.read_file("/src/examples/flaskapp.toml") + '\n[reload]\nhelper = "/usr/bin/reloader"\n'
    c.write_file("/root/deb-helper.toml", explicit)
    r = c.run([f"{VENV}/bin/reloader", "install", "/root/deb-helper.toml"], check=False, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "[reload] helper: /usr/bin/reloader is not executable" in r.stderr and len(r.stderr.splitlines()) == 1
    assert c.run("ls /etc/reloader /etc/systemd/system/flaskapp.service", check=False).returncode != 0, \
        "a refused install wrote files"

    # check imports the worker class in the app's venv: tornado is not installed there, nor is a typo.
    for worker, cause in (("tornado", "You need tornado installed to use this worker"),
                          ("uvicorn_workers.UvicornWorker", "No module named 'uvicorn_workers'")):
        c.write_file("/root/worker.toml", c.read_file("/src/examples/flaskapp.toml").replace(
            "[gunicorn]\n", f'[gunicorn]\nworker_class = "{worker}"\n'))
        r = c.run([f"{VENV}/bin/reloader", "check", "/root/worker.toml"], check=False, timeout=120)
        assert r.returncode == 1 and f"worker_class {worker!r} cannot be loaded" in r.stderr, r.stderr
        assert cause in r.stderr, r.stderr

    # The user's own gunicorn config: its settings apply and its when_ready runs before reloader's.
    c.write_file("/etc/flaskapp-gunicorn.py", "max_requests = 321\n\ndef when_ready(server):\n"
                 "    with open('/run/flaskapp/user-hook', 'a') as f:\n        f.write(f'{server.pid}\\n')\n")
    c.write_file("/root/flaskapp.toml", c.read_file("/src/examples/flaskapp.toml").replace(
        "[gunicorn]\n", '[gunicorn]\nconfig_file = "/etc/flaskapp-gunicorn.py"\n'))
    r = c.run([f"{VENV}/bin/reloader", "install", "/root/flaskapp.toml"], check=False, timeout=240)
    assert r.returncode == 0, (r.stdout, r.stderr, app.journal())
    unit = c.read_file("/etc/systemd/system/flaskapp.service")
    assert f"ExecReload={VENV}/bin/reloader exec-reload /etc/reloader/flaskapp.toml" in unit, unit
    first = app.props()["MainPID"]
    app.ship("v2")
    r = app.reload()
    props = app.props()
    assert r.returncode == 0 and props["ReloadResult"] == "success", (r.stderr, props, app.journal())
    assert app.version() == "v2"
    assert "serving release 2" in props["StatusText"], props
    assert c.read_file("/run/flaskapp/user-hook").split() == [str(first), str(props["MainPID"])]
    r = c.run(["/opt/venv/bin/python3", "-c", "import runpy; print(runpy.run_path("
               "'/etc/reloader/flaskapp.gunicorn.conf.py')['max_requests'])"], check=False)
    assert r.stdout.strip() == "321", r
