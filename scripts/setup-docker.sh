#!/usr/bin/env bash
# Prepare what the Docker tests (tests/test_docker.py) need: a running Docker engine and the worker
# image imagegen:$(cat VERSION), built offline for the CPU (./build-image.sh --cpu-local); and
# OpenSSH's server for tests/test_docker_hosts.py (installed when missing; it starts its own sshd).
#
#   - `docker info` fails and we are root: install docker.io and debootstrap with apt-get when
#     missing, start dockerd in the background (log: $IMAGEGEN_DEV_CACHE/dockerd.log) and wait
#     until it answers;
#   - then build the image; the Docker build cache makes this a few seconds when nothing changed,
#     and rebuilds only the last layers when imagegen/ changed.
#
# Idempotent. Under CI=true any failure is fatal (the Docker tests must run, not skip); otherwise
# it prints a warning and exits 0, and the Docker tests skip. IMAGEGEN_SETUP_DOCKER=0 skips it all.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGEGEN_DEV_CACHE:-$repo/.cache}
log=$cache/dockerd.log
build_log=$cache/build-image.log
wait_s=${IMAGEGEN_DOCKERD_WAIT:-60}
case ${CI:-} in 1|true|TRUE|True|yes) strict=1 ;; *) strict=0 ;; esac

say() { printf '[setup-docker] %s\n' "$*" >&2; }
give_up() {
  if [ "$strict" = 1 ]; then
    printf '[setup-docker] ERROR: %s\n' "$*" >&2
    exit 1
  fi
  printf '[setup-docker] WARNING: %s\n[setup-docker] the Docker tests will be skipped.\n' "$*" >&2
  exit 0
}

if [ "${IMAGEGEN_SETUP_DOCKER:-1}" = 0 ]; then say "skipped (IMAGEGEN_SETUP_DOCKER=0)"; exit 0; fi
mkdir -p "$cache" || give_up "cannot create the dev cache $cache"

docker_answers() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

if ! docker_answers; then
  if [ "$(id -u)" != 0 ]; then
    why=$( { docker info 2>&1 >/dev/null || true; } | tail -n1)
    give_up "Docker is not usable (${why:-docker not installed}) and only root can install or start it.
  Fix: install Docker, start its daemon, and add yourself to the docker group (then log in again)."
  fi
  case ${DOCKER_HOST:-unix:///var/run/docker.sock} in
    unix:///var/run/docker.sock|unix:///run/docker.sock) ;;
    *) give_up "DOCKER_HOST=$DOCKER_HOST does not answer; not starting a local daemon for another host" ;;
  esac
  missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || give_up "no apt-get to install ${missing[*]}"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$cache/apt-docker.log" 2>&1 \
      || give_up "apt-get install ${missing[*]} failed: $(tail -n3 "$cache/apt-docker.log")"
  fi
  # dockerd gives its socket to the group `docker` when it exists: the tests run the CLI as a
  # non-root member of it. (The docker.io package creates it; make sure.)
  getent group docker >/dev/null 2>&1 || groupadd --system docker || true
  if pid=$(cat /var/run/docker.pid 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "dockerd (pid $pid) is running but not answering yet; waiting"
  else
    say "starting dockerd (log: $log)"
    # Its own session, so it outlives this script and the test run.
    setsid dockerd >"$log" 2>&1 </dev/null &
  fi
  deadline=$((SECONDS + wait_s))
  until docker info >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || give_up "dockerd did not answer within ${wait_s}s; last lines of $log:
$(tail -n 15 "$log" 2>/dev/null)"
    sleep 0.5
  done
  say "dockerd is up"
fi

# OpenSSH's server and client: tests/test_docker_hosts.py starts its own sshd on loopback as a
# "remote" Docker host (--hosts). Under CI=true a missing sshd fails the setup.
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing openssh-server openssh-client with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends openssh-server openssh-client; } \
      >"$cache/apt-ssh.log" 2>&1 || give_up "apt-get install openssh-server failed: $(tail -n3 "$cache/apt-ssh.log")"
  elif [ "$strict" = 1 ]; then
    give_up "OpenSSH's server (/usr/sbin/sshd) is missing and only root can install it"
  else
    say "WARNING: no /usr/sbin/sshd (apt-get install openssh-server): the Docker-hosts tests will be skipped"
  fi
fi

# The image. build-image.sh --cpu-local makes its base image (debootstrap, root only, cached) and
# its wheelhouse (downloaded once) when missing; the build cache does the rest.
say "building the worker image (./build-image.sh --cpu-local; log: $build_log)"
start=$SECONDS
if ! tag=$("$repo/build-image.sh" --cpu-local 2>"$build_log"); then
  give_up "./build-image.sh --cpu-local failed; last lines of $build_log:
$(grep -v '^ ---> \|^Step \|^Removing intermediate' "$build_log" | tail -n 15)"
fi
say "image $tag ready ($((SECONDS - start)) s)"
