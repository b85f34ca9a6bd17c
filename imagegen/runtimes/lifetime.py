"""--keep-warm 0: the workers a command starts are stopped when it ends; those it reused are left alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from imagegen.runtimes.base import STOPPED_BY_COMMAND, WorkerHandle


@contextlib.contextmanager
def workers_of_command(runtime, keep_warm: float) -> Iterator:
    """The runtime, as is; with keep_warm 0, every worker its ensure() starts from here on (a handle
    with started_here) is stopped on the way out: after success, an error or Ctrl-C. A worker that
    was found running (another command's) is never stopped, nor one whose queue holds someone
    else's prompts (a command that reused it meanwhile): that one idles out on its own."""
    if keep_warm > STOPPED_BY_COMMAND:
        yield runtime
        return
    started: dict[str, WorkerHandle] = {}
    ensure = runtime.ensure

    def ensure_noting(*args, **kwargs) -> WorkerHandle:
        handle = ensure(*args, **kwargs)
        if handle.started_here:
            started[handle.slot] = handle
        return handle

    runtime.ensure = ensure_noting
    try:
        yield runtime
    finally:
        del runtime.ensure  # the class's method again
        for slot, handle in started.items():
            if not _queue_busy(handle):
                runtime.stop(slot)


def _queue_busy(handle: WorkerHandle) -> bool:
    """Whether the worker's ComfyUI has prompts queued or running (this command's were cancelled or done)."""
    try:
        listed = handle.client(request_timeout=3).queue()
    except Exception:  # noqa: BLE001 - a worker that does not answer serves nobody
        return False
    return bool(listed.get("queue_running") or listed.get("queue_pending"))
