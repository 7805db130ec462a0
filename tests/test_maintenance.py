"""Maintenance mode in a real systemd + nginx under load: every request is answered, by the app (200) or by
nginx's maintenance answer (503 with Retry-After and the page), nginx is never reloaded (its master and
worker PIDs stay), the app keeps running, and a deploy during maintenance works and leaves it on."""

from __future__ import annotations

import json
import subprocess
import time

from appbed import HOST, App

#: Load through nginx that accepts exactly two answers: 200, or 503 carrying Retry-After. Half the
#: clients keep their connection alive (nginx is never reloaded, so those survive the switches too).
CLIENT = "/root/maintenance_load.py"
CLIENT_SRC = r"""import http.client, json, os, sys, threading, time
out, stop, host = sys.argv[1], sys.argv[2], sys.argv[3]
counts = {"200": 0, "503+retry-after": 0}
bad = []
lock = threading.Lock()

def client(keepalive):
    conn = None
    while not os.path.exists(stop):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
            conn.request("GET", "/", headers={"Host": host, **({} if keepalive else {"Connection": "close"})})
            r = conn.getresponse()
            body = r.read()
            retry = r.getheader("Retry-After")
            if r.status == 200:
                kind = "200"
            elif r.status == 503 and retry and retry.isdigit() and b"maintenance" in body.lower():
                kind = "503+retry-after"
            else:
                kind = f"{r.status} retry-after={retry!r} body={body[:80]!r}"
            if not keepalive or r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except Exception as e:
            kind = f"{type(e).__name__}: {e}"
            conn = None
        with lock:
            if kind in counts:
                counts[kind] += 1
            else:
                bad.append(kind)

threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with open(out, "w") as f:
    json.dump({"counts": counts, "bad": bad[:20], "failed": len(bad)}, f)
"""


def nginx_pids(app: App) -> tuple[int, list[int]]:
    master = app.props("nginx.service")["MainPID"]
    workers = app.c.run(["pgrep", "-P", str(master)]).stdout.split()
    return master, sorted(int(p) for p in workers)


def raw(app: App, *args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of a request through nginx (curl ARGS)."""
    r = app.c.run(["curl", "-s", "-i", "-m", "10", "-H", f"Host: {HOST}", *args], check=False)
    text = r.stdout.replace("\r\n", "\n")  # text mode may or may not have translated them
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0, headers, body


def test_maintenance_on_and_off_under_load_answers_every_request_without_an_nginx_reload(container) -> None:
    app = App(container)
    app.install()
    assert app.wait_version("v1")
    nginx_before = nginx_pids(app)
    master = app.props()["MainPID"]
    app.c.write_file(CLIENT, CLIENT_SRC)
    app.c.run(["rm", "-f", "/run/mload.json", "/run/mload.stop"])
    load = app.c.popen(["python3", CLIENT, "/run/mload.json", "/run/mload.stop", HOST],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)

    r = app.c.run(["reloader", "maintenance", "flaskapp", "on", "--message", "Migrating <the> database",
                   "--retry-after", "120"], check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    status, headers, body = raw(app, "http://127.0.0.1/")
    assert (status, headers.get("retry-after")) == (503, "120"), (status, headers)
    assert "Migrating &lt;the&gt; database" in body, body
    status, headers, _ = raw(app, "-X", "POST", "-d", "x=1", "http://127.0.0.1/form")
    assert (status, headers.get("retry-after")) == (503, "120"), "a POST gets the maintenance answer too"
    st = json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)
    assert st["maintenance"]["on"] is True and st["maintenance"]["retry_after"] == 120, st["maintenance"]
    assert "MAINTENANCE ON" in app.c.run(["reloader", "status", "flaskapp"]).stdout
    time.sleep(1)

    # Bad input: one line, exit 2, maintenance unchanged.
    for args, message in ((["--retry-after", "0"], "--retry-after 0 is out of range"),
                          (["--page", "/nonexistent.html"], "--page /nonexistent.html: No such file"),
                          (["--page", "/etc/hostname", "--message", "x"], "not both")):
        r = app.c.run(["reloader", "maintenance", "flaskapp", "on", *args], check=False)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert raw(app, "http://127.0.0.1/")[1].get("retry-after") == "120"

    # A deploy during maintenance: the new release serves behind it, and maintenance stays on.
    app.ship("v2")
    r = app.c.run(["reloader", "deploy", "flaskapp"], check=False, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert app.props()["MainPID"] != master
    behind = app.c.run(["curl", "-s", "--unix-socket", "/run/flaskapp.sock", "-H", f"Host: {HOST}", "http://x/"])
    assert json.loads(behind.stdout)["version"] == "v2"
    assert raw(app, "http://127.0.0.1/")[0] == 503, "the deploy did not end maintenance"

    # Another page and Retry-After while on: still no nginx reload.
    app.c.write_file("/root/page.html", "<html><body>Planned maintenance until 14:00</body></html>\n")
    r = app.c.run(["reloader", "maintenance", "flaskapp", "on", "--page", "/root/page.html", "--retry-after", "30"],
                  check=False)
    assert r.returncode == 0, r.stderr
    status, headers, body = raw(app, "http://127.0.0.1/")
    assert (status, headers.get("retry-after")) == (503, "30") and "until 14:00" in body, (status, headers, body)
    time.sleep(1)

    r = app.c.run(["reloader", "maintenance", "flaskapp", "off"], check=False)
    assert r.returncode == 0, r.stderr
    assert app.version() == "v2"
    time.sleep(1)
    app.c.run(["touch", "/run/mload.stop"])
    load.wait(timeout=60)
    report = json.loads(app.c.read_file("/run/mload.json"))
    assert report["failed"] == 0, report
    assert report["counts"]["200"] > 0 and report["counts"]["503+retry-after"] > 0, report
    assert nginx_pids(app) == nginx_before, "nginx was not reloaded"
    assert json.loads(app.c.run(["reloader", "status", "flaskapp", "--json"]).stdout)["maintenance"] == {"on": False}
    print(f"maintenance under load: {report['counts']}")
