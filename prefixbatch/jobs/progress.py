"""Progress of a running job: a live rich bar on a terminal, plain log lines otherwise.

Counts rows done and output tokens; shows output tokens/s. Logs go to stderr so stdout
stays clean for `--json` style output.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class JobProgress:
    """`with JobProgress(total_rows) as p: p.advance(rows, output_tokens)`.

    On a cluster, work under way on the workers shows before it is committed:
    `running(key, rows, tokens)` sets what one unfinished piece (a shard attempt) has done so
    far; `advance(rows, tokens, settles=key)` replaces it with what was committed and
    `settle(key)` drops it (lost with its worker); reports that arrive later are ignored;
    `set_workers(n)` shows how many workers are alive. Safe to call from another thread.
    """

    def __init__(
        self,
        total_rows: int,
        *,
        label: str = "generating",
        count_tokens: bool = True,
        live: bool | None = None,
        stream: TextIO | None = None,
        log_every_s: float = 10.0,
    ) -> None:
        self.label = label
        self.count_tokens = count_tokens
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total_rows = total_rows
        self.rows = 0  # committed
        self.output_tokens = 0
        self.workers: int | None = None  # alive, on a cluster
        self.log_every_s = log_every_s
        self._running: dict[str, tuple[int, int]] = {}
        self._settled: set[str] = set()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_log = self._start
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> JobProgress:
        self._start = self._last_log = time.monotonic()
        if self.live:
            rate = " · {task.fields[tps]:.1f} output tok/s" if self.count_tokens else ""
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows" + rate + "{task.fields[workers]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task("generate", total=self.total_rows, tps=0.0, workers="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._log()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    @property
    def shown(self) -> tuple[int, int]:
        """Rows and output tokens done: committed plus under way."""
        rows = self.rows + sum(r for r, _ in self._running.values())
        return rows, self.output_tokens + sum(t for _, t in self._running.values())

    @property
    def tokens_per_s(self) -> float:
        return self._rate(self.shown[1])

    def _rate(self, output_tokens: int) -> float:
        return output_tokens / max(self.elapsed_s, 1e-9)

    def advance(self, rows: int, output_tokens: int, *, settles: str | None = None) -> None:
        """Count committed work; `settles`: the running piece it replaces."""
        with self._lock:
            if settles is not None:
                self._settle(settles)
            self.rows += rows
            self.output_tokens += output_tokens
            self._show()

    def running(self, key: str, rows: int, output_tokens: int) -> None:
        with self._lock:
            if key not in self._settled:
                self._running[key] = (rows, output_tokens)
                self._show()

    def settle(self, key: str) -> None:
        with self._lock:
            self._settle(key)
            self._show()

    def _settle(self, key: str) -> None:
        self._settled.add(key)
        self._running.pop(key, None)

    def set_workers(self, workers: int) -> None:
        with self._lock:
            changed, self.workers = workers != self.workers, workers
            if changed:
                self._show()

    def _workers_text(self) -> str:
        return "" if self.workers is None else f" · {self.workers} worker{'s' if self.workers != 1 else ''} alive"

    def _show(self) -> None:
        if self._bar is not None:
            rows, output_tokens = self.shown
            self._bar.update(self._task, completed=rows, tps=self._rate(output_tokens), workers=self._workers_text())
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._log()

    def _log(self) -> None:
        self._last_log = time.monotonic()
        rows, output_tokens = self.shown
        tokens = f", {output_tokens} output tokens, {self._rate(output_tokens):.1f} tok/s" if self.count_tokens else ""
        print(
            f"[prefixbatch] {self.label}: {rows}/{self.total_rows} rows{tokens}{self._workers_text()}, {self.elapsed_s:.0f}s",
            file=self.stream,
            flush=True,
        )
