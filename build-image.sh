#!/usr/bin/env bash
# Build the worker image imagegen:$(cat VERSION) with the classic builder (no buildx needed).
#
#   ./build-image.sh                CUDA image: python base pulled from Docker Hub, ComfyUI
#                                   from GitHub, wheels from PyPI (needs internet)
#   ./build-image.sh --cpu-local    offline: debootstrap base (scripts/docker-base.sh), host
#                                   wheelhouse (scripts/wheelhouse.sh), local ComfyUI source
#
# Options: --base IMAGE        base image with Python 3.11 (default: see Dockerfile)
#          --wheelhouse DIR    install wheels from DIR only (served to the build on 127.0.0.1)
#          --comfyui-src DIR   ComfyUI checkout to use instead of downloading the pinned commit
#          --tag TAG           image tag (default imagegen:$(cat VERSION))
#          -- ARGS...          passed on to docker build (e.g. -- --no-cache)
# Prints the tag on stdout when done.
set -euo pipefail

repo=$(cd "$(dirname "$0")" && pwd)
cache=${IMAGEGEN_DEV_CACHE:-$repo/.cache}
ctx=$repo/.docker-context
comfy_commit=$(sed -n 's/^COMFYUI_COMMIT = "\([0-9a-f]*\)"$/\1/p' "$repo/imagegen/__init__.py")  # one source: imagegen/__init__.py
port=${IMAGEGEN_WHEELHOUSE_PORT:-8799}   # fixed: it is part of the build cache key

say() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-0}"; }

base='' wheelhouse='' comfy_src='' tag='' cpu_local=0 extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --comfyui-src) comfy_src=${2:?--comfyui-src needs a folder}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --cpu-local) cpu_local=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) say "unknown option: $1"; usage 2 ;;
  esac
done

if ! err=$(docker info 2>&1 >/dev/null); then
  die "cannot reach the Docker engine: $(printf '%s' "$err" | tail -n1)
  Start it (as root: dockerd > /tmp/dockerd.log 2>&1 &) or check DOCKER_HOST and your access to the socket."
fi
version=$(cat "$repo/VERSION" 2>/dev/null)  # one source: VERSION
[ -n "$version" ] && [ -n "$comfy_commit" ] || die "cannot read VERSION and COMFYUI_COMMIT (imagegen/__init__.py)"
tag=${tag:-imagegen:$version}

if [ "$cpu_local" = 1 ]; then
  base=${base:-$("$repo/scripts/docker-base.sh")} || die "scripts/docker-base.sh failed"
  wheelhouse=${wheelhouse:-$("$repo/scripts/wheelhouse.sh")} || die "scripts/wheelhouse.sh failed"
  if [ -z "$comfy_src" ]; then
    for d in "${IMAGEGEN_COMFYUI_DIR:-}" "$cache/comfyui-$comfy_commit" "$HOME/.cache/imagegen-dev/comfyui-$comfy_commit"; do
      [ -n "$d" ] && [ -f "$d/main.py" ] && { comfy_src=$d; break; }
    done
    [ -n "$comfy_src" ] || die "no local ComfyUI source (set IMAGEGEN_COMFYUI_DIR or run scripts/setup-dev.sh)"
  fi
fi

args=(--build-arg "VERSION=$version" --build-arg "COMFYUI_COMMIT=$comfy_commit")
[ -z "$base" ] || args+=(--build-arg "BASE_IMAGE=$base")

# ComfyUI source: a fresh copy in the build context, without weights, git data or custom nodes.
rm -rf "$ctx/comfyui"
if [ -n "$comfy_src" ]; then
  [ -f "$comfy_src/main.py" ] || die "--comfyui-src $comfy_src has no main.py"
  mkdir -p "$ctx/comfyui"
  tar -C "$comfy_src" --exclude=./.git --exclude='__pycache__' --exclude='./custom_nodes/*' \
      --exclude='./user' --exclude='./temp' --exclude='./output/*' \
      --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.pt' --exclude='*.pth' --exclude='*.bin' --exclude='*.gguf' \
      -cf - . | tar -C "$ctx/comfyui" -xf - || die "could not copy $comfy_src into $ctx/comfyui"
  args+=(--build-arg COMFYUI_SOURCE=local)
fi

# Wheelhouse: served over HTTP on loopback to the build's RUN steps (--network host) rather
# than sent in the context, so ~3 GB is neither uploaded on every build nor left in a layer.
if [ -n "$wheelhouse" ]; then
  ls "$wheelhouse"/*.whl >/dev/null 2>&1 || die "--wheelhouse $wheelhouse holds no wheels (run scripts/wheelhouse.sh)"
  log=$(mktemp /tmp/imagegen-wheelhouse-http.XXXXXX)
  python3 -u -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" >"$log" 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
  until grep -q '^Serving HTTP' "$log"; do
    kill -0 "$server" 2>/dev/null \
      || die "cannot serve the wheelhouse on 127.0.0.1:$port (port in use? set IMAGEGEN_WHEELHOUSE_PORT): $(tail -n1 "$log")"
    sleep 0.1
  done
  args+=(--network host --build-arg "WHEELHOUSE=http://127.0.0.1:$port/")
fi

say "building $tag${base:+ from $base}${comfy_src:+, ComfyUI from $comfy_src}${wheelhouse:+, wheels from $wheelhouse}"
start=$SECONDS
DOCKER_BUILDKIT=0 docker build "${args[@]}" -t "$tag" "${extra[@]}" "$repo" >&2 \
  || die "docker build failed (see above)"
say "built $tag in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f GB", $1/1e9}'))"
echo "$tag"
