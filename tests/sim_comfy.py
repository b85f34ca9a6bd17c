"""A simulated worker: the part of the ComfyUI + imagegen-worker API that imagegen's client uses.

This machine has no GPU; a SimWorker stands for a worker with a GPU of a set size and speed. It
"renders" by sleeping `step_seconds` per sampling step (sending a progress event each step), plus
`load_seconds` when a prompt's model (ckpt_name / unet_name) differs from the one loaded, then
"saves" real PNGs of the requested size (batch_size of them for a latent batch), served by /view
and recorded in /history. Every route but /imagegen/health needs `Authorization: Bearer TOKEN`.

    with SimWorker(step_seconds=0.02, gpu_name="RTX 4090", memory_total_mib=24564) as sim:
        RemoteRuntime([sim.entry])            # "URL#TOKEN"
        sim.fail_next("CUDA out of memory")   # the next prompt ends in an execution_error
        sim.hang(); sim.resume()              # stops answering anything, like SIGSTOP; then goes on
        sim.die()                             # the server closes: connections are refused
        sim.records(), sim.idle_gaps()        # per-prompt times, and idle time between prompts

mode="thread" (default) runs the aiohttp server on its own event loop in a background thread;
mode="process" runs it as `python tests/sim_comfy.py CONFIG_JSON` (hang = SIGSTOP, die = SIGKILL),
which keeps a benchmark's client free of the simulator's share of the GIL. plain=True leaves out
the /imagegen/* routes: a plain ComfyUI server. Times are time.monotonic() (system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

CONFIG_FIELDS = ("name", "token", "step_seconds", "load_seconds", "finish_seconds", "device", "gpu_name", "gpu_uuid",
                 "memory_total_mib", "memory_free_mib", "model_mib", "plain")
SETTABLE = ("step_seconds", "load_seconds", "finish_seconds", "memory_free_mib", "memory_total_mib", "model_mib")
MODEL_INPUTS = ("ckpt_name", "unet_name")
SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom")


@dataclass
class SimConfig:
    name: str = "sim"
    token: str | None = None                 # None: no authentication (a plain ComfyUI)
    step_seconds: float | Callable = 0.01    # or f(width, height, batch_size) -> seconds per step
    load_seconds: float = 0.0                # when the prompt's model is not the loaded one
    finish_seconds: float = 0.0              # decode + save
    device: str = "cuda"
    gpu_name: str = "Simulated GPU"
    gpu_uuid: str = ""
    memory_total_mib: int = 24576
    memory_free_mib: int | None = None       # None: the total, less the loaded model's model_mib
    model_mib: dict = field(default_factory=dict)  # model file -> MiB; larger than the GPU: out of memory
    plain: bool = False
    comfyui_version: str = "0.3.75"          # what /system_stats and /imagegen/info report
    samplers: tuple = ()                     # KSampler's sampler_name choices in /object_info; () the pinned list
    schedulers: tuple = ()                   # its scheduler choices; () the pinned list
    combo_inputs: bool = False               # /object_info in the newer ["COMBO", {"options": [...]}] style

    def __post_init__(self):
        self.gpu_uuid = self.gpu_uuid or f"GPU-sim-{uuid.uuid4()}"


class _Interrupted(Exception):
    pass


class _Failure(Exception):
    def __init__(self, message: str, exception_type: str, node: str | None, node_type: str | None):
        super().__init__(message)
        self.exception_type, self.node, self.node_type = exception_type, node, node_type


def describe_graph(graph: dict) -> dict:
    """What the simulation needs from an API-format graph: model, size, batch, steps and node ids."""
    found = {"model": None, "width": 512, "height": 512, "batch_size": 1, "steps": 1, "loader": None, "sampler": None,
             "decode": None, "save": None, "prefix": "ComfyUI"}
    for node_id, node in graph.items():
        kind, inputs = node.get("class_type"), node.get("inputs") or {}
        for key in MODEL_INPUTS:
            if isinstance(inputs.get(key), str):
                found["model"], found["loader"] = inputs[key], (node_id, kind)
        if kind in ("EmptyLatentImage", "EmptySD3LatentImage", "ImageScale"):
            found["width"], found["height"] = int(inputs.get("width", 512)), int(inputs.get("height", 512))
        if isinstance(inputs.get("batch_size"), int):
            found["batch_size"] = inputs["batch_size"]
        if kind == "RepeatLatentBatch":
            found["batch_size"] = int(inputs.get("amount", 1))
        if isinstance(inputs.get("steps"), int):
            found["steps"] = inputs["steps"]
        if kind in SAMPLERS:
            found["sampler"] = (node_id, kind)
        if kind == "VAEDecode":
            found["decode"] = (node_id, kind)
        if kind in ("SaveImage", "PreviewImage"):
            found["save"] = (node_id, kind)
            found["prefix"] = inputs.get("filename_prefix", "ComfyUI")
    return found


def png_bytes(width: int, height: int, seed_text: str) -> bytes:
    from PIL import Image

    digest = hashlib.sha256(seed_text.encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    image.paste(tuple(digest[3:6]), (0, 0, max(1, width // 2), max(1, height // 2)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


class SimServer:
    """The aiohttp application and the simulated execution queue; lives on one event loop."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.object_info_requests = 0
        self.pending: list[dict] = []
        self.running: dict | None = None
        self.history: dict[str, dict] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.counters: dict[tuple[str, str], int] = {}
        self.sockets: dict[str, set] = {}
        self.records: list[dict] = []
        self.loaded_model: str | None = None
        self.last_model: str | None = None    # as the worker proxy notes it: the last submitted prompt's model
        self.failures: list[str] = []
        self.number = 0
        self.jobs_done = 0
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.interrupt_id: str | None = None
        self.wake: asyncio.Event | None = None
        self.runner = None
        self.executor = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        from aiohttp import web

        self.wake = asyncio.Event()
        app = web.Application(client_max_size=256 * 1024 ** 2)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.executor = asyncio.ensure_future(self.execute_loop())
        return self.port

    async def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.cancel()
        for sockets in list(self.sockets.values()):
            for ws in list(sockets):
                await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # --- HTTP -----------------------------------------------------------------------
    def authorized(self, request) -> bool:
        import hmac

        if not self.config.token:
            return True
        return hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                   f"Bearer {self.config.token}".encode())

    async def handle(self, request):
        from aiohttp import web

        path, method = request.path, request.method
        if path.startswith("/imagegen/") and self.config.plain:
            return web.Response(status=404, text="404: Not Found")
        if path == "/imagegen/health":
            return web.json_response({"ready": True})
        if not self.authorized(request):
            return web.json_response({"error": "missing or wrong worker token"}, status=401)
        if method == "OPTIONS":
            return web.Response(status=403)
        if path == "/imagegen/info":
            return web.json_response(self.info())
        if path.startswith("/sim/"):
            return await self.control(request)
        self.last_activity = time.monotonic()
        if path == "/ws":
            return await self.websocket(request)
        if path == "/prompt" and method == "POST":
            return await self.post_prompt(request)
        if path == "/queue" and method == "GET":
            return web.json_response(self.queue_state())
        if path == "/queue" and method == "POST":
            body = await request.json()
            drop = set(body.get("delete") or [])
            if body.get("clear"):
                drop |= {item["id"] for item in self.pending}
            self.pending = [item for item in self.pending if item["id"] not in drop]
            return web.Response(status=200)
        if path == "/interrupt" and method == "POST":
            body = await request.json() if request.can_read_body else {}
            wanted = (body or {}).get("prompt_id")
            if self.running and (wanted is None or wanted == self.running["id"]):
                self.interrupt_id = self.running["id"]
            return web.Response(status=200)
        if path.startswith("/history"):
            wanted = path[len("/history/"):] if path.startswith("/history/") else None
            if wanted:
                return web.json_response({wanted: self.history[wanted]} if wanted in self.history else {})
            return web.json_response(self.history)
        if path == "/view":
            key = (request.query.get("type", "output"), request.query.get("subfolder", ""),
                   request.query.get("filename", ""))
            if key not in self.files:
                return web.Response(status=404)
            return web.Response(body=self.files[key], content_type="image/png")
        if path == "/upload/image" and method == "POST":
            return await self.upload(request)
        if path == "/system_stats":
            return web.json_response(self.system_stats())
        if path in ("/object_info", "/object_info/KSampler"):
            self.object_info_requests += 1
            return web.json_response(self.object_info())
        return web.Response(status=404, text="404: Not Found")

    def memory_free(self) -> int:
        if self.config.memory_free_mib is not None:
            return int(self.config.memory_free_mib)
        return max(0, int(self.config.memory_total_mib) - int(self.config.model_mib.get(self.loaded_model, 0)))

    def busy(self) -> bool:
        return bool(self.running or self.pending or any(self.sockets.values()))

    def info(self) -> dict:
        c = self.config
        gpu = {"name": c.gpu_name, "uuid": c.gpu_uuid, "memory_total_mib": int(c.memory_total_mib),
               "memory_free_mib": self.memory_free()} if c.device == "cuda" else None
        return {"imagegen_version": "sim", "comfyui_version": c.comfyui_version, "device": c.device, "pid": os.getpid(),
                "comfy_pid": None, "ready": True, "gpu": gpu, "name": c.name,
                "idle_seconds": 0.0 if self.busy() else round(time.monotonic() - self.last_activity, 1),
                "keep_warm": 0, "last_model": self.last_model, "jobs_done": self.jobs_done, "started": self.started,
                "cuda_visible_devices": "0" if c.device == "cuda" else ""}

    def object_info(self) -> dict:
        """KSampler's definition: the sampler and scheduler choices, in 0.3.x's or the newer input style."""
        from imagegen.comfy import choices

        c = self.config
        samplers, schedulers = list(c.samplers or choices.SAMPLERS), list(c.schedulers or choices.SCHEDULERS)
        if c.combo_inputs:
            sampler_spec, scheduler_spec = ["COMBO", {"options": samplers}], ["COMBO", {"options": schedulers}]
        else:
            sampler_spec, scheduler_spec = [samplers, {}], [schedulers, {}]
        return {"KSampler": {"input": {"required": {"sampler_name": sampler_spec, "scheduler": scheduler_spec}},
                             "name": "KSampler", "output": ["LATENT"]}}

    def system_stats(self) -> dict:
        c = self.config
        if c.device == "cuda":
            device = {"name": f"cuda:0 {c.gpu_name} : cudaMallocAsync", "type": "cuda", "index": 0,
                      "vram_total": int(c.memory_total_mib) * 2 ** 20, "vram_free": self.memory_free() * 2 ** 20,
                      "torch_vram_total": 0, "torch_vram_free": 0}
        else:
            device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                      "torch_vram_total": 0, "torch_vram_free": 0}
        return {"system": {"os": "posix", "ram_total": 64 * 2 ** 30, "ram_free": 32 * 2 ** 30,
                           "comfyui_version": c.comfyui_version,
                           "python_version": sys.version, "pytorch_version": "sim", "embedded_python": False,
                           "argv": ["main.py"]},
                "devices": [device]}

    def queue_state(self) -> dict:
        def row(item):
            return [item["number"], item["id"], item["graph"], {"client_id": item["client_id"]}, item["outputs"]]
        return {"queue_running": [row(self.running)] if self.running else [],
                "queue_pending": [row(i) for i in self.pending]}

    async def post_prompt(self, request):
        from aiohttp import web

        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"type": "invalid_prompt", "message": "Invalid JSON", "details": "",
                                                "extra_info": {}},
                                      "node_errors": {}}, status=400)
        graph = body.get("prompt")
        if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
            return web.json_response({"error": {"type": "invalid_prompt",
                                                "message": "Cannot execute because a node is missing the class_type "
                                                "property.",
                                                "details": "", "extra_info": {}}, "node_errors": {}}, status=400)
        described = describe_graph(graph)
        if described["save"] is None:
            return web.json_response({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                                "details": "",
                                                "extra_info": {}}, "node_errors": {}}, status=400)
        prompt_id = body.get("prompt_id") or str(uuid.uuid4())
        self.number += 1
        if described["model"]:
            self.last_model = described["model"]
        self.jobs_done += 1
        self.pending.append({"id": prompt_id, "number": self.number, "graph": graph, "client_id": body.get("client_id"),
                             "outputs": [described["save"][0]], "described": described, "submitted": time.monotonic()})
        self.wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    async def upload(self, request):
        from aiohttp import web

        form = await request.post()
        image = form.get("image")
        if image is None or not hasattr(image, "file"):
            return web.Response(status=400)
        subfolder, kind = str(form.get("subfolder", "")), str(form.get("type", "input"))
        self.files[(kind, subfolder, image.filename)] = image.file.read()
        return web.json_response({"name": image.filename, "subfolder": subfolder, "type": kind})

    async def websocket(self, request):
        from aiohttp import web

        client_id = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self.sockets.setdefault(client_id, set()).add(ws)
        try:
            await ws.send_str(json.dumps({"type": "status", "data": {"status": {"exec_info": {
                "queue_remaining": len(self.pending) + bool(self.running)}}, "sid": client_id}}))
            async for _message in ws:
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.sockets.get(client_id, set()).discard(ws)
            if not self.sockets.get(client_id):
                self.sockets.pop(client_id, None)
            self.last_activity = time.monotonic()
        return ws

    async def send(self, client_id: str | None, kind: str, data: dict) -> None:
        text = json.dumps({"type": kind, "data": data})
        for ws in list(self.sockets.get(client_id, ())):
            try:
                await ws.send_str(text)
            except Exception:  # noqa: BLE001 - a closing socket: the client reads /history anyway
                pass

    async def control(self, request):
        """For mode="process": /sim/stats, and POST /sim/control {"fail_next": MESSAGE} or {"set": {...}}."""
        from aiohttp import web

        if request.path == "/sim/stats":
            return web.json_response({"records": self.records, "loaded_model": self.loaded_model})
        body = await request.json()
        if "fail_next" in body:
            self.failures.append(body["fail_next"])
        for key, value in (body.get("set") or {}).items():
            if key in SETTABLE:
                setattr(self.config, key, value)
        return web.json_response({"ok": True})

    # --- the simulated execution ------------------------------------------------------
    async def execute_loop(self) -> None:
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            item = self.pending.pop(0)
            self.running = item
            try:
                await self.execute(item)
            finally:
                self.running = None
                self.interrupt_id = None
                self.last_activity = time.monotonic()

    def step_time(self, described: dict) -> float:
        step = self.config.step_seconds
        return float(step(described["width"], described["height"], described["batch_size"]) if callable(step) else step)

    async def execute(self, item: dict) -> None:
        prompt_id, client_id, graph, d = item["id"], item["client_id"], item["graph"], item["described"]
        record = {"prompt_id": prompt_id, "worker": self.config.name, "model": d["model"], "width": d["width"],
                  "height": d["height"], "batch_size": d["batch_size"], "steps": d["steps"],
                  "submitted": item["submitted"],
                  "started": time.monotonic(), "loaded": False}
        messages: list = []

        async def emit(kind: str, data: dict, keep: bool = False) -> None:
            data = {**data, "prompt_id": prompt_id}
            if keep:
                messages.append([kind, {**data, "timestamp": int(time.time() * 1000)}])
            await self.send(client_id, kind, data)

        def node(pair):
            return pair[0] if pair else None

        outputs: dict = {}
        status = "success"
        await emit("execution_start", {"timestamp": int(time.time() * 1000)}, keep=True)
        await emit("execution_cached", {"nodes": []}, keep=True)
        try:
            await emit("executing", {"node": node(d["loader"]), "display_node": node(d["loader"])})
            needed = int(self.config.model_mib.get(d["model"], 0))
            if needed > int(self.config.memory_total_mib):
                raise _Failure(f"CUDA out of memory. Tried to allocate {needed} MiB; the GPU has "
                               f"{self.config.memory_total_mib} MiB",
                               "torch.OutOfMemoryError", node(d["loader"]), (d["loader"] or (None, None))[1])
            if d["model"] != self.loaded_model:
                record["loaded"] = True
                self.loaded_model = None
                await asyncio.sleep(self.config.load_seconds)
                self.loaded_model = d["model"]
            if self.failures:
                raise _Failure(self.failures.pop(0), "RuntimeError", node(d["sampler"]),
                               (d["sampler"] or (None, None))[1])
            await emit("executing", {"node": node(d["sampler"]), "display_node": node(d["sampler"])})
            per_step = self.step_time(d)
            started = time.monotonic()
            for step in range(1, d["steps"] + 1):
                if self.interrupt_id == prompt_id:
                    raise _Interrupted()
                # sleep to the step's due time, so event sending does not add up over many steps
                await asyncio.sleep(max(0.0, started + step * per_step - time.monotonic()))
                await emit("progress", {"value": step, "max": d["steps"], "node": node(d["sampler"])})
            await emit("executing", {"node": node(d["decode"]), "display_node": node(d["decode"])})
            await asyncio.sleep(self.config.finish_seconds)
            images = self.save(d, graph, prompt_id)
            outputs = {d["save"][0]: {"images": images}}
            await emit("executing", {"node": d["save"][0], "display_node": d["save"][0]})
            await emit("executed", {"node": d["save"][0], "display_node": d["save"][0], "output": {"images": images}})
            await emit("execution_success", {"timestamp": int(time.time() * 1000)}, keep=True)
        except _Interrupted:
            status = "error"
            await emit("execution_interrupted",
                       {"node_id": node(d["sampler"]), "node_type": (d["sampler"] or (None, None))[1],
                                                 "executed": [], "timestamp": int(time.time() * 1000)}, keep=True)
        except _Failure as failure:
            status = "error"
            await emit("execution_error", {"node_id": failure.node, "node_type": failure.node_type, "executed": [],
                                           "exception_message": str(failure), "exception_type": failure.exception_type,
                                           "traceback": [], "current_inputs": {}, "current_outputs": {}}, keep=True)
        record.update(finished=time.monotonic(), status=status)
        self.history[prompt_id] = {
            "prompt": [item["number"], prompt_id, graph, {"client_id": client_id}, item["outputs"]], "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages}, "meta": {}}
        self.records.append(record)
        await emit("executing", {"node": None})  # after /history holds the result, as in ComfyUI
        await self.send(client_id, "status", {"status": {"exec_info": {"queue_remaining": len(self.pending)}}})

    def save(self, d: dict, graph: dict, prompt_id: str) -> list[dict]:
        subfolder, _, stem = str(d["prefix"]).rpartition("/")
        seed = next((n["inputs"].get("seed", n["inputs"].get("noise_seed")) for n in graph.values()
                     if "seed" in n.get("inputs", {}) or "noise_seed" in n.get("inputs", {})), 0)
        images = []
        for index in range(d["batch_size"]):
            counter = self.counters.get((subfolder, stem), 0) + 1
            self.counters[(subfolder, stem)] = counter
            filename = f"{stem}_{counter:05}_.png"
            self.files[("output", subfolder, filename)] = png_bytes(d["width"], d["height"],
                                                                    f"{prompt_id}|{seed}|{index}")
            images.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        return images


def idle_gaps(records: list[dict]) -> list[float]:
    """Seconds the worker sat idle between finishing one prompt and starting the next."""
    ordered = sorted(records, key=lambda r: r["started"])
    return [max(0.0, b["started"] - a["finished"]) for a, b in zip(ordered, ordered[1:], strict=False)]


def run_graph(client, graph: dict, timeouts=None, on_progress=None) -> dict:
    """Submit one graph and wait for its /history entry: ComfyClient.stream with one graph."""
    [(_, entry)] = list(client.stream([graph], timeouts, on_progress))
    return entry


class SimWorker:
    """Start and stop a simulated worker; see the module's docstring."""

    def __init__(self, mode: str = "thread", **config):
        if mode not in ("thread", "process"):
            raise ValueError("mode is thread or process")
        config.setdefault("token", secrets.token_urlsafe(16))
        self.mode, self.config = mode, SimConfig(**config)
        if mode == "process" and callable(self.config.step_seconds):
            raise ValueError("mode='process' takes a number of seconds per step, not a function")
        self.server: SimServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.process: subprocess.Popen | None = None
        self.frozen = threading.Event()
        self.dead = False
        self.final_records: list[dict] | None = None
        self.port = 0

    @property
    def token(self) -> str | None:
        return self.config.token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entry(self) -> str:
        """This worker as an IMAGEGEN_REMOTE_WORKERS entry: URL#TOKEN."""
        return f"{self.url}#{self.token}" if self.token else self.url

    def __enter__(self) -> SimWorker:
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def start(self) -> None:
        if self.mode == "process":
            self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                             json.dumps(asdict(self.config))],
                                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the simulated worker exited with {self.process.wait()}")
            self.port = json.loads(line)["port"]
            return
        self.loop = asyncio.new_event_loop()
        self.server = SimServer(self.config)
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"sim-{self.config.name}", daemon=True)
        self.thread.start()
        self.port = self._call(self.server.start())

    def _call(self, coroutine, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _control(self, body: dict) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.post(f"{self.url}/sim/control", json=body, headers=headers, timeout=10).json()

    # --- faults and settings ----------------------------------------------------------
    def fail_next(self, message: str = "simulated failure") -> None:
        """The next prompt to run ends in an execution_error with this exception message."""
        if self.mode == "process":
            self._control({"fail_next": message})
        else:
            self.loop.call_soon_threadsafe(self.server.failures.append, message)

    def set(self, **values) -> None:
        """Change step_seconds, load_seconds, finish_seconds, memory_*_mib or model_mib while it runs."""
        unknown = set(values) - set(SETTABLE)
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}")
        if self.mode == "process":
            self._control({"set": values})
        else:
            for key, value in values.items():
                self.loop.call_soon_threadsafe(setattr, self.config, key, value)

    def hang(self) -> None:
        """Stop answering everything (HTTP, websocket, execution), as a SIGSTOPped process does."""
        if self.mode == "process":
            os.kill(self.process.pid, signal.SIGSTOP)
            return
        self.frozen.clear()
        self.loop.call_soon_threadsafe(self.frozen.wait)

    def resume(self) -> None:
        if self.mode == "process":
            os.kill(self.process.pid, signal.SIGCONT)
        else:
            self.frozen.set()

    def die(self) -> None:
        """The server goes away: open connections close, new ones are refused."""
        if self.dead:
            return
        if self.mode == "process":
            try:
                self.final_records = self.records()
            except Exception:  # noqa: BLE001 - a hung process: its records are lost, like a crash's
                self.final_records = []
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        else:
            self.frozen.set()
            self._call(self.server.shutdown())
        self.dead = True

    # --- instrumentation -------------------------------------------------------------
    def records(self) -> list[dict]:
        """One dict per finished prompt: prompt_id, model, width, height, batch_size, steps, submitted, started,
        finished (time.monotonic()), loaded (whether it paid the load time), status."""
        if self.mode == "thread":
            return [dict(r) for r in list(self.server.records)]  # a list copy is atomic under the GIL
        if self.dead:
            return list(self.final_records or [])
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.get(f"{self.url}/sim/stats", headers=headers, timeout=10).json()["records"]

    def idle_gaps(self) -> list[float]:
        return idle_gaps(self.records())

    def close(self) -> None:
        if self.mode == "process":
            if self.process is not None and self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGCONT)
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            if self.process is not None and self.process.stdout:
                self.process.stdout.close()
            return
        if self.loop is None:
            return
        self.frozen.set()
        if not self.dead:
            try:
                self._call(self.server.shutdown())
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.dead = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.loop = None


def _serve_forever(config: dict) -> None:
    async def main() -> None:
        server = SimServer(SimConfig(**config))
        port = await server.start()
        print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.shutdown()

    asyncio.run(main())


if __name__ == "__main__":
    _serve_forever(json.loads(sys.argv[1]))
