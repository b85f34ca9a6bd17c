"""`imagegen doctor --runtime ray`: the cluster (Ray installed, reachable, token-authenticated) and each node
(GPUs with memory, models held, workers' health, and which worker its actors start)."""

from __future__ import annotations

from imagegen.runtimes import ray_node
from imagegen.util.errors import ImagegenError


def doctor_checks() -> list[dict]:
    """`imagegen doctor --runtime ray`: Ray installed, the cluster reachable and token-authenticated,
    and per node its GPUs (with memory), the models it holds and its workers' health."""
    def check(name: str, ok: bool, detail: str, fix: str = "") -> dict:
        return {"check": name, "ok": ok, "detail": detail, "fix": fix if not ok else "", "optional": False}

    from imagegen.runtimes.ray import RayRuntime

    try:
        runtime = RayRuntime()
    except ImagegenError as error:
        return [check("ray cluster", False, error.message, error.hint)]
    checks = [check("ray cluster", True, f"{runtime.address}: token authentication on every node")]
    for node in runtime.cluster():
        where = f"ray node {node['address']} ({node['node_id'][:8]})"
        if node.get("error"):
            checks.append(check(where, False, node["error"], "Check the node with `ray status` and its logs."))
            continue
        memory = f", {node['gpu_memory_mib'] / 1024:.1f} GiB each" if node.get("gpu_memory_mib") else ""
        sick = [w["name"] for w in node["workers"] if not w.get("healthy", True)]
        mode = node.get("worker_mode") or {}
        detail = (f"{node['gpus']} GPU(s){memory}; models: {', '.join(node['models']) or 'none'}; "
                  f"workers: {len(node['workers'])}" + (f" ({', '.join(sick)} not answering)" if sick else "")
                  + f"; workers start as: {mode.get('mode', '?')}"
                  + (f" ({mode['error']})" if mode.get("error") else ""))
        fix = (f"Fix the node's Docker or image, or set {ray_node.WORKERS_ENV}=auto (docs/cluster.md)."
               if mode.get("error") else "Run `imagegen stop --runtime ray` to clear hung workers.")
        checks.append(check(where, not sick and not mode.get("error"), detail, fix))
    if not any(node["gpus"] for node in runtime.cluster([])):
        checks.append(check("ray GPUs", False, "no node of the cluster offers a GPU",
                            "Start GPU nodes with `ray start --address HEAD:PORT` (see docs/cluster.md)."))
    return checks
