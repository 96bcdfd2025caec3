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
  postgresql redis-server openssh-client curl nginx jq zstd docker-registry openssl
)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
APT_UPDATED=""
apt_update() {
  if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
}

# The `docker` CLI: Debian 13 (trixie) and later ship it as its own package, docker-cli, which docker.io only
# recommends (and installs here skip recommends), so dockerd would run with no client to answer `docker info`.
# On bookworm and older, docker.io carries /usr/bin/docker and there is no docker-cli package.
needs_docker_cli() {
  installed docker-cli && return 1
  local codename=""
  if [ -r /etc/os-release ]; then codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"; fi
  case "$codename" in
    buster|bullseye|bookworm) return 1 ;;
  esac
  # Anything else (trixie, forky, sid, derivatives): install it wherever the distribution has the package.
  apt-cache show docker-cli >/dev/null 2>&1 && return 0
  apt_update
  apt-cache show docker-cli >/dev/null 2>&1
}
if needs_docker_cli; then PACKAGES+=(docker-cli); fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v docker >/dev/null 2>&1 || {
  echo "setup: the docker CLI is missing although docker.io is installed; install docker-cli" >&2; exit 1;
}
# The Debian packages start PostgreSQL and Redis as system services where systemd runs; the tests start their
# own throwaway servers, so the system ones are not needed (and may not run in a container).

if [ -n "$SUDO" ] && ! docker info >/dev/null 2>&1 && $SUDO docker info >/dev/null 2>&1; then
  echo "setup: the Docker engine runs, but $(id -un) may not use it: run \`sudo usermod -aG docker $(id -un)\`," \
    "log in again, and re-run this script" >&2
  exit 1
fi
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
# pip byte-compiles what it installs, but not an editable project: compiled here (as this user), every command
# starts without compiling ingestctl's modules, and under PYTHONDONTWRITEBYTECODE it would do that on every run.
.venv/bin/python -m compileall -q deploys >/dev/null
if [ -n "$SUDO" ]; then
  # The sandbox's Debian base images are the one thing that needs root (debootstrap): built once, here, so
  # everything after runs as this user (a member of the docker group). No bytecode from root in the checkout.
  $SUDO env PYTHONDONTWRITEBYTECODE=1 .venv/bin/ingestctl testbed base-images
fi
echo "setup: ready (.venv/bin/ingestctl, .venv/bin/pytest)"
