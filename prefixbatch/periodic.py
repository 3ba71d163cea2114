"""A callback run every few seconds from a daemon thread while a `with` block runs.

Progress reports, the run's progress display and checkpoints all poll work that advances
in another thread's loop (engine steps): `with Periodic(0.5, report):` calls `report()`
every 0.5 s until the block ends, then once more if `final` (the last numbers shown).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    def __init__(self, every_s: float | None, tick: Callable[[], None], *, name: str, final: bool = False) -> None:
        self.every_s, self.tick, self.final = every_s, tick, final
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> Periodic:
        if self.every_s is not None:  # None: never
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.final:
            self.tick()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.tick()


__all__ = ["Periodic"]
