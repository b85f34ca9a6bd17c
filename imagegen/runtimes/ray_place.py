"""Where RayRuntime puts a worker actor: a slot's first actor on the slot's own node (pinned), a lost
worker's replacement on whichever node Ray finds a free GPU (num_gpus=1, Ray's own scheduling), with the
command's models fetched onto that node before its worker starts. No free GPU: no replacement, at once."""

from __future__ import annotations

import threading
import time

from imagegen.runtimes import ray_actor
from imagegen.runtimes.ray_client import HEAD_LOST, NAMESPACE, call
from imagegen.util.errors import ImagegenError

FREE_WAIT = 15.0  # seconds a replacement waits for the cluster to show a free GPU
PLACE_TRIES = 3   # a replacement Ray put on a node that died meanwhile is placed again, this many times in all
NO_GPU_HINT = "Free a GPU or add a node (`ray start --address HEAD:PORT`); a batch rerun resumes from its manifest."


def actor_options(runtime, name: str) -> dict:
    return {"name": f"{runtime.prefix}-{name}", "namespace": NAMESPACE, "num_gpus": 1, "num_cpus": 0,
            "max_concurrency": 4, "max_restarts": 0}


def pinned(runtime, slot: str, node):
    """The first actor of a slot: on its node, with one of that node's GPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_class = runtime.ray.remote(ray_actor.NodeWorker)
    strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
    return actor_class.options(**actor_options(runtime, slot), scheduling_strategy=strategy).remote(
        runtime.keep_warm, runtime.start_timeout, node.gpus)


def free_gpus(runtime) -> float:
    """GPUs no actor holds, waiting up to FREE_WAIT seconds for one (a lost actor's GPU is freed a moment later)."""
    deadline = time.monotonic() + FREE_WAIT
    while True:
        free = float((_answer(runtime.ray.available_resources) or {}).get("GPU", 0))
        if free >= 1 or time.monotonic() >= deadline or HEAD_LOST.is_set():
            return free
        time.sleep(1.0)


def _answer(ask, within: float = 5.0):
    """What `ask()` returns within a few seconds, else None (a head node that just died would block it)."""
    found: list = []

    def run() -> None:
        try:
            found.append(ask())
        except Exception:  # noqa: BLE001 - Ray cannot say: none free (no replacement, the work goes on)
            pass

    thread = threading.Thread(target=run, name="ray-free-gpus", daemon=True)
    thread.start()
    thread.join(within)
    return found[0] if found else None


def anywhere(runtime, slot: str, on_status=None):
    """A replacement for the lost worker of `slot`: an actor wherever Ray finds a free GPU. Returns
    (actor, node). Raises worker_start_failed at once when no GPU of the cluster is free."""
    deadline = time.monotonic() + max(60.0, min(300.0, runtime.start_timeout))
    for attempt in range(1, PLACE_TRIES + 1):
        if free_gpus(runtime) < 1:
            runtime.nodes()  # the head node gone: that error, not "no free GPU"
            raise ImagegenError("worker_start_failed", f"no GPU of the Ray cluster is free for a replacement of the "
                                f"lost worker {slot}: the work goes on with the workers left", hint=NO_GPU_HINT)
        runtime.replacements += 1
        actor_class = runtime.ray.remote(ray_actor.NodeWorker)
        actor = actor_class.options(**actor_options(runtime, f"{slot}-r{runtime.replacements}")).remote(
            runtime.keep_warm, runtime.start_timeout, 1)
        try:
            where = call(actor, slot, "where", timeout=max(5.0, deadline - time.monotonic()))
        except ImagegenError as error:
            _kill(runtime, actor)
            if error.details.get("waited") or attempt == PLACE_TRIES or time.monotonic() >= deadline:
                raise ImagegenError("worker_start_failed", f"no replacement for the lost worker {slot} could be "
                                    f"placed on a free GPU of the Ray cluster ({error.message})",
                                    hint=NO_GPU_HINT) from None
            continue  # Ray placed it on a node that is gone by now
        node = next((n for n in runtime.nodes() if n.node_id == where["node_id"]), None)
        if node is None:
            _kill(runtime, actor)
            continue
        if on_status:
            on_status(f"the lost worker {slot} is replaced on node {node.address} ({node.node_id[:8]}), "
                      "where a GPU was free")
        fetch_models(runtime, node, on_status)
        return actor, node
    raise ImagegenError("worker_start_failed", f"no replacement for the lost worker {slot} could be placed",
                        hint=NO_GPU_HINT)


def fetch_models(runtime, node, on_status=None) -> None:
    """The models this command made loadable elsewhere, onto a replacement's node (one pinned download each)."""
    bundles = list(runtime.bundles.values())
    if not bundles:
        return
    fact = runtime._node_facts(bundles, [node]).get(node.node_id)
    holds = fact.get("holds", {}) if isinstance(fact, dict) else {}
    for bundle in bundles:
        if holds.get(bundle.name):
            continue
        if on_status:
            on_status(f"fetching {bundle.name} onto Ray node {node.address} ({node.node_id[:8]})")
        result = runtime._gather({node.node_id: runtime._pinned(node.node_id, ray_actor.node_fetch, bundle)},
                                 timeout=24 * 3600)[node.node_id]
        if isinstance(result, ImagegenError):
            raise result
        ray_actor.raise_failure(result)


def _kill(runtime, actor) -> None:
    try:
        runtime.ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
