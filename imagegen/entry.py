"""The container's entrypoint (`entrypoint.py`): `serve` a worker, `health` probe, `fetch` models.

Kept to the standard library plus the worker's own imports so it starts fast in the image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from pathlib import Path


def _idle_seconds(text: str) -> float:
    """A worker's idle limit: above 0 (0 would end it before its first job), or inf for one never idling out."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: give idle seconds above 0, or inf for a worker that never idles out")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entrypoint.py", description="imagegen worker entrypoint")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start ComfyUI behind the authenticating proxy")
    serve.add_argument("--host", default=os.environ.get("IMAGEGEN_LISTEN", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=os.environ.get("IMAGEGEN_PORT", "8188"))
    serve.add_argument("--comfyui-dir", default=os.environ.get("IMAGEGEN_COMFYUI_DIR"))
    serve.add_argument("--models-dir", default=os.environ.get("IMAGEGEN_MODELS_DIR"))
    serve.add_argument("--shared-models", action="append", default=[], help="a read-only ComfyUI or A1111 model tree")
    serve.add_argument("--token-file", default=os.environ.get("IMAGEGEN_TOKEN_FILE"))
    serve.add_argument("--keep-warm", type=_idle_seconds, default=os.environ.get("IMAGEGEN_KEEP_WARM", "300"),
                       help="idle seconds before the worker exits (above 0; inf: it never idles out)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default=os.environ.get("IMAGEGEN_DEVICE", "auto"))
    serve.add_argument("--state-file", default=None)
    serve.add_argument("--work-dir", default=os.environ.get("IMAGEGEN_WORK_DIR"))
    health = commands.add_parser("health", help="exit 0 when the worker on --port is ready")
    health.add_argument("--port", type=int, default=os.environ.get("IMAGEGEN_PORT", "8188"))
    fetch = commands.add_parser("fetch", help="download the files of a model into the cache (JSON-line progress)")
    fetch.add_argument("model")
    fetch.add_argument("--models-dir", default=os.environ.get("IMAGEGEN_MODELS_DIR"))
    return parser


def _read_token(args) -> str:
    token = os.environ.pop("IMAGEGEN_WORKER_TOKEN", None)
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not token:
        raise SystemExit("entrypoint.py serve: no worker secret (set --token-file or IMAGEGEN_WORKER_TOKEN)")
    return token


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "health":
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/imagegen/health", timeout=5) as response:
                return 0 if json.load(response).get("ready") else 1
        except (OSError, ValueError):
            return 1
    if args.command == "serve":
        from imagegen.worker.serve import ServeOptions, serve

        if not args.comfyui_dir or not (Path(args.comfyui_dir) / "main.py").is_file():
            print(json.dumps({"event": "failed",
                              "error": f"no ComfyUI at {args.comfyui_dir!r} (set IMAGEGEN_COMFYUI_DIR)"}), flush=True)
            return 2
        from imagegen.util import paths

        models_dir = Path(args.models_dir) if args.models_dir else paths.models_dir()
        return serve(ServeOptions(
            comfyui_dir=Path(args.comfyui_dir), models_dir=models_dir, token=_read_token(args), host=args.host,
            port=args.port, keep_warm=args.keep_warm, device=args.device,
            state_file=Path(args.state_file) if args.state_file else None,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            extra_model_paths=[Path(p) for p in args.shared_models]))
    if args.command == "fetch":
        from imagegen.models.fetch import fetch_main

        return fetch_main(args.model, Path(args.models_dir) if args.models_dir else None)
    return 2


if __name__ == "__main__":
    sys.exit(main())
