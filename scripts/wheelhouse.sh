#!/usr/bin/env bash
# Download every wheel the worker image needs (ComfyUI's requirements, the CUDA builds of
# torch/torchvision, this package's runtime deps) into a wheelhouse on the host, so that
# `docker build` can install them without network access (see build-image.sh --wheelhouse).
# Idempotent: skipped when the stamp of the requirement list matches. Prints the directory.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGEGEN_DEV_CACHE:-$repo/.cache}
wh=${IMAGEGEN_WHEELHOUSE:-$cache/wheelhouse}
comfy_commit=$(sed -n 's/^COMFYUI_COMMIT = "\([0-9a-f]*\)"$/\1/p' "$repo/imagegen/__init__.py")  # one source: imagegen/__init__.py
ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
py=${PYTHON:-python3}
# Keep in sync with the Dockerfile (TORCH_PACKAGES, APP_PACKAGES).
torch_pins=(torch==2.13.0 torchvision==0.28.0)
app_deps=(requests websocket-client pyyaml huggingface_hub hf-xet tqdm typer docker safetensors aiohttp filelock)

say() { printf '[wheelhouse] %s\n' "$*" >&2; }
die() { printf '[wheelhouse] ERROR: %s\n' "$*" >&2; exit 1; }

comfy_dir=${IMAGEGEN_COMFYUI_DIR:-}
if [ -z "$comfy_dir" ]; then
  for d in "$cache/comfyui-$comfy_commit" "$HOME/.cache/imagegen-dev/comfyui-$comfy_commit"; do
    [ -f "$d/requirements.txt" ] && { comfy_dir=$d; break; }
  done
fi
reqs=${comfy_dir:+$comfy_dir/requirements.txt}
[ -n "$reqs" ] && [ -f "$reqs" ] \
  || die "ComfyUI requirements.txt not found (set IMAGEGEN_COMFYUI_DIR or run scripts/setup-dev.sh)"

stamp=$( { cat "$reqs"; printf '%s\n' "${torch_pins[@]}" "${app_deps[@]}"; "$py" -c 'import sys, platform; print(sys.version_info[:2], platform.machine())'; } \
  | sha256sum | cut -c1-16)
if [ -f "$wh/.stamp" ] && [ "$(cat "$wh/.stamp")" = "$stamp" ]; then
  say "up to date ($(du -sh "$wh" | cut -f1))"; echo "$wh"; exit 0
fi

# --isolated ignores this machine's pip config and PIP_* env (a local torch+cpu wheel in
# find-links would satisfy ==2.13.0 and has no matching torchvision); it also drops the
# configured CA bundle, hence --cert. One resolve for everything keeps the set consistent.
say "downloading into $wh (first time ~3 GB, a few minutes)"
mkdir -p "$wh"; rm -f "$wh/.stamp"
start=$SECONDS
"$py" -m pip download --isolated --cert "$ca_bundle" --disable-pip-version-check --progress-bar off -q \
  -d "$wh" -r "$reqs" "${torch_pins[@]}" "${app_deps[@]}" pip setuptools wheel \
  || die "pip download failed (is PyPI reachable?)"
if ls "$wh" | grep -E '^torch-.*\+cpu' >/dev/null; then die "a +cpu torch wheel landed in $wh: remove it and rerun"; fi
sdists=$(ls "$wh" | grep -E '\.(tar\.gz|zip)$' || true)
[ -z "$sdists" ] || say "note: source-only packages (built at install time): $sdists"
echo "$stamp" > "$wh/.stamp"
say "done in $((SECONDS - start)) s, $(ls "$wh" | wc -l) files, $(du -sh "$wh" | cut -f1)"
echo "$wh"
