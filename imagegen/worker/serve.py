"""The worker: one ComfyUI server behind an authenticating proxy, with an idle watchdog.

Runs inside the container (or as a local process). ComfyUI listens on 127.0.0.1 only; the
proxy listens on the published port and forwards only requests that carry the worker's secret
as a bearer token. ComfyUI's API has no authentication of its own, and browsers cannot add an
Authorization header to a cross-origin request without a CORS preflight, which is refused here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from imagegen import COMFYUI_VERSION, __version__
from imagegen.util import procs
from imagegen.util.files import write_private
from imagegen.util.gpus import detect_device  # noqa: F401 - the worker's device choice, shared with the host side
from imagegen.util.model_trees import tree_layout
from imagegen.worker import comfy_flags, comfy_launch
from imagegen.worker.compile_cache import COMPILE_CACHE, compile_cache_env  # noqa: F401 - used by tests and bench

HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "authorization", "content-length", "origin", "referer",
               comfy_launch.HEADER.lower()}


@dataclass
class ServeOptions:
    comfyui_dir: Path
    models_dir: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    keep_warm: float = 300.0
    device: str = "auto"            # auto, cpu, cuda
    work_dir: Path | None = None
    state_file: Path | None = None  # where the ready record is written (local runtime)
    extra_model_paths: list[Path] | None = None
    comfy_args: tuple[str, ...] = ()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_model_paths(models_dir: Path, target: Path, shared: list[Path] | None = None) -> Path:
    """An extra_model_paths.yaml pointing ComfyUI at the model cache first, then at shared trees."""
    lines: list[str] = []
    for index, root in enumerate([models_dir, *(shared or [])]):
        lines += [f"tree_{index}:", f"  base_path: {json.dumps(str(root))}"]
        if index == 0:
            lines.append("  is_default: true")
        for folder, subdirs in tree_layout(root).items():
            lines.append(f"  {folder}: |")
            lines += [f"    {subdir}/" for subdir in subdirs]
    target.write_text("\n".join(lines) + "\n")
    return target


class Worker:
    def __init__(self, options: ServeOptions):
        self.options = options
        self.work_dir = options.work_dir or Path(tempfile.mkdtemp(prefix="imagegen-worker-"))
        self.comfy_port = free_port()
        self.upstream_secret = secrets.token_urlsafe(32)  # ComfyUI answers only requests that carry it
        self.upstream_headers = {comfy_launch.HEADER: self.upstream_secret}
        self.comfy: subprocess.Popen | None = None
        self.device = detect_device() if options.device == "auto" else options.device
        self.last_activity = time.monotonic()
        self.in_flight = 0
        self.open_sockets = 0
        self.ready = False
        self.comfyui_version = COMFYUI_VERSION  # the pinned one until ComfyUI's /system_stats says
        self.started = time.time()
        self.last_model: str | None = None
        self.comfy_died = False
        self.it_per_s: float | None = None
        self._last_step: tuple[float, int] | None = None
        self._gpu: dict | None = None
        self._gpu_checked = 0.0
        self.jobs_done = 0
        self.upstream = None  # the aiohttp session all proxied requests share (made inside the event loop)

    # --- ComfyUI child --------------------------------------------------------------
    def comfy_command(self) -> list[str]:
        for name in ("output", "input", "temp", "user"):
            (self.work_dir / name).mkdir(parents=True, exist_ok=True)
        config = write_model_paths(self.options.models_dir, self.work_dir / "extra_model_paths.yaml",
                                   self.options.extra_model_paths)
        command = [sys.executable, comfy_launch.__file__, str(self.options.comfyui_dir / "main.py"), "--listen",
                   "127.0.0.1",
                   "--port", str(self.comfy_port), "--disable-auto-launch", "--disable-all-custom-nodes",
                   "--extra-model-paths-config", str(config),
                   "--output-directory", str(self.work_dir / "output"), "--input-directory",
                   str(self.work_dir / "input"),
                   "--temp-directory", str(self.work_dir / "temp"), "--user-directory", str(self.work_dir / "user"),
                   "--preview-method", "none", *comfy_flags.optional_flags(self.options.comfyui_dir)]
        if self.device == "cpu":
            # ComfyUI's CPU default (split attention) asks psutil for free memory inside every
            # attention call: torch.compile breaks its graph there and fast mode gets slower, not faster
            command += ["--cpu", "--use-pytorch-cross-attention"]
        return command + list(self.options.comfy_args)

    def start_comfy(self) -> None:
        env = procs.child_env(os.environ)  # no tokens or keys: ComfyUI and its nodes never see them
        env["PYTHONUNBUFFERED"] = "1"
        env[comfy_launch.ENV] = self.upstream_secret
        cache = compile_cache_env(self.options.models_dir, fallback=self.work_dir / "compile-cache")
        env.update({name: value for name, value in cache.items() if name not in env})
        # ComfyUI dies with this worker, even when the worker is SIGKILLed: it must never hold a GPU alone
        self.comfy = subprocess.Popen(self.comfy_command(), cwd=str(self.options.comfyui_dir), env=env,
                                      stdin=subprocess.DEVNULL, preexec_fn=procs.die_with_parent(os.getpid()))

    @property
    def process(self) -> subprocess.Popen:
        """ComfyUI's process, once start_comfy ran."""
        if self.comfy is None:
            raise RuntimeError("ComfyUI is not started")
        return self.comfy

    def stop_comfy(self) -> None:
        if self.comfy and self.comfy.poll() is None:
            self.comfy.terminate()
            try:
                self.comfy.wait(10)
            except subprocess.TimeoutExpired:
                self.comfy.kill()
                self.comfy.wait()

    # --- proxy ----------------------------------------------------------------------
    def authorized(self, request) -> bool:
        supplied = request.headers.get("Authorization", "")
        return hmac.compare_digest(supplied.encode(), f"Bearer {self.options.token}".encode())

    async def handle(self, request):
        from aiohttp import web

        if request.path == "/imagegen/health":
            ready = self.ready and await self.comfy_answers()
            return web.json_response({"ready": ready}, status=200 if ready else 503)
        if not self.authorized(request):
            return web.json_response({"error": "missing or wrong worker token"}, status=401)
        if request.method == "OPTIONS":
            return web.Response(status=403)
        if request.path == "/imagegen/info":  # a status query is not activity: it must not keep a worker warm
            return web.json_response(self.info())
        self.last_activity = time.monotonic()
        if request.path == "/ws":
            return await self.proxy_websocket(request)
        return await self.proxy_http(request)

    def gpu_info(self) -> dict | None:
        """This worker's GPU (name, UUID, memory), from nvidia-smi; free memory refreshed every few seconds."""
        if self.device != "cuda" or time.monotonic() - self._gpu_checked < 5:
            return self._gpu
        from imagegen.util.gpus import list_gpus

        self._gpu_checked = time.monotonic()
        found = list_gpus()
        visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
        chosen = [g for g in found if visible in (str(g.index), g.uuid)] or found[:1]
        if chosen:
            g = chosen[0]
            self._gpu = {"index": g.index, "uuid": g.uuid, "name": g.name, "memory_total_mib": g.memory_total_mib,
                         "memory_free_mib": g.memory_free_mib}
        return self._gpu

    def note_progress(self, text: str) -> None:
        """Learn the sampling speed from the progress events this proxy relays."""
        if '"progress"' not in text:
            return
        try:
            message = json.loads(text)
        except ValueError:
            return
        if message.get("type") != "progress":
            return
        now, step = time.monotonic(), int(message.get("data", {}).get("value", 0))
        if self._last_step and step == self._last_step[1] + 1 and now > self._last_step[0]:
            rate = 1.0 / (now - self._last_step[0])
            self.it_per_s = rate if self.it_per_s is None else self.it_per_s + (rate - self.it_per_s) / 5
        self._last_step = (now, step)

    def info(self) -> dict:
        return {"imagegen_version": __version__, "comfyui_version": self.comfyui_version, "device": self.device,
                "gpu": self.gpu_info(), "it_per_s": round(self.it_per_s, 3) if self.it_per_s else None,
                "pid": os.getpid(), "comfy_pid": self.comfy.pid if self.comfy else None, "ready": self.ready,
                "idle_seconds": round(time.monotonic() - self.last_activity, 1) if not self.busy() else 0.0,
                "keep_warm": self.options.keep_warm, "last_model": self.last_model, "jobs_done": self.jobs_done,
                "started": self.started, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def busy(self) -> bool:
        return self.in_flight > 0 or self.open_sockets > 0

    def upstream_session(self):
        """One client session for all proxied requests: its kept-alive connections to ComfyUI spare
        each request a TCP connect and a session set-up (aiohttp closes idle ones after 15 s)."""
        from aiohttp import ClientSession, DummyCookieJar

        if self.upstream is None or self.upstream.closed:
            self.upstream = ClientSession(auto_decompress=False, cookie_jar=DummyCookieJar(),
                                          headers=self.upstream_headers)
        return self.upstream

    async def proxy_http(self, request):
        from aiohttp import ClientConnectionError, web

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        body = await request.read()
        if request.method == "POST" and request.path == "/prompt":
            self._note_model(body)
        self.in_flight += 1
        try:
            async with self.upstream_session().request(request.method,
                                                       f"http://127.0.0.1:{self.comfy_port}{request.path_qs}",
                                                       headers=headers, data=body or None,
                                                       allow_redirects=False) as upstream:
                payload = await upstream.read()
                out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=upstream.status, body=payload, headers=out_headers)
        except (OSError, ClientConnectionError):
            return web.json_response({"error": "ComfyUI is not answering"}, status=502)
        finally:
            self.in_flight -= 1
            self.last_activity = time.monotonic()

    def _note_model(self, body: bytes) -> None:
        try:
            graph = json.loads(body).get("prompt", {})
        except (ValueError, AttributeError):
            return
        for node in graph.values():
            inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
            name = inputs.get("ckpt_name") or inputs.get("unet_name")
            if isinstance(name, str):
                self.last_model = name
                self.jobs_done += 1

    async def proxy_websocket(self, request):
        from aiohttp import ClientSession, WSMsgType, web

        client = web.WebSocketResponse(heartbeat=20)
        await client.prepare(request)
        self.open_sockets += 1
        try:
            async with ClientSession(headers=self.upstream_headers) as session:
                async with session.ws_connect(f"http://127.0.0.1:{self.comfy_port}{request.path_qs}") as upstream:
                    async def pump(source, sink):
                        async for message in source:
                            if message.type == WSMsgType.TEXT:
                                if source is upstream:
                                    self.note_progress(message.data)
                                await sink.send_str(message.data)
                            elif message.type == WSMsgType.BINARY:
                                await sink.send_bytes(message.data)
                            else:
                                break
                    tasks = [asyncio.ensure_future(pump(upstream, client)),
                             asyncio.ensure_future(pump(client, upstream))]
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in tasks:
                        task.cancel()
        except OSError:
            pass
        finally:
            self.open_sockets -= 1
            self.last_activity = time.monotonic()
            await client.close()
        return client

    # --- lifecycle ------------------------------------------------------------------
    async def wait_ready(self, timeout: float = 300.0, stop: asyncio.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise RuntimeError("stopped (SIGTERM or SIGINT) during start-up")
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during start-up")
            try:
                async with self.upstream_session().get(f"http://127.0.0.1:{self.comfy_port}/system_stats") as response:
                    if response.status == 200:
                        stats = await response.json(content_type=None)
                        system = stats.get("system") if isinstance(stats, dict) else None
                        version = system.get("comfyui_version") if isinstance(system, dict) else None
                        self.comfyui_version = str(version or COMFYUI_VERSION)
                        return
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s")

    async def comfy_answers(self, timeout: float = 3.0) -> bool:
        """ComfyUI itself answers (its server thread stays responsive while a job samples)."""
        from aiohttp import ClientConnectionError, ClientTimeout

        if self.comfy is None or self.comfy.poll() is not None:
            return False
        try:
            async with self.upstream_session().get(f"http://127.0.0.1:{self.comfy_port}/system_stats",
                                                   timeout=ClientTimeout(total=timeout)) as response:
                return response.status == 200
        except (OSError, ClientConnectionError, asyncio.TimeoutError):
            return False

    async def comfy_queue_empty(self) -> bool:
        try:
            async with self.upstream_session().get(f"http://127.0.0.1:{self.comfy_port}/queue") as response:
                queue = await response.json()
            return not queue.get("queue_running") and not queue.get("queue_pending")
        except (OSError, ValueError):
            return True

    async def watchdog(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if self.process.poll() is not None:
                print(json.dumps({"event": "comfyui_exited", "code": self.process.returncode}), flush=True)
                self.comfy_died = True
                stop.set()
                return
            idle = time.monotonic() - self.last_activity
            if not self.busy() and idle > self.options.keep_warm:  # inf: never (0 is refused by entry.py)
                if await self.comfy_queue_empty():
                    print(json.dumps({"event": "idle_exit", "idle_seconds": round(idle)}), flush=True)
                    stop.set()
                    return
                self.last_activity = time.monotonic()

    async def serve(self) -> int:
        """Serve until idle, stopped (SIGTERM/SIGINT) or ComfyUI dies; whatever happens, ComfyUI is
        stopped and this worker's record is deleted on the way out."""
        try:
            return await self._serve()
        finally:
            self.ready = False
            self.stop_comfy()
            self.forget_record()

    def forget_record(self) -> None:
        """Delete the state file when it still names this process (a newer worker may have replaced it)."""
        path = self.options.state_file
        if not path:
            return
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    async def _serve(self) -> int:
        from aiohttp import web

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.options.host, self.options.port)
        await site.start()
        port = runner.addresses[0][1]  # the port the OS picked for port 0
        self.start_comfy()
        try:
            await self.wait_ready(stop=stop)
        except RuntimeError as exc:
            print(json.dumps({"event": "failed", "error": str(exc)}), flush=True)
            self.stop_comfy()
            await runner.cleanup()
            return 1
        self.ready = True
        self.last_activity = time.monotonic()
        record = {"event": "ready", "port": port, "pid": os.getpid(), "device": self.device,
                  "imagegen_version": __version__, "comfyui_version": self.comfyui_version}
        if self.options.state_file:
            # the start times and command lines let a later command prove a pid is still this worker
            # (pids are reused, after a reboot most of all) before it sends any signal
            me, comfy = procs.identity(os.getpid()), procs.identity(self.process.pid)
            write_private_json(self.options.state_file, {
                **record, "token": self.options.token, "comfy_port": self.comfy_port,
                "upstream_secret": self.upstream_secret,
                "pid_start": me["pid_start"], "cmdline": me["cmdline"], "comfy_pid": self.process.pid,
                "comfy_start": comfy["pid_start"], "comfy_cmdline": comfy["cmdline"]})
        print(json.dumps(record), flush=True)
        await self.watchdog(stop)
        self.ready = False
        self.stop_comfy()
        if self.upstream is not None:
            await self.upstream.close()
        await runner.cleanup()
        if self.options.work_dir is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        code = self.process.returncode
        if self.comfy_died:
            return 128 - code if code is not None and code < 0 else (code or 1)  # e.g. 137 when killed for memory
        return 0


def write_private_json(path: Path, record: dict) -> None:
    write_private(path, json.dumps(record))


def serve(options: ServeOptions) -> int:
    return asyncio.run(Worker(options).serve())
