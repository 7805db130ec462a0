"""A fleet behind HAProxy, rolled with the repo's Ansible playbooks (ansible/), under continuous load.

One fleet for the whole module (3 app hosts, each real systemd + nginx + gunicorn + reloader serving
examples/flaskapp, and 1 HAProxy host, on a bridge in a network namespace of the test's own); the
scenarios run in order and each starts from what the previous one left:

    site.yml twice → changed=0 · bad inventory → fails before touching a host · rolling deploy (serial 1)
    → rolling deploy (serial 2, the release as a .tar.gz) → a release refused on host 1 → rollback
    → a host dies mid-roll

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

HOSTS = ("app1", "app2", "app3")
#: The scenarios share one fleet and run in order: with pytest-xdist they all go to one worker.
pytestmark = pytest.mark.xdist_group("fleet")


@pytest.fixture(scope="module")
def fleet(testbed_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleetbed.Fleet]:
    with fleetbed.Fleet(tmp_path_factory.mktemp("fleet"), hosts=len(HOSTS)) as f:
        yield f


def roll(fleet: fleetbed.Fleet, playbook: str, **extra: object) -> tuple[fleetbed.Run, dict, fleetbed.Samples]:
    """Run *playbook* while the load generator hammers HAProxy and the balancer's states are sampled."""
    sampler = fleet.sampler()
    load = fleet.load()
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


@pytest.mark.parametrize("case", ["host-without-toml", "unknown-app", "missing-release"])
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
    else:
        extra["reloader_release"] = str(fleet.releases / "does-not-exist")
        expect = f"reloader_release {fleet.releases / 'does-not-exist'} does not exist on the controller"

    run = fleet.playbook("deploy.yml", inventory=inventory, **extra)

    assert run.rc == 2, run.out[-4000:]
    assert expect in run.out, run.out[-4000:]
    assert "PLAY [Rolling deploy]" not in run.out, run.out[-4000:]
    assert all(c["changed"] == 0 for c in run.recap().values()), run.out[-3000:]
    assert {h: fleet.current(h) for h in HOSTS} == before
    assert all("r-unused" not in fleet.releases_on(h) for h in HOSTS)
    assert_in_rotation(fleet, HOSTS)


def test_rolling_deploy_under_load_fails_no_request(fleet: fleetbed.Fleet) -> None:
    release = fleetbed.write_release(fleet.releases, "r2", "v2")

    run, report, samples = roll(fleet, "deploy.yml", reloader_release=str(release))

    assert run.rc == 0, run.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r2", "v2")
    assert report["versions"]["v2"]["count"] > 0 and report["versions"]["v1"]["count"] > 0
    # serial 1: one host out of rotation at a time, and it was taken out (drained) for its turn
    assert samples.max_drained() == 1, samples.statuses()
    assert samples.min_up() == len(HOSTS) - 1, samples.statuses()
    assert all(any(row.get(h, "").startswith("DRAIN") for row in samples.statuses()) for h in HOSTS)
    for host in HOSTS:
        assert fleet.apps[host].run("readlink /srv/flaskapp/previous").stdout.strip().endswith("/r1")


def test_rolling_deploy_serial_2_from_an_archive(fleet: fleetbed.Fleet) -> None:
    tree = fleetbed.write_release(fleet.tmp / "archived", "r3", "v3")
    release = fleet.releases / "r3.tar.gz"
    with tarfile.open(release, "w:gz") as tar:
        tar.add(tree / "app.py", arcname="app.py")

    run, report, samples = roll(fleet, "deploy.yml", reloader_release=str(release), reloader_serial=2)

    assert run.rc == 0, run.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r3", "v3")
    assert samples.max_drained() == 2, samples.statuses()  # app1 and app2 together, then app3
    assert samples.min_up() >= 1, samples.statuses()


def test_refused_release_stops_the_roll_at_host_1(fleet: fleetbed.Fleet) -> None:
    # The app cannot be imported: reloader's pre-flight on app1 refuses it before touching gunicorn.
    release = fleetbed.write_release(fleet.releases, "r4", "v4", extra="\nraise RuntimeError('r4 is broken')\n")

    run, report, samples = roll(fleet, "deploy.yml", reloader_release=str(release))

    assert run.rc == 2, run.out[-6000:]
    assert "app1: release r4 not deployed" in run.out, run.out[-6000:]
    assert "r4 is broken" in run.out, run.out[-6000:]  # reloader's reason: the pre-flight's error
    assert "app1 is back in rotation, serving r3; the hosts after it were not touched." in run.out, run.out[-6000:]
    recap = run.recap()
    assert recap["app1"]["failed"] == 1, run.out[-3000:]
    # app2 and app3 only ran the read-only pre-flight: nothing changed, never drained
    assert (recap["app2"]["changed"], recap["app3"]["changed"]) == (0, 0), run.out[-3000:]
    assert "Drain flaskapp/app2" not in run.out and "Drain flaskapp/app3" not in run.out
    assert_no_failed_requests(report)
    assert "v4" not in report["versions"]
    assert_serving(fleet, "r3", "v3")  # app1 kept serving r3; app2 and app3 never saw r4
    assert "r4" in fleet.releases_on("app1")
    assert all("r4" not in fleet.releases_on(h) for h in ("app2", "app3"))
    assert not any(row.get(h, "").startswith("DRAIN") for row in samples.statuses() for h in ("app2", "app3"))


def test_rollback_goes_back_one_release_everywhere(fleet: fleetbed.Fleet) -> None:
    run, report, samples = roll(fleet, "rollback.yml")

    assert run.rc == 0, run.out[-6000:]
    assert_no_failed_requests(report)
    assert_serving(fleet, "r2", "v2")  # every host's previous release (app1's refused r4 never counted)
    assert samples.max_drained() == 1, samples.statuses()


def test_host_dying_mid_roll(fleet: fleetbed.Fleet) -> None:
    release = fleetbed.write_release(fleet.releases, "r5", "v5")
    sampler = fleet.sampler()
    load = fleet.load(records=True)
    done: dict[str, fleetbed.Run] = {}
    try:
        sampler.wait_traffic(50)
        t = threading.Thread(target=lambda: done.setdefault("run", fleet.playbook(
            "deploy.yml", reloader_release=str(release))))
        t.start()
        # While app1 is out of rotation for its turn, app2 dies.
        drained = sampler.wait_for(lambda row: row.get("app1", "").startswith("DRAIN"), timeout=120)
        assert drained, sampler.samples.statuses()
        died = time.monotonic()
        fleet.stop_host("app2")
        assert sampler.wait_for(lambda row: row.get("app2", "").startswith("DOWN"), timeout=30)
        t.join(timeout=600)
        sampler.wait_traffic(100)  # the balancer still answers, from app1 and app3
    finally:
        report = load.stop()
        samples = sampler.stop()
    run = done["run"]
    after = [r for r in report["records"] if r["start"] >= died]
    failed_after = [r for r in after if r["kind"] != "ok"]
    print(f"host dies: rc={run.rc} in {run.seconds:.1f}s; load: {report['summary']}; after the death: "
          f"{len(after)} requests, {len(failed_after)} failed {sorted({r['kind'] for r in failed_after})}")

    assert run.rc == 4, run.out[-6000:]  # ansible-playbook: a host was unreachable
    recap = run.recap()
    assert recap["app2"]["unreachable"] == 1, run.out[-3000:]
    assert "fatal: [app2]: UNREACHABLE!" in run.out, run.out[-3000:]
    assert recap["app3"]["changed"] == 0 and "Drain flaskapp/app3" not in run.out  # the roll stopped at app2
    assert fleet.current("app1") == "r5" and fleet.served("app1").get("version") == "v5"
    assert fleet.current("app3") == "r2" and "r5" not in fleet.releases_on("app3")
    assert_in_rotation(fleet, ("app1", "app3"))
    assert fleet.haproxy_states()["app2"].startswith("DOWN")
    assert sum(r["kind"] == "ok" for r in after) > 100
    # At most the requests the dead host had in flight can fail (8 clients), none once HAProxy marked it down.
    assert len(failed_after) <= 8, json.dumps(report["first_failures"][:10], indent=1)
    down = next(row["t"] for row in samples.rows if row.get("servers", {}).get("app2", "").startswith("DOWN"))
    assert not [r for r in failed_after if r["start"] > down], json.dumps(failed_after[:10], indent=1)
