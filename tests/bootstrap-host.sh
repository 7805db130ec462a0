#!/bin/bash
# Install what the real-systemd test bed (tests/testbed.py) needs on the HOST.
# Idempotent and quick when everything is already there, so tests/run can
# call it every time.  Needs root (apt, and the bed itself mounts/boots).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap-host.sh: must run as root (try: sudo bash tests/run)" >&2
    exit 1
fi

need_apt=()
command -v systemd-nspawn >/dev/null || need_apt+=(systemd-container)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need_apt+=(debian-archive-keyring)
command -v nsenter >/dev/null || need_apt+=(util-linux)
# Host tests run systemd-analyze verify/security on the rendered units.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v python3 >/dev/null || need_apt+=(python3)
# pip downloads the container's wheels on the host.
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The fleet tests (tests/test_ansible_fleet.py) drive the containers with Debian's Ansible over SSH.
command -v ansible-playbook >/dev/null || need_apt+=(ansible-core)
command -v ssh >/dev/null || need_apt+=(openssh-client)

if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bootstrap-host.sh: apt-get install ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${need_apt[@]}"
fi

if ! python3 -c 'import pytest, jinja2, xdist' 2>/dev/null || ! python3 -m ruff --version >/dev/null 2>&1; then
    echo "bootstrap-host.sh: pip install pytest pytest-xdist jinja2 ruff" >&2
    # Debian's python3 is "externally managed" (PEP 668); this is a throw-away
    # test host, so installing into it is intended.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install pytest pytest-xdist jinja2 ruff
fi

modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || {
    echo "bootstrap-host.sh: kernel lacks overlayfs, the test bed cannot boot" >&2
    exit 1
}
