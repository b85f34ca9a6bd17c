"""Download events (imagegen.fetch, or `entrypoint.py fetch` JSON lines) shown on stderr.

On a terminal: one tqdm bar per file (bytes, rate, ETA). Otherwise, or with bars=False: a line
when a file starts and when it is verified, so logs stay readable.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _size(count: float | None) -> str:
    return gib(count) if count else "?"


class TqdmRenderer:
    def __init__(self, quiet: bool = False, bars: bool | None = None, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        interactive = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.bars = (not quiet) and (interactive if bars is None else bars)
        self._open: dict[str, Any] = {}

    def __call__(self, event: dict) -> None:
        kind, name = event.get("event"), event.get("file", "")
        if kind == "start":
            self._start(name, event)
        elif kind == "progress" and name in self._open:
            bar = self._open[name]
            bar.update(max(event.get("bytes", 0) - bar.n, 0))
        elif kind == "verifying" and name in self._open:
            self._open[name].set_postfix_str("checking sha256", refresh=True)
        elif kind == "verified":
            self._finish(name, event.get("bytes"))
            self._say(f"{name}: verified (sha256 {event.get('sha256', '')[:12]}…, {_size(event.get('bytes'))})")
        elif kind == "done" and event.get("cached"):
            self._say(f"{name}: present{' (verified)' if event.get('sha256') else ''}")
        elif kind in ("waiting", "recorded"):
            self._say(event.get("message", ""))
        elif kind == "plan" and event.get("bytes"):
            files = len(event.get("files", []))
            self._say(f"{event.get('model')}: downloading {files} file(s), {_size(event['bytes'])}")
        elif kind == "error":
            self.close()

    def _start(self, name: str, event: dict) -> None:
        resumed = f", continuing from {_size(event.get('bytes'))}" if event.get("resumed") else ""
        if not self.bars:
            self._say(f"{name}: downloading {_size(event.get('total'))} from {event.get('repo')}{resumed}")
            return
        from tqdm import tqdm

        self._open[name] = tqdm(total=event.get("total"), initial=event.get("bytes", 0), desc=name.rsplit("/", 1)[-1],
                                unit="B", unit_scale=True, unit_divisor=1024, file=self.stream, dynamic_ncols=True,
                                leave=True)

    def _finish(self, name: str, size: int | None) -> None:
        bar = self._open.pop(name, None)
        if bar is not None:
            if size:
                bar.update(max(size - bar.n, 0))
            bar.set_postfix_str("", refresh=False)
            bar.close()

    def _say(self, message: str) -> None:
        if self.quiet or not message:
            return
        if self._open:
            from tqdm import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self._open.values():
            bar.close()
        self._open.clear()
