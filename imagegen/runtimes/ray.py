"""RayRuntime (`--runtime ray`): one worker actor per GPU of an existing Ray cluster.

Each actor (runtimes/ray_actor.py) starts the usual worker on its node, bound to 127.0.0.1, and
relays graphs, progress and PNG bytes; the CLI stays the only writer of images and manifests.
Each node fills its own model cache with a download task pinned to it (weights never travel through
Ray's object store). A cluster without token authentication is refused unless the user opts out.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from imagegen.runtimes import ray_actor, ray_place
from imagegen.runtimes.base import WorkerHandle, default_keep_warm, default_start_timeout
from imagegen.runtimes.ray_client import HEAD_HINT, HEAD_LOST, NAMESPACE, RayClient, call
from imagegen.util.errors import ImagegenError

ADDRESS_ENV = "RAY_ADDRESS"
ALLOW_INSECURE_ENV = "IMAGEGEN_RAY_ALLOW_NO_AUTH"
INSTALL_HINT = "Install Ray on this machine and on every node: pip install 'imagegen[ray]'."


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImagegenError("runtime_unavailable", "--runtime ray needs Ray, which is not installed here",
                            hint=INSTALL_HINT) from None
    return ray


@dataclass
class Node:
    node_id: str
    address: str
    gpus: int
    labels: dict = field(default_factory=dict)
    alive: bool = True

    def slots(self) -> list[str]:
        return [f"ray-{self.node_id[:8]}-{index}" for index in range(self.gpus)]


class RayHandle(WorkerHandle):
    """A worker behind a Ray actor: its client is the actor's adapter, not HTTP."""

    actor: object = None

    def client(self, request_timeout: float = 30.0) -> RayClient:  # type: ignore[override]
        return RayClient(self.actor, self.name, request_timeout=request_timeout)


class RayRuntime:
    """Workers as Ray actors, one per GPU, on the nodes of the cluster at RAY_ADDRESS / --ray-address."""

    name = "ray"
    uses_host_cache = False      # every node has its own model cache (filled by ensure_bundle)
    can_restart = True           # a lost worker is replaced, on any node with a free GPU (ray_place.py)
    compiles_on_host = False     # fast mode compiles on the nodes
    reads_local_files = False    # a node cannot see a file on this machine

    def __init__(self, address: str | None = None, keep_warm: float | None = None, allow_insecure: bool | None = None,
                 start_timeout: float | None = None):
        self.ray = import_ray()
        self.address = address or os.environ.get(ADDRESS_ENV) or "auto"
        self.keep_warm = default_keep_warm() if keep_warm is None else keep_warm
        self.start_timeout = default_start_timeout() if start_timeout is None else start_timeout
        self.allow_insecure = (os.environ.get(ALLOW_INSECURE_ENV) == "1") if allow_insecure is None else allow_insecure
        self.prefix = f"imagegen-{os.getpid()}-{secrets.token_hex(3)}"   # names this command's actors, and only them
        self.actors: dict[str, object] = {}
        self.handles: dict[str, WorkerHandle] = {}
        self.chosen: list[str] | None = None
        self.preferred: str | None = None
        self.placed: set[str] = set()        # slots this command started an actor for (a new one: a replacement)
        self.replacements = 0                # names replacement actors apart (a dead actor's name may linger)
        self.bundles: dict[str, object] = {}  # models made loadable for this command (for a replacement too)
        self._connect()
        self.facts = self._node_facts()
        self._check_auth()
        self._watch_head()

    # --- the cluster --------------------------------------------------------------
    def _connect(self) -> None:
        ray = self.ray
        self._keep_stdout_ours()
        if ray.is_initialized():
            return
        from ray import exceptions as rx

        try:
            ray.init(address=self.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False,
                     configure_logging=True)
        except rx.AuthenticationError:
            raise ImagegenError("cluster_unreachable",
                                f"the Ray cluster at {self.address} refused us: it requires a token we do not have",
                                hint="Give this machine the cluster's token: RAY_AUTH_MODE=token with "
                                     "RAY_AUTH_TOKEN_PATH=FILE (or ~/.ray/auth_token).") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "no RAY_ADDRESS or --ray-address was given" if self.address == "auto" else self.address
            raise ImagegenError("cluster_unreachable", f"cannot connect to a Ray cluster ({where}): "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                                hint="Start one (`ray start --head`, see docs/cluster.md) and pass --ray-address "
                                     "HOST:PORT or set RAY_ADDRESS.") from None

    @staticmethod
    def _keep_stdout_ours() -> None:
        """Ray's driver prints the cluster's error events (a node that missed its heartbeats, ...) to stdout,
        where `--json` records and `-o -` PNG bytes go: send them to stderr."""
        try:
            from ray._private import worker
        except ImportError:
            return
        printed = worker.print_to_stdstream
        if getattr(printed, "imagegen_stderr", False):
            return

        def to_stderr(data, ignore_prefix: bool):
            return printed({**data, "is_err": True}, ignore_prefix)

        to_stderr.imagegen_stderr = True  # type: ignore[attr-defined]
        worker.print_to_stdstream = to_stderr

    def _watch_head(self, every: float = 2.0, misses: int = 5) -> None:
        """Notice a lost head within seconds: Ray's driver aborts the process about a minute after its
        GCS goes away, so the run must wind down before that (jobs left are reported, the manifest kept)."""
        try:
            host, _, port = self.ray.get_runtime_context().gcs_address.rpartition(":")
        except Exception:  # noqa: BLE001 - an older Ray: no watch, Ray's own abort remains
            return

        def watch() -> None:
            missed = 0
            while missed < misses:
                time.sleep(every)
                try:
                    socket.create_connection((host, int(port)), timeout=every).close()
                    missed = 0
                except OSError:
                    missed += 1
            HEAD_LOST.set()

        threading.Thread(target=watch, name="ray-head-watch", daemon=True).start()

    def nodes(self) -> list[Node]:
        if HEAD_LOST.is_set():
            raise ImagegenError("cluster_unreachable", f"the Ray cluster's head node ({self.address}) is gone",
                                hint=HEAD_HINT)
        found = []
        for entry in self.ray.nodes():
            if not entry.get("Alive"):
                continue
            gpus = int((entry.get("Resources") or {}).get("GPU", 0))
            found.append(Node(entry["NodeID"], entry.get("NodeManagerAddress", "?"), gpus,
                              dict(entry.get("Labels") or {})))
        return found

    def _pinned(self, node_id: str, function, *args):
        """Run a function of ray_actor on one node (a task pinned to it, no CPU reserved)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = self.ray.remote(num_cpus=0, max_retries=0)(function)
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        return task.options(scheduling_strategy=strategy).remote(*args)

    def _gather(self, refs: dict, timeout: float) -> dict:
        """node_id -> result, or an ImagegenError for a node whose task failed."""
        from ray import exceptions as rx

        results: dict = {}
        for node_id, ref in refs.items():
            try:
                results[node_id] = self.ray.get(ref, timeout=timeout)
            except rx.GetTimeoutError:
                results[node_id] = ImagegenError("cluster_unreachable",
                                                 f"Ray node {node_id[:8]} did not answer within {timeout:.0f}s")
            except rx.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ModuleNotFoundError):
                    results[node_id] = ImagegenError("runtime_unavailable",
                                                     f"Ray node {node_id[:8]} cannot import imagegen: {cause}",
                                                     hint=INSTALL_HINT)
                else:
                    results[node_id] = ImagegenError("cluster_unreachable",
                                                     f"a task on Ray node {node_id[:8]} failed: {str(exc)[:300]}")
            except rx.RayError as exc:
                results[node_id] = ImagegenError("cluster_unreachable",
                                                 f"Ray node {node_id[:8]} is gone: {type(exc).__name__}")
        return results

    def _node_facts(self, bundles: list | None = None, nodes: list[Node] | None = None) -> dict:
        nodes = self.nodes() if nodes is None else nodes
        refs = {n.node_id: self._pinned(n.node_id, ray_actor.node_facts, bundles) for n in nodes}
        return self._gather(refs, timeout=max(60.0, self.start_timeout / 2))

    def _check_auth(self) -> None:
        """Refuse a cluster whose nodes accept anyone: only Ray travels between nodes, and without
        token authentication anyone who reaches a node can run code on it."""
        for result in self.facts.values():
            if isinstance(result, ImagegenError) and result.code == "runtime_unavailable":
                raise result
        open_nodes = [node_id[:8] for node_id, result in self.facts.items()
                      if isinstance(result, dict) and not result.get("auth")]
        if open_nodes and not self.allow_insecure:
            raise ImagegenError("cluster_insecure",
                                f"the Ray cluster runs without token authentication (nodes {', '.join(open_nodes)}): "
                                "anyone who can reach it can run code on its machines",
                                hint="Restart it with RAY_AUTH_MODE=token and a token on every node (docs/cluster.md); "
                                     f"for a single-machine cluster only, set {ALLOW_INSECURE_ENV}=1 or pass "
                                     "--ray-allow-insecure.")

    # --- slots and workers --------------------------------------------------------
    def _node_of(self, slot: str) -> tuple[Node, int] | None:
        for node in self.nodes():
            if slot in node.slots():
                return node, node.slots().index(slot)
        return None

    def slots(self, choice: str | None = None, cpu_workers: int = 1) -> list[str]:
        """One slot per GPU in the cluster. `choice` (--gpus): all, N (the first N), or slots, node
        addresses, node id prefixes and node labels (KEY=VALUE), comma-separated."""
        nodes = [n for n in self.nodes() if n.gpus]
        if not nodes:
            raise ImagegenError("runtime_unavailable", "the Ray cluster has no GPUs (no node offers the GPU resource)",
                                hint="Start the GPU nodes with `ray start --address HEAD:PORT` (Ray counts their "
                                     "GPUs), or --num-gpus N where it cannot.")
        every = [slot for node in nodes for slot in node.slots()]
        choice = (choice or "all").strip()
        if choice == "all":
            chosen = every
        elif choice.isdigit():
            if not 1 <= int(choice) <= len(every):
                raise ImagegenError("invalid_argument", f"--gpus {choice}: the Ray cluster has {len(every)} GPU(s)")
            chosen = every[: int(choice)]
        else:
            chosen = []
            for part in (p.strip() for p in choice.split(",") if p.strip()):
                key, _, value = part.partition("=")
                match = [s for n in nodes for s in n.slots()
                         if part == s or part == n.address or n.node_id.startswith(part)
                         or (value and n.labels.get(key) == value)]
                if not match:
                    raise ImagegenError("invalid_argument", f"--gpus {part}: no GPU of the Ray cluster matches",
                                        hint=f"Its GPUs: {', '.join(every)}; run `imagegen workers --runtime ray`.")
                chosen += [s for s in match if s not in chosen]
        self.chosen = chosen
        return chosen

    def ensure(self, slot: str | None = None, on_status=None, mounts: AbstractSet[str] = frozenset()) -> WorkerHandle:
        """Start this command's actor for a slot and its worker: on the slot's own node, with one of its GPUs;
        a lost worker's replacement (a slot placed before) on any node where Ray finds a free GPU."""
        slot = slot or self.preferred or self.slots()[0]
        kept = self.handles.get(slot)
        if kept is not None and slot in self.actors:  # this command's actor for it (an MCP server's earlier call)
            try:
                health = call(self.actors[slot], slot, "health", timeout=15)
                if health.get("started") and not health.get("problem"):
                    return kept
            except ImagegenError:
                pass
        self._drop(slot)
        place = self._node_of(slot)
        if slot in self.placed:  # its worker was lost: its node may be gone, or about to be
            actor, node = ray_place.anywhere(self, slot, on_status)
        elif place is None:
            raise ImagegenError("worker_start_failed", f"the Ray node of {slot} is not in the cluster (any more)")
        else:
            node = place[0]
            actor = ray_place.pinned(self, slot, node)
            if on_status:
                on_status(f"starting a Ray worker for {slot} on node {node.address} ({node.node_id[:8]})")
        self.actors[slot] = actor
        self.placed.add(slot)
        try:
            started = call(actor, slot, "start", node.gpus, timeout=self.start_timeout + 60)
        except ImagegenError as error:
            self._drop(slot, stop_worker=False)
            if error.details.get("waited"):  # the actor never started: no GPU of that node came free for it
                raise ImagegenError("worker_start_failed",
                                    f"the Ray worker {slot} did not start within {self.start_timeout + 60:.0f}s: "
                                    "its node may have no free GPU", hint="Run `ray status` to see what holds them.",
                                    ) from None
            raise
        name = slot if slot in node.slots() else f"ray-{node.node_id[:8]}-{started['gpu_index']}"  # a replacement
        if any(h.name == name for s, h in self.handles.items() if s != slot):
            name += f"-r{self.replacements}"
        info = {**started["info"], "node_id": node.node_id, "node_address": node.address,
                "local_slot": started["local_slot"], "kind": "imagegen", "worker_mode": started.get("worker_mode"),
                "container": started.get("container")}
        handle = RayHandle(name=name, url=f"ray://{node.address}/{name}", token="", device=started["device"],
                           runtime=self.name, slot=slot, started_here=True, info=info)
        handle.actor = actor
        self.handles[slot] = handle
        return handle

    def _drop(self, slot: str, stop_worker: bool = True) -> bool:
        """End this command's actor of a slot (and its worker, when the actor started it)."""
        actor = self.actors.pop(slot, None)
        self.handles.pop(slot, None)
        if actor is None:
            return False
        if stop_worker:
            try:
                call(actor, slot, "stop_worker", timeout=20)
            except ImagegenError:
                pass  # gone with its node
        if HEAD_LOST.is_set():
            return True  # its node's raylet ends it, and no call would reach Ray's head now
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        return True

    def diagnose(self, worker: WorkerHandle) -> ImagegenError | None:
        """Why a worker failed a job: its actor (or node) is gone, or its worker died or hangs."""
        actor = self.actors.get(worker.slot)
        if actor is None:
            return ImagegenError("worker_died", f"the Ray worker {worker.slot} was stopped")
        try:
            health = call(actor, worker.slot, "health", timeout=15)
        except ImagegenError as error:
            return error
        problem = health.get("problem")
        if problem:
            return ImagegenError(problem["code"], f"{worker.slot} on node {worker.info.get('node_address')}: "
                                 f"{problem['message']}")
        return None

    def stop(self, slot: str | None = None) -> list[str]:
        """Stop this command's actors (and the workers they started). With no slot, also every
        imagegen worker on the nodes (`imagegen stop --runtime ray`); other actors are never touched."""
        stopped = [s for s in list(self.actors) if (slot is None or s == slot) and self._drop(s)]
        if slot is None:
            refs = {n.node_id: self._pinned(n.node_id, ray_actor.node_stop) for n in self.nodes()}
            for node_id, result in self._gather(refs, timeout=60).items():
                if isinstance(result, list):
                    stopped += [f"{name}@{node_id[:8]}" for name in result]
        return stopped

    # --- models -------------------------------------------------------------------
    def ensure_bundle(self, bundle) -> None:
        """Make a bundle loadable where our workers run: a download task pinned to each node that
        lacks a file (one per node, never one per worker). For one worker (generate), a node that
        already holds the model is preferred and nothing is fetched."""
        self.bundles[bundle.name] = bundle
        nodes = [n for n in self.nodes() if n.gpus]
        if self.chosen is not None:  # the chosen GPUs' nodes, and those of replacements placed elsewhere
            hosting = {h.info.get("node_id") for h in self.handles.values()}
            nodes = [n for n in nodes if n.node_id in hosting or any(s in self.chosen for s in n.slots())]
        facts = self._node_facts([bundle], nodes)
        holds = {node_id: bool(r.get("holds", {}).get(bundle.name)) for node_id, r in facts.items()
                 if isinstance(r, dict)}
        if self.chosen is None:
            holding = [n for n in nodes if holds.get(n.node_id)]
            target = (holding or nodes)[:1]
            if target:
                self.preferred = target[0].slots()[0]
            nodes = [] if holding else target
        refs = {n.node_id: self._pinned(n.node_id, ray_actor.node_fetch, bundle) for n in nodes
                if not holds.get(n.node_id)}
        for result in self._gather(refs, timeout=24 * 3600).values():
            if isinstance(result, ImagegenError):
                raise result
            ray_actor.raise_failure(result)

    # --- listing ------------------------------------------------------------------
    def cluster(self, bundles: list | None = None) -> list[dict]:
        """Each alive node: address, GPUs (with declared memory), token auth, the registered models
        it holds completely (of `bundles`; default: every registered one), its imagegen workers."""
        if bundles is None:
            from imagegen.models.registry import Registry

            bundles = list(Registry.load().bundles.values())
        nodes = self.nodes()
        facts = self._node_facts(bundles, nodes)
        workers = self._gather({n.node_id: self._pinned(n.node_id, ray_actor.node_workers) for n in nodes}, 60)
        listed = []
        for node in nodes:
            fact = facts.get(node.node_id)
            fact = fact if isinstance(fact, dict) else {"error": getattr(fact, "message", str(fact))}
            found = workers.get(node.node_id)
            listed.append({"node_id": node.node_id, "address": node.address, "gpus": node.gpus,
                           "gpu_memory_mib": fact.get("declared_memory_mib"), "auth": fact.get("auth"),
                           "models": sorted(k for k, v in (fact.get("holds") or {}).items() if v),
                           "models_dir": fact.get("models_dir"), "slots": node.slots(),
                           "worker_mode": fact.get("worker_mode"),
                           "workers": found if isinstance(found, list) else [], "error": fact.get("error")})
        return listed

    def workers(self) -> list[dict]:
        """The imagegen workers on every node (local processes and containers), with their node."""
        found = []
        for node in self.cluster():
            for worker in node["workers"]:
                found.append({**worker, "runtime": self.name, "worker_mode": worker.get("runtime"),  # docker, local
                              "name": f"{worker['name']}@{node['address']}",
                              "node_id": node["node_id"], "node_address": node["address"]})
        return found
