"""A fleet behind HAProxy, rolled with the repo's Ansible playbooks (ansible/), under continuous load.

One fleet for the whole module (3 app hosts, each real systemd + nginx + gunicorn + reloader serving
examples/flaskapp, and 1 HAProxy host, on a bridge in a network namespace of the test's own); Ansible runs
from the checkout's root as the docs say, with nothing but the repo's ansible.cfg for SSH keepalive.  The
scenarios run in order and each starts from what the previous one left:

    site.yml twice → changed=0 · site.yml refuses a host without the TOML's virtualenv · bad inventory
    → fails before touching a host · canary + wave, timed
    against the seed's way (a plain gunicorn restarted host by host) → a drained roll from an archive →
    a release refused on the canary → a release that answers 500 on the canary → a release refused in the
    wave, then rollback.yml → a host's network cut mid-roll

Load: reloader/loadgen.py on the host (inside the namespace) against HAProxy, keep-alive and new
connections, plus long requests (/slow?s=2) always in flight.
"""

from __future__ import annotations

import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fleetbed
import pytest
import testbed

HOSTS = ("app1", "app2", "app3")
SEED = fleetbed.REPO / "bench/seed-restart.yml"
#: The scenarios share one fleet and run in order: with pytest-xdist they all go to one worker.
pytestmark = pytest.mark.xdist_group("fleet")


@pytest.fixture(scope="module")
def fleet(testbed_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleetbed.Fleet]:
    with fleetbed.Fleet(tmp_path_factory.mktemp("fleet"), hosts=len(HOSTS)) as f:
        yield f


def roll(fleet: fleetbed.Fleet, playbook: str, *, seed: bool = False,
         **extra: object) -> tuple[fleetbed.Run, dict, fleetbed.Samples]:
    """Run *playbook* while the load generator hammers HAProxy and the balancer's states are sampled."""
    sampler = fleet.sampler(backend="seed" if seed else fleetbed.APP)
    load = fleet.seed_load(records=True) if seed else fleet.load(records=True)
    try:
        sampler.wait_traffic(50)
        run = fleet.playbook(playbook, **extra)
    finally:
        report = load.stop()
        samples = sampler.stop()
    print(f"{playbook} {extra}: rc={run.rc} in {run.seconds:.1f} s; load: {report['summary']}; "
          f"servers UP min {samples.min_up()}, drained at once max {samples.max_drained()}")
    return run, report, samples


def assert_no_failed_requests(report: dict) -> None:
    assert report["total"] > 100, report["summary"]
    assert report["failed"] == 0, json.dumps(report["first_failures"][:10], indent=1)
    assert report["long"]["ok"] > 0, "no long request completed: the load was not the load we meant"


def assert_serving(fleet: fleetbed.Fleet, release: str, version: str, hosts: tuple[str, ...] = HOSTS) -> None:
    for host in hosts:
        assert fleet.current(host) == release, host
        served = fleet.served(host)
        assert (served.get("release"), served.get("version")) == (release, version), (host, served)
    assert_in_rotation(fleet, HOSTS)


def assert_in_rotation(fleet: fleetbed.Fleet, hosts: tuple[str, ...]) -> None:
    """HAProxy has *hosts* in rotation: UP, or "UP 1/3" (one slow check on a busy machine; still serving)."""
    states = fleet.haproxy_states()
    assert all(states[h].startswith("UP") for h in hosts), states


def mark(fleet: fleetbed.Fleet, host: str, marker: str) -> None:
    """A file only *host* has: a release reads it to misbehave on that host alone."""
    fleet.apps[host].run(["touch", f"/etc/{marker}"])


def test_site_applied_twice_changes_nothing(fleet: fleetbed.Fleet) -> None:
    assert fleet.site is not None
    first = fleet.site.recap()
    assert all(first[h]["changed"] > 0 for h in (*HOSTS, "lb")), first  # the first run did install
    assert_serving(fleet, "r1", "v1")

    again = fleet.playbook("site.yml", reloader_initial_release=str(fleet.releases / "r1"))

    assert again.rc == 0, again.out[-4000:]
    recap = again.recap()
    assert set(recap) == {*HOSTS, "lb"}, again.out[-2000:]
    assert {h: c["changed"] for h, c in recap.items()} == {h: 0 for h in recap}, again.out[-6000:]


def test_site_refuses_a_host_without_what_the_toml_needs(fleet: fleetbed.Fleet) -> None:
    # The balancer listed as an app host: no virtualenv, no first release, and none given.
    inventory = fleet.write_inventory(fleet.tmp / "site-inventory.yml", [*HOSTS, "lb"])

    run = fleet.playbook("site.yml", inventory=inventory)

    assert run.rc == 2, run.out[-4000:]
    assert ("lb: /srv/flaskapp/venv (the TOML's [app] virtualenv) has no bin/python: create it on the host "
            "(python3 -m venv, then pip install your requirements, gunicorn included) before site.yml; "
            "lb: /srv/flaskapp/current does not exist yet: set reloader_initial_release") in run.out, run.out[-4000:]
    assert all(c["changed"] == 0 for c in run.recap().values()), run.out[-3000:]
    assert fleet.lb is not None and fleet.lb.run("test -e /usr/bin/reloader", check=False).returncode != 0
    assert_serving(fleet, "r1", "v1")


@pytest.mark.parametrize("case", ["host-without-toml", "unknown-app", "missing-release", "no-ssh-keepalive"])
def test_bad_inventory_fails_before_touching_any_host(fleet: fleetbed.Fleet, case: str) -> None:
    release = fleetbed.write_release(fleet.releases, "r-unused", "v-unused")
    before = {h: fleet.current(h) for h in HOSTS}
    extra: dict[str, object] = {"reloader_release": str(release)}
    inventory = None
    if case == "host-without-toml":  # the balancer listed as an app host: it has no /etc/reloader/flaskapp.toml
        inventory = fleet.write_inventory(fleet.tmp / "bad-inventory.yml", [*HOSTS, "lb"])
        expect = "no /etc/reloader/flaskapp.toml on lb"
    elif case == "unknown-app":
        extra["reloader_app_name"] = "nosuchapp"
        expect = "unknown app name nosuchapp: no host has /etc/reloader/nosuchapp.toml (apps installed there: flaskapp)"
    elif case == "missing-release":
        extra["reloader_release"] = str(fleet.releases / "does-not-exist")
        expect = f"reloader_release {fleet.releases / 'does-not-exist'} does not exist on the controller"
    else:  # run from elsewhere than the checkout: Ansible does not find its ansible.cfg
        expect = ("no SSH keepalive (ServerAliveInterval) in ssh_args/ssh_common_args/ssh_extra_args: a host "
                  "that dies mid-roll would hang it")

    elsewhere = fleet.tmp if case == "no-ssh-keepalive" else fleetbed.REPO
    run = fleet.playbook("deploy.yml", inventory=inventory, cwd=elsewhere, **extra)

    assert run.rc == 2, run.out[-4000:]
    assert expect in run.out, run.out[-4000:]
    assert "PLAY [Roll]" not in run.out, run.out[-4000:]
    assert all(c["changed"] == 0 for c in run.recap().values()), run.out[-3000:]
    assert {h: fleet.current(h) for h in HOSTS} == before
    assert all("r-unused" not in fleet.releases_on(h) for h in HOSTS)
    assert_in_rotation(fleet, HOSTS)


def test_canary_then_wave_beside_the_seed_way_fails_no_request(fleet: fleetbed.Fleet) -> None:
    fleet.install_seed()
    release = fleetbed.write_release(fleet.releases, "r2", "v2")
    seed, seed_report, _ = roll(fleet, str(SEED), seed=True, seed_release=str(release))
    assert seed.rc == 0, seed.out[-4000:]
    assert all(fleet.seed_served(h).get("version") == "v2" for h in HOSTS)  # the baseline really deployed

    # a short window (~5 % of ~80 req/s reach the canary in it: min_requests 5); the 500 test keeps the defaults
    run, report, samples = roll(fleet, "deploy.yml", reloader_release=str(release), reloader_canary_window=3,
                                reloader_canary_min_requests=5)

    deploys, window = run.deploys(), run.canary_window()
    print(f"seed's way: {seed.seconds:.1f} s, {seed_report['failed']} failed of {seed_report['total']} "
          f"({seed_report['failures']}); canary + wave: {run.seconds:.1f} s, {report['failed']} failed of "
          f"{report['total']}; split {run.split()}; each host's reloader deploy {deploys} s\n"
          f"seed:\n{seed.timeline()}\ndeploy.yml:\n{run.timeline()}")
    assert run.rc == 0, run.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r2", "v2")
    assert set(deploys) == set(HOSTS), run.out[-4000:]
    assert 2 <= window < 10, run.out[-4000:]
    assert samples.max_drained() == 0 and samples.min_up() == len(HOSTS), samples.statuses()  # no draining
    assert report["versions"]["v2"]["count"] > 0 and report["versions"]["v1"]["count"] > 0
    for host in HOSTS:
        assert fleet.apps[host].run("readlink /srv/flaskapp/previous").stdout.strip().endswith("/r1")
    # Both wall times are printed above; the speed goal is bench/fleet_bench.py's to show (a ratio measured in
    # one run), not a timed assertion here.


def test_drained_roll_serial_2_from_an_archive(fleet: fleetbed.Fleet) -> None:
    tree = fleetbed.write_release(fleet.tmp / "archived", "r3", "v3")
    release = fleet.releases / "r3.tar.gz"
    with tarfile.open(release, "w:gz") as tar:
        tar.add(tree / "app.py", arcname="app.py")

    run, report, samples = roll(fleet, "deploy.yml", reloader_release=str(release), reloader_roll="drain",
                                reloader_serial=2)

    assert run.rc == 0, run.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r3", "v3")
    assert samples.max_drained() == 2, samples.statuses()  # app1 and app2 together, then app3
    assert samples.min_up() >= 1, samples.statuses()


def test_release_refused_on_the_canary_stops_the_roll(fleet: fleetbed.Fleet) -> None:
    # The app cannot be imported: reloader's pre-flight on app1 refuses it before touching gunicorn.
    release = fleetbed.write_release(fleet.releases, "r4", "v4", extra="\nraise RuntimeError('r4 is broken')\n")

    run, report, _ = roll(fleet, "deploy.yml", reloader_release=str(release))

    assert run.rc == 2, run.out[-6000:]
    assert "app1: release r4 not deployed" in run.out, run.out[-6000:]
    assert "r4 is broken" in run.out, run.out[-6000:]  # reloader's reason: the pre-flight's error
    assert "app1 serves r3 again; the hosts after it were not touched." in run.out, run.out[-6000:]
    assert run.recap()["app1"]["failed"] == 1, run.out[-3000:]
    assert "Wave:" not in run.out, run.out[-3000:]  # app2 and app3 were shipped r4 by the pre-flight, no more
    assert_no_failed_requests(report)
    assert "v4" not in report["versions"]
    assert_serving(fleet, "r3", "v3")


def test_canary_answering_500_is_judged_at_the_balancer_and_rolled_back(fleet: fleetbed.Fleet) -> None:
    mark(fleet, "app1", "reloader-test-canary")
    release = fleetbed.write_release(fleet.releases, "r5", "v5", extra=(
        "\nimport random\n_BAD = os.path.exists('/etc/reloader-test-canary')\n\n\n@app.before_request\n"
        "def _some_500():\n    if _BAD and request.path != '/health' and random.random() < 0.3:\n"
        "        return 'r5 fails here', 500\n    return None\n"))

    run, report, _ = roll(fleet, "deploy.yml", reloader_release=str(release), reloader_canary_window=8)

    five = sum(n for kind, n in report["failures"].items() if kind.startswith("http_5"))
    print(f"user-visible 5xx: {five} of {report['total']} ({100 * five / report['total']:.2f} %)")
    assert run.rc == 2, run.out[-6000:]
    assert "app1: release r5 not deployed: canary app1: 5xx regression" in run.out, run.out[-6000:]
    assert "app1 serves r3 again; the hosts after it were not touched." in run.out, run.out[-6000:]
    assert report["total"] > 100 and five <= 0.01 * report["total"], report["summary"]
    assert report["failed"] == five, report["failures"]  # nothing but the canary's own 500s
    assert "Wave:" not in run.out, run.out[-3000:]
    assert_serving(fleet, "r3", "v3")
    assert fleet.haproxy_states()["app1"].startswith("UP")
    assert fleet.lb is not None
    shown = [json.loads(fleet.lb.run(["haproxy-server", "show", fleetbed.APP, h]).stdout) for h in HOSTS]
    assert [s["weight"] for s in shown] == [100, 100, 100], shown  # the canary has its full share again


def test_release_refused_in_the_wave_then_rollback_brings_the_fleet_to_one_release(fleet: fleetbed.Fleet) -> None:
    mark(fleet, "app2", "reloader-test-refuse")
    release = fleetbed.write_release(fleet.releases, "r6", "v6", extra=(
        "\nif os.path.exists('/etc/reloader-test-refuse'):\n    raise RuntimeError('r6 refused on this host')\n"))

    run, report, _ = roll(fleet, "deploy.yml", reloader_release=str(release), reloader_canary_window=3,
                          reloader_canary_min_requests=5)

    assert run.rc == 2, run.out[-6000:]
    assert "app2: release r6 not deployed" in run.out and "r6 refused on this host" in run.out, run.out[-6000:]
    assert_no_failed_requests(report)
    assert [fleet.current(h) for h in HOSTS] == ["r6", "r3", "r6"]  # the canary and app3 went, app2 refused

    back, report, _ = roll(fleet, "rollback.yml")

    assert back.rc == 0, back.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r3", "v3")  # the release the fleet served before the roll, on every host
    again = fleet.playbook("rollback.yml")
    assert again.rc == 0 and all(c["changed"] == 0 for h, c in again.recap().items() if h in HOSTS), again.out[-3000:]


def test_host_whose_network_is_cut_mid_roll(fleet: fleetbed.Fleet) -> None:
    release = fleetbed.write_release(fleet.releases, "r7", "v7")
    sampler = fleet.sampler()
    load = fleet.load(records=True)
    done: dict[str, fleetbed.Run] = {}
    try:
        sampler.wait_traffic(50)
        t = threading.Thread(target=lambda: done.setdefault("run", fleet.playbook(
            "deploy.yml", reloader_release=str(release), reloader_canary_window=3, reloader_canary_min_requests=5)))
        t.start()
        # The wave has reached app2 (its gate recorded the roll, `reloader deploy` follows) when its network goes.
        deadline = time.monotonic() + 180
        while fleet.apps["app2"].run(["grep", "-qs", '"release": "r7"', "/var/lib/reloader/ansible/flaskapp.roll.json"],
                                     check=False).returncode != 0:
            assert time.monotonic() < deadline and t.is_alive(), "the wave never reached app2"
            time.sleep(0.1)
        cut, cut_done = fleet.cut_host("app2")
        t.join(timeout=120)
        ended = time.monotonic()
        sampler.wait_traffic(100)  # the balancer still answers, from app1 and app3
    finally:
        report = load.stop()
        samples = sampler.stop()
    run = done["run"]
    records = report["records"]
    # In flight at the cut: sent before the port was down and not answered before it went down.
    in_flight = [r for r in records if r["start"] < cut_done and r["start"] + r["latency"] > cut]
    after = [r for r in records if r["start"] >= cut_done]
    failed = [r for r in records if r["kind"] != "ok" and r["start"] + r["latency"] >= cut]
    slow = [r for r in records if r["start"] + r["latency"] >= cut and r["latency"] > 5 + 2 * r["long"]]
    down = next((row["t"] for row in samples.rows if row.get("servers", {}).get("app2", "").startswith("DOWN")),
                None)
    testbed.log(f"network cut: playbook ended {ended - cut:.1f} s after (rc={run.rc}); app2 down at HAProxy "
                f"{(down or 0) - cut:.1f} s after; {len(in_flight)} in flight at the cut, {len(failed)} failed "
                f"{sorted({r['kind'] for r in failed})}, {len(after)} sent after it, the longest "
                f"{max((r['latency'] for r in after if not r['long']), default=0):.2f} s")

    assert run.rc == 4, run.out[-6000:]  # ansible-playbook: a host was unreachable
    assert ended - cut <= 30, run.out[-3000:]
    assert run.recap()["app2"]["unreachable"] == 1, run.out[-3000:]
    assert "fatal: [app2]: UNREACHABLE!" in run.out, run.out[-3000:]
    assert down is not None and down - cut <= 5, samples.statuses()[-20:]
    assert sum(r["kind"] == "ok" for r in after) > 100
    assert len(failed) <= len(in_flight), json.dumps(failed[:10], indent=1)
    assert not slow, json.dumps(slow[:10], indent=1)
    assert fleet.current("app1") == "r7" and fleet.served("app1").get("version") == "v7"
    assert_in_rotation(fleet, ("app1", "app3"))


