"""Cooperative cancellation of blocking work that runs in a thread (an MCP tool call).

The caller runs the work inside `scope(event)`; long waits on the way (a download's progress, a
worker's start-up, a lock held by another process) call `check()`, which raises `interrupted` once
the event is set. Outside a scope `check()` does nothing, so the CLI (where Ctrl-C is the signal)
is unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from imagegen.util.errors import ImagegenError

_local = threading.local()


@contextmanager
def scope(event: threading.Event) -> Iterator[threading.Event]:
    """Make `event` the cancellation signal of the work this thread does inside the block."""
    previous = getattr(_local, "event", None)
    _local.event = event
    try:
        yield event
    finally:
        _local.event = previous


def current() -> threading.Event | None:
    return getattr(_local, "event", None)


def check(what: str = "the request") -> None:
    """Raise `interrupted` when the work this thread does was cancelled."""
    event = current()
    if event is not None and event.is_set():
        raise ImagegenError("interrupted", f"cancelled by the client during {what}",
                            hint="Call the tool again to continue: a download resumes where it stopped.")
