"""Shared pieces of bench/overhead.py, bench/cold_start.py and bench/model_load.py.

The machine line, the load average, the tiny checkpoint, a bare ComfyUI started by hand, a
minimal ComfyUI client (what a person's own script would do: POST /prompt, wait on the
websocket, GET /history, GET /view, write the file), and the writer of one marked section of
docs/benchmarks.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
PYTHON = "~/.cache/imagegen-dev/venv/bin/python"
# a worker's ComfyUI answers only requests carrying its secret (imagegen/comfy_launch.py)
UPSTREAM_HEADER = "X-Imagegen-Upstream"
ENV_PREFIX = "IMAGEGEN_COMFYUI_DIR=~/.cache/imagegen-dev/comfyui-<commit>"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float = 1.5, patience: float = 120.0) -> float:
    """Wait (up to `patience` s) for the 1-minute load average to fall under `limit`; returns it."""
    deadline = time.monotonic() + patience
    load = load_average()
    while load > limit and time.monotonic() < deadline:
        log(f"load average {load:.2f} > {limit}: waiting for the machine to quieten")
        time.sleep(10)
        load = load_average()
    if load > limit:
        log(f"warning: load average still {load:.2f}: other work on this machine will skew the figures")
    return load


def _busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _task_cpu(pid: int) -> float:
    """CPU seconds of a live process, all threads (schedstat: nanoseconds)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


class OtherLoad:
    """The share of the machine's CPU that processes outside the benchmark used while it ran: all busy
    CPU time (/proc/stat) minus this process, its reaped children and the live processes it names."""

    def __init__(self, live_pids=lambda: [], accounted=lambda: 0.0):
        self.live_pids, self.accounted = live_pids, accounted  # accounted: CPU seconds of processes gone meanwhile

    def _own(self) -> float:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.process_time() + children.ru_utime + children.ru_stime + self.accounted()
                + sum(_task_cpu(pid) for pid in self.live_pids()))

    def __enter__(self) -> OtherLoad:
        self.started, self.busy, self.own = time.monotonic(), _busy_seconds(), self._own()
        return self

    def __exit__(self, *_exc) -> None:
        elapsed = time.monotonic() - self.started
        other = (_busy_seconds() - self.busy) - (self._own() - self.own)
        self.share = max(0.0, other) / (elapsed * (os.cpu_count() or 1))

    def describe(self) -> str:
        return f"other processes used {self.share:.0%} of the CPU meanwhile"


def machine() -> str:
    model, memory = "unknown CPU", 0.0
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
        memory = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2 ** 20
    except (OSError, AttributeError):
        pass
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "absent"
    from imagegen.util.gpus import list_gpus

    gpus = list_gpus()
    gpu = ", ".join(f"{g.name} ({g.memory_total_mib // 1024} GiB)" for g in gpus) if gpus else "no GPU"
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, {gpu}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch}")


def comfyui_version() -> str:
    from imagegen import COMFYUI_COMMIT, COMFYUI_VERSION

    return f"ComfyUI {COMFYUI_VERSION} ({COMFYUI_COMMIT[:10]})"


def now_stamp() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def comfyui_dir() -> Path:
    from imagegen.runtimes.local import find_comfyui_dir

    return find_comfyui_dir()


def tiny_checkpoint() -> Path:
    """The tiny random-weight SD1.5 checkpoint the tests use (built once if missing)."""
    fixtures = Path(os.environ.get("IMAGEGEN_DEV_CACHE") or REPO / ".cache") / "fixtures"  # as tests/conftest.py
    target = fixtures / "tiny-sd15.safetensors"
    if not target.is_file():
        log(f"building the tiny SD1.5 checkpoint at {target}")
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_models.py"), "sd15", str(target)], check=True)
    return target


def sampling_seconds(marks: dict) -> float | None:
    """First progress event → the first node that runs after the last one: the span the client's
    `sampling` phase covers (steps - 1 steps), from a BareClient.run's marks."""
    if "first_progress" not in marks:
        return None
    after = [t for _node, t in marks.get("nodes", []) if t > marks["last_progress"]]
    return (after[0] if after else marks["done"]) - marks["first_progress"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """median [p25–p75] in ms"""
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return f"{statistics.median(ordered) * 1000:.0f} [{q[0] * 1000:.0f}–{q[2] * 1000:.0f}]"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|".join("---" if i == 0 else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, section: str) -> None:
    """Replace the section between <!-- NAME:start --> and <!-- NAME:end --> in docs/benchmarks.md,
    appending it (or creating the file) when it is not there; other sections are left alone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    if DOC.is_file():
        text = DOC.read_text(encoding="utf-8")
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = ("# Benchmarks\n\nWhat imagegen's own benchmarks (in `bench/`) measured, with the command that "
                "reproduces each\n"
                "section. Each section is rewritten by its script.\n\n" + block + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    log(f"wrote the {name!r} section of {DOC}")


# --- a ComfyUI started by hand --------------------------------------------------------------

def free_port() -> int:
    from imagegen.worker.serve import free_port as pick

    return pick()


def bare_comfy_command(port: int, work: Path, models_dir: Path, device: str = "cpu",
                       extra: tuple[str, ...] = ()) -> list[str]:
    """`python main.py [--cpu] --listen 127.0.0.1 --port P` with the worker's own flags (model paths,
    folders, no custom nodes, no previews): the same server, started by hand, without imagegen."""
    from imagegen.worker.serve import write_model_paths

    for name in ("output", "input", "temp", "user"):
        (work / name).mkdir(parents=True, exist_ok=True)
    config = write_model_paths(models_dir, work / "extra_model_paths.yaml")
    return [sys.executable, str(comfyui_dir() / "main.py"), *(["--cpu"] if device == "cpu" else []), "--listen",
            "127.0.0.1", "--port", str(port),
            "--disable-auto-launch", "--disable-all-custom-nodes", "--disable-api-nodes",
            "--extra-model-paths-config", str(config), "--output-directory", str(work / "output"),
            "--input-directory", str(work / "input"), "--temp-directory", str(work / "temp"),
            "--user-directory", str(work / "user"), "--database-url", "sqlite:///:memory:", "--preview-method", "none",
            *extra]


def start_bare_comfy(port: int, work: Path, models_dir: Path, log_path: Path, device: str = "cpu",
                     gpu: str = "0") -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="" if device == "cpu" else gpu)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # what LocalRuntime gives one CPU worker
    with open(log_path, "ab") as out:
        return subprocess.Popen(bare_comfy_command(port, work, models_dir, device), cwd=str(comfyui_dir()), env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, timeout: float = 180.0, interval: float = 0.05,
              process: subprocess.Popen | None = None) -> float:
    """Poll `url` until it answers 200; returns time.monotonic() at that moment."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return time.monotonic()
        except requests.RequestException:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def stop_process(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class BareClient:
    """What a minimal script does against ComfyUI: one HTTP session and one websocket, kept open;
    per image POST /prompt, wait for `executing` node=None of that prompt, GET /history, GET /view,
    write the PNG. With `token` it talks to a worker's proxy instead (same requests + bearer); `headers`
    go with every request (a worker's own ComfyUI wants its upstream secret)."""

    def __init__(self, base_url: str, token: str | None = None, headers: dict | None = None):
        import requests

        self.base = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        self.http.headers.update(headers)
        self.header = [f"{name}: {value}" for name, value in headers.items()]
        self.ws = None
        self.connect()

    def connect(self) -> None:
        import websocket

        if self.ws is not None:
            self.ws.close()
        self.ws = websocket.create_connection("ws" + self.base[4:] + f"/ws?clientId={self.client_id}",
                                              header=self.header, timeout=600)

    def prepare(self) -> None:
        """Between images (untimed): read what queued up while idle, answering the server's pings,
        and reconnect when the server dropped the idle socket (the worker proxy pings every 20 s)."""
        import websocket

        self.ws.settimeout(0.001)
        try:
            while True:
                message = self.ws.recv()
                if message == "":  # a close frame
                    raise websocket.WebSocketConnectionClosedException()
        except websocket.WebSocketTimeoutException:
            pass
        except (websocket.WebSocketConnectionClosedException, OSError):
            self.connect()
        finally:
            if self.ws is not None:
                self.ws.settimeout(600)

    def close(self) -> None:
        self.ws.close()
        self.http.close()

    def run(self, graph: dict, out: Path | None = None, marks: dict | None = None) -> dict:
        """Render one graph; returns its /history entry. `marks` gets monotonic times of the
        websocket events (execution_start, first progress, last progress, executing None) and of
        the fetch and the write."""
        marks = marks if marks is not None else {}
        marks["submit"] = time.monotonic()
        response = self.http.post(self.base + "/prompt", json={"prompt": graph, "client_id": self.client_id})
        response.raise_for_status()
        prompt_id = response.json()["prompt_id"]
        marks["posted"] = time.monotonic()
        while True:
            message = self.ws.recv()
            if not isinstance(message, str):
                continue
            data = json.loads(message)
            kind, body = data.get("type"), data.get("data") or {}
            if body.get("prompt_id") != prompt_id:
                continue
            now = time.monotonic()
            if kind == "execution_start":
                marks["execution_start"] = now
            elif kind == "progress":
                marks.setdefault("first_progress", now)
                marks["last_progress"] = now
            elif kind == "executing" and body.get("node") is not None:
                marks.setdefault("nodes", []).append((body["node"], now))
            elif kind == "execution_error":
                raise RuntimeError(f"ComfyUI failed: {body.get('exception_message')}")
            elif kind == "executing" and body.get("node") is None:
                marks["done"] = now
                break
        entry = self.http.get(self.base + f"/history/{prompt_id}").json()[prompt_id]
        marks["history"] = time.monotonic()
        for node_output in entry.get("outputs", {}).values():
            for ref in node_output.get("images", []):
                data = self.http.get(self.base + "/view",
                                     params={"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                                                  "type": ref.get("type", "output")}).content
                marks["fetched"] = time.monotonic()
                if out is not None:
                    out.write_bytes(data)
                marks["written"] = time.monotonic()
        return entry
