# imagegen worker: ComfyUI 0.3.75 + entrypoint.py, one container per GPU.
#
#   online, CUDA (defaults):  ./build-image.sh (it passes VERSION from ./VERSION and COMFYUI_COMMIT from imagegen/__init__.py)
#   offline, CPU (this repo): ./build-image.sh --cpu-local
#
# Layers go from heaviest and most stable to lightest: torch (~5 GB) -> ComfyUI source ->
# ComfyUI requirements -> this package, so a change in imagegen/ rebuilds in seconds.
# Works with the classic builder (no BuildKit features).

# The PyPI torch wheels bring their own CUDA user-space libraries (nvidia-* packages), so any
# glibc Python 3.11 base runs on GPUs; the driver comes from the NVIDIA container toolkit.
# Offline: imagegen-base:bookworm-* (scripts/docker-base.sh), the same Debian and Python.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/imagegen \
    IMAGEGEN_COMFYUI_DIR=/opt/comfyui \
    IMAGEGEN_MODELS_DIR=/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Containers run as the host user (user=uid:gid), so everything written at run time is
# world-writable (sticky): HOME, /models, /output. /app is importable through a .pth file.
# Fast mode (torch.compile) compiles kernels at run time: inductor's CPU kernels with g++, Triton's
# GPU launcher with gcc, both against Python's headers (the python:slim base has the headers; the
# offline base brings g++ and python3-dev already, so this step needs no network there).
RUN if ! command -v g++ >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -c 'import sysconfig, os, sys; h = sysconfig.get_paths()["include"]; sys.exit(0 if os.path.isfile(h + "/Python.h") else f"no Python.h in {h}")'

RUN python3 -m venv /opt/venv \
 && echo /app > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/imagegen-app.pth" \
 && (getent passwd 1000 >/dev/null || useradd --no-log-init --uid 1000 --user-group --no-create-home --home-dir /home/imagegen imagegen) \
 && mkdir -p /home/imagegen /models /output /app \
 && chmod 1777 /home/imagegen /models /output

# WHEELHOUSE: empty = install from the package index; else a --find-links location
# (build-image.sh --wheelhouse serves a host folder on http://127.0.0.1:PORT/ for the build).
ARG WHEELHOUSE=
# TORCH_INDEX_URL: e.g. https://download.pytorch.org/whl/cu128 for older drivers (PyPI's
# torch 2.13 wheels are CUDA 13 builds and need driver >= 580).
ARG TORCH_INDEX_URL=
ARG TORCH_PACKAGES="torch==2.13.0 torchvision==0.28.0"
RUN env ${WHEELHOUSE:+PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELHOUSE} ${TORCH_INDEX_URL:+PIP_INDEX_URL=$TORCH_INDEX_URL} \
      pip install $TORCH_PACKAGES \
 && python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# ComfyUI source: COMFYUI_SOURCE=git (default) downloads the pinned commit from GitHub;
# COMFYUI_SOURCE=local takes .docker-context/comfyui/ (build-image.sh --comfyui-src DIR).
# The wildcards let this COPY succeed when that folder is absent (Dockerfile is the anchor).
ARG COMFYUI_SOURCE=git
ARG COMFYUI_REPO=https://github.com/comfyanonymous/ComfyUI
# COMFYUI_COMMIT has one source, imagegen/__init__.py: build-image.sh passes it (needed with COMFYUI_SOURCE=git).
ARG COMFYUI_COMMIT
COPY Dockerfile .docker-contex[t]/comfyu[i] /opt/comfyui/
RUN set -eu; rm /opt/comfyui/Dockerfile; \
    if [ "$COMFYUI_SOURCE" = local ]; then \
      [ -f /opt/comfyui/main.py ] || { echo "COMFYUI_SOURCE=local but .docker-context/comfyui/main.py is missing (build-image.sh --comfyui-src DIR)" >&2; exit 1; }; \
    elif [ "$COMFYUI_SOURCE" = git ]; then \
      [ -n "${COMFYUI_COMMIT:-}" ] || { echo "pass --build-arg COMFYUI_COMMIT=... (build-image.sh does)" >&2; exit 1; }; \
      rm -rf /opt/comfyui; mkdir -p /opt/comfyui; \
      url="$COMFYUI_REPO/archive/$COMFYUI_COMMIT.tar.gz"; \
      python3 -c 'import sys, urllib.request as u; u.urlretrieve(sys.argv[1], "/tmp/comfyui.tar.gz")' "$url" 2>/tmp/dl.err \
        || { echo "could not download $url: $(tail -n1 /tmp/dl.err) (offline? build-image.sh --comfyui-src DIR)" >&2; exit 1; }; \
      tar -xzf /tmp/comfyui.tar.gz --strip-components=1 -C /opt/comfyui; rm /tmp/comfyui.tar.gz; \
    else echo "COMFYUI_SOURCE must be git or local, not '$COMFYUI_SOURCE'" >&2; exit 1; fi; \
    cd /opt/comfyui; test -f main.py; test -f requirements.txt; \
    rm -rf .git extra_model_paths.yaml custom_nodes/ComfyUI-Manager; \
    mkdir -p custom_nodes models input output temp user; \
    find custom_nodes -mindepth 1 -maxdepth 1 ! -name example_node.py.example -exec rm -rf {} +; \
    find . \( ! -perm -o+r -o -type d ! -perm -o+x \) -exec chmod a+rX {} +; \
    chmod 1777 input output temp user; \
    python3 -m compileall -q -j 0 /opt/comfyui >/dev/null || true

# ComfyUI's requirements (torch pinned again so nothing upgrades it) and the runtime
# dependencies of this package (keep in sync with pyproject.toml and scripts/wheelhouse.sh).
ARG APP_PACKAGES="requests websocket-client pyyaml huggingface_hub hf-xet tqdm typer docker safetensors aiohttp filelock"
RUN env ${WHEELHOUSE:+PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELHOUSE} ${TORCH_INDEX_URL:+PIP_EXTRA_INDEX_URL=$TORCH_INDEX_URL} \
      pip install -r /opt/comfyui/requirements.txt $TORCH_PACKAGES $APP_PACKAGES

# This package, last: a code change only rebuilds from here.
ARG VERSION=dev
LABEL imagegen.version=$VERSION
COPY VERSION pyproject.tom[l] entrypoint.p[y] models.yam[l] /app/
COPY imagegen/ /app/imagegen/
RUN chmod -R a+rX /app && (python3 -m compileall -q /app/imagegen >/dev/null || true)

USER 1000:1000
WORKDIR /home/imagegen
EXPOSE 8188
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
  CMD ["/opt/venv/bin/python3", "/app/entrypoint.py", "health"]
ENTRYPOINT ["/opt/venv/bin/python3", "/app/entrypoint.py"]
CMD ["serve"]
