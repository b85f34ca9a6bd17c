"""Everything the user reads on stderr: status lines, warnings once, and progress bars on a TTY."""

from __future__ import annotations

import os
import sys
from typing import Any

from imagegen.comfy.client import Progress


class Reporter:
    def __init__(self, quiet: bool = False, show_progress: bool | None = None):
        self.quiet = quiet
        interactive = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.show_progress = (not quiet) and (interactive if show_progress is None else show_progress)
        self._said: set[str] = set()
        self._bar: Any = None
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

    def worker_progress(self, state):
        """The progress callback for one worker's jobs: one bar, for the job that samples now."""
        return self.progress

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


class BatchReporter(Reporter):
    """One overall bar (images done of total, images/s, ETA) and one line per worker, on a TTY."""

    def __init__(self, quiet: bool = False, show_progress: bool | None = None):
        super().__init__(quiet, show_progress)
        self.overall: Any = None
        self.worker_bars: dict[str, Any] = {}
        self.workers: list = []

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            self.status(f"{skipped} of {total} image(s) already done in an earlier run: skipped")
        if self.show_progress:
            from tqdm import tqdm

            self.overall = tqdm(total=total, initial=skipped, unit="img", desc="batch", file=sys.stderr,
                                dynamic_ncols=True)

    def attach(self, workers: list) -> None:
        self.workers = workers
        if self.show_progress:
            from tqdm import tqdm

            for position, state in enumerate(workers, start=1):
                self.worker_bars[state.slot] = tqdm(total=0, position=position, desc=f"  {state.slot}", unit="step",
                                                    file=sys.stderr, leave=False, dynamic_ncols=True,
                                                    bar_format="{desc}: {postfix}")

    def worker_progress(self, state):
        def update(progress: Progress) -> None:
            bar = self.worker_bars.get(state.slot)
            if bar is not None:
                detail = f"{progress.step}/{progress.total} steps" if progress.phase == "sampling" else progress.phase
                bar.set_postfix_str(f"{state.name or state.slot} {detail}, {state.done} done")
        return update

    def finished(self, images: int, failed: bool = False) -> None:
        if self.overall is not None:
            self.overall.update(images)
            if failed:
                self.overall.set_postfix_str("some failed")

    def status(self, message: str) -> None:
        if self.overall is not None and not self.quiet:
            self.overall.write(message, file=sys.stderr)
        else:
            super().status(message)

    def warn(self, message: str) -> None:
        if self.overall is not None:
            self.overall.write(f"warning: {message}", file=sys.stderr)
        else:
            super().warn(message)

    def close(self) -> None:
        for bar in self.worker_bars.values():
            bar.close()
        if self.overall is not None:
            self.overall.close()
        self.worker_bars, self.overall = {}, None
