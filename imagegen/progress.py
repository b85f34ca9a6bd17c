"""Everything the user reads on stderr: status lines, warnings once, and progress bars on a TTY."""

from __future__ import annotations

import os
import sys

from .comfy import Progress


class Reporter:
    def __init__(self, quiet: bool = False, show_progress: bool | None = None):
        self.quiet = quiet
        interactive = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.show_progress = (not quiet) and (interactive if show_progress is None else show_progress)
        self._said: set[str] = set()
        self._bar = None
        self._label = ""

    def status(self, message: str) -> None:
        if not self.quiet:
            self._clear_bar()
            print(message, file=sys.stderr, flush=True)

    def once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.status(message)

    def warn(self, message: str) -> None:
        self._clear_bar()
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def job(self, label: str) -> None:
        self._label = label

    def progress(self, state: Progress) -> None:
        if not self.show_progress:
            return
        from tqdm import tqdm

        if state.phase == "sampling" and state.total:
            if self._bar is None or self._bar.total != state.total:
                self._clear_bar()
                self._bar = tqdm(total=state.total, desc=self._label or "sampling", unit="step", file=sys.stderr,
                                 leave=False, dynamic_ncols=True)
            self._bar.n = state.step
            self._bar.refresh()
        elif state.phase in ("finishing", "done"):
            self._clear_bar()

    def _clear_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
