"""A client for one ComfyUI server (through a worker's authenticating proxy).

Submission over HTTP, progress over the websocket filtered by prompt_id, and completion taken
from /history, so a dropped websocket costs progress display, never the result.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from imagegen.comfy import choices
from imagegen.util.errors import ImagegenError

TOKEN_HEADER = "Authorization"

# What each worker's ComfyUI is, asked once per process: {(url, token): {"version": ..., "choices": ...}}.
_FACTS: dict[tuple[str, str | None], dict] = {}


@dataclass
class Timeouts:
    """Phase budgets in seconds. `load` runs from execution start to the first sampling step."""
    queue: float = 3600.0
    load: float = 600.0
    stall: float = 120.0
    overall: float = 7200.0


@dataclass
class Progress:
    phase: str = "queued"       # queued, loading, sampling, finishing, done
    node: str | None = None
    step: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    phase_times: dict = field(default_factory=dict)


EventHandler = Callable[[Progress], None]


def _describe_node_errors(payload: dict) -> str:
    lines = []
    error = payload.get("error") or {}
    if isinstance(error, dict) and error.get("message"):
        lines.append(error["message"] + (f": {error['details']}" if error.get("details") else ""))
    for node_id, node in (payload.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            detail = item.get("details") or item.get("message")
            lines.append(f"node {node_id!r} ({node.get('class_type')}): {detail}")
    return "; ".join(lines) or json.dumps(payload)[:500]


class ComfyClient:
    def __init__(self, base_url: str, token: str | None = None, request_timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.request_timeout = request_timeout
        self.http = requests.Session()
        if token:
            self.http.headers[TOKEN_HEADER] = f"Bearer {token}"

    # --- plain HTTP -------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", self.request_timeout)
        try:
            return self.http.request(method, self.base_url + path, **kwargs)
        except requests.ConnectionError as exc:
            raise ImagegenError("worker_unreachable",
                                f"cannot reach the worker at {self.base_url}: {exc.__class__.__name__}") from exc
        except requests.Timeout as exc:
            raise ImagegenError("worker_unreachable", f"the worker at {self.base_url} did not answer {path} "
                                                      f"within {kwargs['timeout']:.0f}s") from exc

    def _json(self, method: str, path: str, **kwargs):
        response = self._request(method, path, **kwargs)
        if response.status_code in (401, 403):
            raise ImagegenError("worker_unreachable",
                                f"the worker refused our credentials ({response.status_code} on {path})",
                                hint="Another process may own this port; run `imagegen stop --all` and try again.")
        if response.status_code >= 500:
            raise ImagegenError("worker_unreachable", f"the worker at {self.base_url} answered {response.status_code} "
                                                      f"on {path}: ComfyUI is not answering")
        response.raise_for_status()
        return response.json()

    def worker_info(self) -> dict:
        """The imagegen worker's own status: device, GPU, last model used, idle time, jobs done.
        Empty for a plain ComfyUI server, which has no such endpoint."""
        try:
            info = self._json("GET", "/imagegen/info")
        except requests.HTTPError as error:
            if error.response is not None and error.response.status_code == 404:
                return {}
            raise
        if isinstance(info, dict) and info.get("comfyui_version"):  # the worker read it from ComfyUI's /system_stats
            self._facts().setdefault("version", str(info["comfyui_version"]))
        return info

    def system_stats(self) -> dict:
        return self._json("GET", "/system_stats")

    def _facts(self) -> dict:
        return _FACTS.setdefault((self.base_url, self.token), {})

    def comfyui_version(self) -> str | None:
        """The worker's ComfyUI version (/system_stats system.comfyui_version), asked once per process;
        None when it does not say."""
        facts = self._facts()
        if "version" not in facts:
            try:
                version = (self.system_stats().get("system") or {}).get("comfyui_version")
            except (ImagegenError, requests.RequestException, ValueError):
                return None  # not remembered: the next image asks again
            facts["version"] = str(version) if version else None
        return facts["version"]

    def choices(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(samplers, schedulers) this worker's ComfyUI offers, from KSampler's inputs in its
        /object_info, asked once per process; None when it cannot tell."""
        facts = self._facts()
        if "choices" not in facts:
            try:
                facts["choices"] = choices.from_object_info(self.object_info("KSampler"))
            except (ImagegenError, requests.RequestException, ValueError):
                return None
        return facts["choices"]

    def check_choices(self, graph: dict) -> None:
        """Refuse (invalid_argument) a graph whose sampler or scheduler this worker's ComfyUI lacks,
        listing the worker's names. Graphs that use only the pinned ComfyUI's names cost no request:
        a worker without one of those rejects the graph itself (graph_rejected, with its list)."""
        if choices.pinned_only(graph):
            return
        offered = self.choices()
        if offered is None:
            return  # cannot tell: ComfyUI validates the graph itself
        version = self.comfyui_version()
        where = f"the worker's ComfyUI {version}" if version else "the worker's ComfyUI"
        choices.check_graph(graph, *offered, where=where)

    def log_entries(self) -> list[dict] | None:
        """ComfyUI's recent log entries ({t, m}: its /internal/logs/raw ring of the last 300 writes); None
        when the worker does not say (a ComfyUI without the route, a proxy that hides it)."""
        try:
            entries = self._json("GET", "/internal/logs/raw").get("entries")
        except (ImagegenError, requests.RequestException, ValueError, AttributeError):
            return None
        return entries if isinstance(entries, list) else None

    def object_info(self, node_class: str | None = None) -> dict:
        return self._json("GET", "/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self) -> dict:
        return self._json("GET", "/queue")

    def history(self, prompt_id: str) -> dict | None:
        return self._json("GET", f"/history/{prompt_id}").get(prompt_id)

    def cancel(self, prompt_ids: list[str], timeout: float = 2.0) -> None:
        """Drop these prompts from the queue and interrupt whichever of them runs (an interrupt names
        its prompt, so another client's job on a shared worker is left alone). Gives up at the first
        request that fails, so a hung worker cannot hold up the end of a call."""
        try:
            self._request("POST", "/queue", json={"delete": list(prompt_ids)}, timeout=timeout)
            for prompt_id in prompt_ids:
                self._request("POST", "/interrupt", json={"prompt_id": prompt_id}, timeout=timeout)
        except ImagegenError:
            pass

    def submit(self, graph: dict, client_id: str) -> str:
        self.check_choices(graph)
        response = self._request("POST", "/prompt", json={"prompt": graph, "client_id": client_id})
        if response.status_code == 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {"error": {"message": response.text[:500]}}
            raise ImagegenError("graph_rejected", f"ComfyUI rejected the workflow: {_describe_node_errors(payload)}",
                                node_errors=payload.get("node_errors"))
        if response.status_code in (401, 403):
            raise ImagegenError("worker_unreachable", f"the worker refused our credentials ({response.status_code})",
                                hint="Run `imagegen stop --all` and try again.")
        response.raise_for_status()
        payload = response.json()
        if payload.get("node_errors"):
            raise ImagegenError("graph_rejected", f"ComfyUI rejected the workflow: {_describe_node_errors(payload)}")
        return payload["prompt_id"]

    def fetch_file(self, ref: dict) -> bytes:
        params = {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": ref.get("type", "output")}
        response = self._request("GET", "/view", params=params, timeout=max(self.request_timeout, 120))
        response.raise_for_status()
        return response.content

    def upload_image(self, data: bytes, name: str, subfolder: str = "imagegen") -> str:
        """Put an image in the worker's input folder; returns the name LoadImage takes."""
        response = self._request("POST", "/upload/image", files={"image": (name, data, "image/png")},
                                 data={"overwrite": "true", "subfolder": subfolder, "type": "input"})
        response.raise_for_status()
        payload = response.json()
        return f"{payload['subfolder']}/{payload['name']}" if payload.get("subfolder") else payload["name"]

    # --- websocket ------------------------------------------------------------------
    def open_events(self, client_id: str):
        """A websocket for this client id, or None when it cannot be opened (we then poll)."""
        import websocket  # websocket-client; imported late to keep CLI start-up fast

        url = "ws" + self.base_url[len("http"):] + f"/ws?clientId={client_id}"
        header = [f"{TOKEN_HEADER}: Bearer {self.token}"] if self.token else []
        try:
            ws = websocket.create_connection(url, header=header, timeout=self.request_timeout)
            ws.settimeout(0.5)
            return ws
        except Exception:  # noqa: BLE001 - any failure means: fall back to polling
            return None

    def stream(self, graphs: list[dict], timeouts: Timeouts | None = None, on_progress: EventHandler | None = None):
        """Queue graphs, then yield (index, history entry) as each finishes."""
        with self.session(timeouts, on_progress) as session:
            order = {session.submit(graph): index for index, graph in enumerate(graphs)}
            while session.pending:
                prompt_id, entry = session.next_finished()
                yield order[prompt_id], entry

    def session(self, timeouts: Timeouts | None = None, on_progress: EventHandler | None = None,
                cancel=None) -> JobSession:
        return JobSession(self, timeouts or Timeouts(), on_progress, cancel)

    def running_ids(self) -> list[str]:
        return [item[1] for item in self.queue().get("queue_running", [])]

    @staticmethod
    def check(entry: dict) -> dict:
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            for name, body in status.get("messages", []):
                if name == "execution_error":
                    message = body.get("exception_message", "").strip()
                    lowered = message.lower()
                    memory = "out of memory" in lowered or ("allocation" in lowered and "memory" in lowered)
                    code = "out_of_memory" if memory else "execution_failed"
                    hint = None
                    if "mat1 and mat2 shapes cannot be multiplied" in message:
                        hint = ("The text encoder does not fit this model; "
                                "check the bundle with `imagegen models inspect`.")
                    node = f"node {body.get('node_id')!r} ({body.get('node_type')})"
                    raise ImagegenError(code, f"ComfyUI failed in {node}: {body.get('exception_type', '')}: {message}",
                                        hint=hint, node_type=body.get("node_type"))
                if name == "execution_interrupted":
                    raise ImagegenError("interrupted", "the job was interrupted on the worker")
            raise ImagegenError("execution_failed", "ComfyUI reported an error without details")
        return entry


def output_images(entry: dict) -> list[dict]:
    refs = []
    for node_output in entry.get("outputs", {}).values():
        refs.extend(node_output.get("images", []))
    return refs


class JobSession:
    """One websocket and many prompts: submit at any time, collect them as they finish.

    Each prompt has its own phase and stall clock. The websocket only feeds progress and wakes
    the session early; /history decides completion, so a dropped socket loses nothing. Leaving
    the session interrupts whatever is still pending.
    """

    def __init__(self, client: ComfyClient, timeouts: Timeouts, on_progress: EventHandler | None, cancel=None):
        self.client, self.timeouts, self.on_progress, self.cancel = client, timeouts, on_progress, cancel
        self.budgets: dict[str, Timeouts] = {}
        self.client_id = uuid.uuid4().hex
        self.events = None
        self.pending: list[str] = []
        self.states: dict[str, Progress] = {}
        self.clocks: dict[str, float] = {}
        self.started = time.monotonic()
        self.next_poll = 0.0

    def __enter__(self) -> JobSession:
        self.events = self.client.open_events(self.client_id)
        return self

    def __exit__(self, *_exc) -> None:
        if self.pending:
            self.client.cancel(self.pending)
        if self.events is not None:
            self.events.close()

    def submit(self, graph: dict, timeouts: Timeouts | None = None) -> str:
        prompt_id = self.client.submit(graph, self.client_id)
        self.budgets[prompt_id] = timeouts or self.timeouts
        self.pending.append(prompt_id)
        self.states[prompt_id] = Progress()
        self.clocks[prompt_id] = time.monotonic()
        return prompt_id

    def _enter(self, prompt_id: str, phase: str) -> None:
        state, now = self.states[prompt_id], time.monotonic()
        state.phase_times[state.phase] = state.phase_times.get(state.phase, 0.0) + now - state.started
        state.phase, state.started = phase, now
        self.clocks[prompt_id] = now

    def phase(self) -> str:
        active = [self.states[pid].phase for pid in self.pending if self.states[pid].phase != "queued"]
        return active[0] if active else "queued"

    def _check_budgets(self) -> None:
        now = time.monotonic()
        for prompt_id in self.pending:
            state, limits = self.states[prompt_id], self.budgets[prompt_id]
            phases = {"queued": limits.queue, "loading": limits.load, "running": limits.overall}
            budget = phases.get(state.phase, limits.stall)
            if now - self.clocks[prompt_id] > budget:
                quiet = now - self.clocks[prompt_id]
                raise ImagegenError("timeout", f"the job stalled in phase '{state.phase}': nothing happened for "
                                               f"{quiet:.0f}s (budget {budget:.0f}s)",
                                    hint=f"Raise the {state.phase} budget (IMAGEGEN_TIMEOUT_{state.phase.upper()}, "
                                         "see docs/timeouts.md), or check the worker log.",
                                    phase=state.phase)
        if now - self.started > self.timeouts.overall:
            raise ImagegenError("timeout", f"the jobs ran past the overall cap of {self.timeouts.overall:.0f}s",
                                hint="Raise --timeout, or use fewer steps or a smaller size.", phase="overall")

    def _receive(self) -> None:
        import websocket

        if self.events is None:
            time.sleep(0.25)
            return
        try:
            message = self.events.recv()
        except websocket.WebSocketTimeoutException:
            return
        except Exception:  # noqa: BLE001 - a dropped socket: carry on by polling /history
            self.events = None
            return
        if not isinstance(message, str):
            return  # binary frame: a preview image
        if not message:  # a close frame: the worker went away; /history tells what happened
            self.events = None
            return
        data = json.loads(message)
        kind, body = data.get("type"), data.get("data") or {}
        prompt_id = body.get("prompt_id")
        if prompt_id not in self.states or prompt_id not in self.pending:
            return
        state = self.states[prompt_id]
        if kind == "execution_start":
            self._enter(prompt_id, "loading")
        elif kind == "executing":
            state.node = body.get("node")
            self.clocks[prompt_id] = time.monotonic()
            if state.phase == "sampling" and state.step >= state.total:
                self._enter(prompt_id, "finishing")
            if state.node is None:
                self.next_poll = 0.0
        elif kind == "progress":
            if state.phase != "sampling":
                self._enter(prompt_id, "sampling")
            state.step, state.total = int(body.get("value", 0)), int(body.get("max", 0))
            self.clocks[prompt_id] = time.monotonic()
        elif kind in ("execution_success", "execution_error", "execution_interrupted", "execution_cached"):
            self.clocks[prompt_id] = time.monotonic()
            if kind != "execution_cached":
                self.next_poll = 0.0
        if self.on_progress:
            self.on_progress(state)

    def _poll(self) -> tuple[str, dict] | None:
        try:
            finished = [(pid, self.client.history(pid)) for pid in self.pending]
            running = self.client.running_ids() if self.events is None else []
        except ImagegenError as error:
            error.details["phase"] = self.phase()
            error.message += f" (phase '{error.details['phase']}')"
            raise
        self.next_poll = time.monotonic() + (1.0 if self.events is not None else 0.25)
        if self.events is None:
            # Without events no progress resets a stall clock: watch the queue, and let the
            # overall cap bound the jobs.
            for prompt_id in self.pending:
                if self.states[prompt_id].phase == "queued" and prompt_id in running:
                    self._enter(prompt_id, "running")
                self.clocks[prompt_id] = time.monotonic()
        for prompt_id, entry in finished:
            status = (entry or {}).get("status", {})
            if entry and (status.get("completed") or status.get("status_str") == "error"):
                self._enter(prompt_id, "done")
                self.pending.remove(prompt_id)
                entry["imagegen_phase_times"] = self.states[prompt_id].phase_times
                return prompt_id, entry
        return None

    def next_finished(self) -> tuple[str, dict]:
        """Block until a pending prompt finishes; returns (prompt_id, entry). A prompt that failed
        raises its error with details['prompt_id'] set; worker-level failures have none."""
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise ImagegenError("interrupted", "stopped before the job finished")
            self._check_budgets()
            self._receive()
            if time.monotonic() >= self.next_poll:
                done = self._poll()
                if done:
                    prompt_id, entry = done
                    try:
                        return prompt_id, ComfyClient.check(entry)
                    except ImagegenError as error:
                        error.details["prompt_id"] = prompt_id
                        raise
