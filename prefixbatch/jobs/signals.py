"""Stopping a run gracefully on SIGINT (Ctrl-C) or SIGTERM (a scheduler, a preempted machine).

The first signal sets a flag: no further step or batch starts, the whole rows already
generated are written and committed, and the run ends with `JobStopped` (exit 130 for
SIGINT, 143 for SIGTERM), saying how many rows are committed and how to resume. The second
signal stops at once (the default behaviour of that signal): what was committed is kept
either way, by the commit protocol.

Handlers are installed only by the CLI's `run` and only in the main thread; the Python API
takes a `threading.Event` instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from prefixbatch.errors import PrefixbatchError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class JobStopped(PrefixbatchError):
    """The run stopped on request after committing every whole row it had generated."""

    def __init__(self, *, reason: str, committed_rows: int, total_rows: int, output_path: str) -> None:
        self.reason = reason
        self.committed_rows = committed_rows
        self.total_rows = total_rows
        self.output_path = output_path
        super().__init__(
            f"stopped ({reason}): {committed_rows} of {total_rows} input rows are committed in {output_path}"
        )


class GracefulStop:
    """`with GracefulStop(log) as stop: run_job(..., stop=stop.event)`; `stop.signal` says which."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.event = threading.Event()
        self.signal: signal.Signals | None = None
        self.log = log
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 130)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signal.Signals(signum)
        self.event.set()
        self._restore()  # a second signal acts at once
        self.log(
            f"{self.signal.name}: stopping — no new work starts; whole rows generated so far are"
            f" committed (send {self.signal.name} again to stop at once)"
        )


__all__ = ["EXIT_CODES", "GracefulStop", "JobStopped"]
