#!/usr/bin/env bash
# Sets up this checkout on a fresh Debian machine: system packages, the Docker engine, and a venv with
# everything installed. Idempotent: re-running it only checks. Run as root or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  python3 python3-venv python3-dev gcc git ca-certificates
  docker.io docker-compose debootstrap
  postgresql redis-server openssh-client curl
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start PostgreSQL and Redis as system services where systemd runs; the tests start their
# own throwaway servers, so the system ones are not needed (and may not run in a container).

if ! docker info >/dev/null 2>&1; then
  # A dockerd killed without cleanup leaves its pid file behind, and a new one refuses to start over it.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    $SUDO rm -f /var/run/docker.pid
  fi
  echo "setup: starting dockerd (log: /var/log/ingest-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/var/log/ingest-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/ingest-dockerd.log" >&2; exit 1; }
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[all]'
echo "setup: ready (.venv/bin/ingestctl, .venv/bin/pytest)"
