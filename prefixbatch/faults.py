"""Named fault points: places where a test can kill the process exactly as a crash would.

`PREFIXBATCH_FAULT=point[:n]` in the environment makes the n-th time (default the first)
the process reaches `fault_point("point")` a SIGKILL of itself: no exception handler, no
`finally`, no flush runs, as when a machine dies. `PREFIXBATCH_FAULT_SIGNAL=TERM` (or
`INT`) sends that signal instead, as a scheduler or a user would, at a known moment. Unset (always, outside tests), a fault
point is one dictionary lookup.

Points: `tokenized` (input read and tokenized), `planned` (the native plan built),
`prefill` / `decode` (an engine step with prefill / decode rows, before it runs; a step
with both is a hit of each),
`part_written` (a part file written, its commit not yet), `committed` (a commit written),
`manifest` (the manifest written, `_SUCCESS` not yet), and `write` (any output file
about to be written).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["crash_if_row", "fault_point"]

_ENV = "PREFIXBATCH_FAULT"
_hits: Counter[str] = Counter()


def _target() -> tuple[str, int] | None:
    value = os.environ.get(_ENV, "")
    if not value:
        return None
    point, _, nth = value.partition(":")
    return point, int(nth or 1)


def fault_point(name: str) -> None:
    """Kill this process here if the environment asks for it at this hit of `name`."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] == target[1] and _first_to_claim():
        os.kill(os.getpid(), signal.Signals[f"SIG{os.environ.get('PREFIXBATCH_FAULT_SIGNAL', 'KILL')}"])


def _first_to_claim() -> bool:
    """With `PREFIXBATCH_FAULT_ONCE=FILE`, only the first process of many (Dask workers, and
    the workers that replace them) to get here dies: the one that creates FILE."""
    claim = os.environ.get("PREFIXBATCH_FAULT_ONCE")
    if not claim:
        return True
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def crash_if_row(row_index: int) -> None:
    """Kill this process whenever it is about to run input row `PREFIXBATCH_CRASH_ROW` (every
    time, on every worker: a row that kills whatever runs it)."""
    value = os.environ.get("PREFIXBATCH_CRASH_ROW", "")
    if value and int(value) == row_index:
        os.kill(os.getpid(), signal.SIGKILL)
