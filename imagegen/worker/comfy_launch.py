"""Start ComfyUI's main.py so that only its worker can talk to it.

ComfyUI has no authentication, and a port on 127.0.0.1 is open to every user of the machine. The
worker starts ComfyUI through this module with a fresh secret in IMAGEGEN_UPSTREAM_SECRET: one
aiohttp middleware, put in front of ComfyUI's own, refuses every request (websockets included)
that does not carry it. The secret leaves the environment before ComfyUI runs, so ComfyUI's
children do not inherit it. No custom node is involved.

    python .../imagegen/comfy_launch.py /path/to/ComfyUI/main.py [ComfyUI's arguments...]
"""

from __future__ import annotations

import hmac
import os
import runpy
import sys

HEADER = "X-Imagegen-Upstream"
ENV = "IMAGEGEN_UPSTREAM_SECRET"


def require_secret(secret: str) -> None:
    """Make every aiohttp web.Application built from now on refuse requests without the secret."""
    from aiohttp import web

    expected = secret.encode()

    @web.middleware
    async def check(request, handler):
        if not hmac.compare_digest(request.headers.get(HEADER, "").encode(), expected):
            return web.Response(status=403, text="forbidden: talk to this ComfyUI through its imagegen worker\n")
        return await handler(request)

    original = web.Application.__init__

    def init(self, *args, middlewares=(), **kwargs):
        original(self, *args, middlewares=[check, *middlewares], **kwargs)

    # patching the class is the point: ComfyUI builds its own Application, we cannot pass it middlewares
    web.Application.__init__ = init  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python comfy_launch.py COMFYUI/main.py [ARGS...]")
    secret = os.environ.pop(ENV, "")
    if not secret:
        sys.exit(f"{ENV} is not set: refusing to start ComfyUI without a secret")
    main_py = os.path.abspath(sys.argv[1])
    sys.argv = [main_py, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(main_py)  # as `python main.py` has it (not this file's folder)
    require_secret(secret)
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
