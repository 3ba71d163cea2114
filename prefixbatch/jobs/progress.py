"""Progress of a running job: a live rich bar on a terminal, plain log lines otherwise.

Shows the work, not only finished rows: prefill tokens computed out of the plan's prefill,
output tokens generated (tokens/s), rows finished out of rows, and an ETA from the plan's
predicted work (prefill + decode tokens, a finished row's unused `max_tokens` counted as
done, so the ETA is an upper bound while rows may still stop early). Without a plan (e.g.
tokenizing) it counts rows. Logs go to stderr so stdout stays clean for `--json` output.
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

    `work=(prefill_tokens, decode_tokens)`: the plan's predicted work; then the bar and the
    ETA follow tokens, and `advance(..., unused_tokens=n)` counts a finished row's unused
    decode budget as done. Work under way shows before it is committed:
    `running(key, rows, tokens, prefill_tokens)` sets what one unfinished piece (the local
    engine, or a shard attempt on a worker) has done so far; `advance(rows, tokens, settles=key)` replaces it with what was committed and
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
        log_every_s: float = 5.0,
        work: tuple[int, int] | None = None,
    ) -> None:
        self.label = label
        self.work = work  # (prefill, decode) tokens the plan predicts
        self.prefill_tokens = 0  # committed
        self.unused_tokens = 0  # finished rows' max_tokens they did not use
        self.count_tokens = count_tokens
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total_rows = total_rows
        self.rows = 0  # committed
        self.output_tokens = 0
        self.workers: int | None = None  # alive, on a cluster
        self.log_every_s = log_every_s
        self._running: dict[str, tuple[int, int, int]] = {}
        self._settled: set[str] = set()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_log = self._start
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> JobProgress:
        self._start = self._last_log = time.monotonic()
        if self.live:
            counted = TextColumn("{task.fields[what]}") if self.work else MofNCompleteColumn()
            rows = "" if self.work else "rows"
            rate = " · {task.fields[tps]:.1f} output tok/s" if self.count_tokens else ""
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                counted,
                TextColumn(rows + rate + "{task.fields[workers]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            total = sum(self.work) if self.work else self.total_rows
            self._task = self._bar.add_task(self.label, total=max(total, 1), tps=0.0, workers="", what="")
            self._show()
        else:
            self._log()  # the first line at once, not after `log_every_s`
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
        rows = self.rows + sum(r for r, _, _ in self._running.values())
        return rows, self.output_tokens + sum(t for _, t, _ in self._running.values())

    @property
    def shown_prefill(self) -> int:
        return self.prefill_tokens + sum(p for _, _, p in self._running.values())

    @property
    def work_done(self) -> int:
        """Tokens of the plan's work done: prefill, decode, and finished rows' unused budget."""
        return self.shown_prefill + self.shown[1] + self.unused_tokens

    @property
    def tokens_per_s(self) -> float:
        return self._rate(self.shown[1])

    def _rate(self, output_tokens: int) -> float:
        return output_tokens / max(self.elapsed_s, 1e-9)

    def advance(
        self, rows: int, output_tokens: int, *, settles: str | None = None, prefill_tokens: int = 0,
        unused_tokens: int = 0,
    ) -> None:
        """Count committed work; `settles`: the running piece it replaces."""
        with self._lock:
            if settles is not None:
                self._settle(settles)
            self.rows += rows
            self.output_tokens += output_tokens
            self.prefill_tokens += prefill_tokens
            self.unused_tokens += unused_tokens
            self._show()

    def running(self, key: str, rows: int, output_tokens: int, prefill_tokens: int = 0) -> None:
        with self._lock:
            if key not in self._settled:
                self._running[key] = (rows, output_tokens, prefill_tokens)
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

    def tick(self) -> None:
        """Refresh the display (a periodic caller: the ETA and rate move with time)."""
        with self._lock:
            self._show()

    def _show(self) -> None:
        if self._bar is not None:
            rows, output_tokens = self.shown
            completed = min(self.work_done, sum(self.work)) if self.work else rows
            what = f"{rows}/{self.total_rows} rows · {self._prefill_text()}" if self.work else ""
            self._bar.update(
                self._task, completed=completed, tps=self._rate(output_tokens), workers=self._workers_text(), what=what
            )
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._log()

    def _prefill_text(self) -> str:
        return f"prefill {self.shown_prefill:,}/{self.work[0]:,} tokens" if self.work else ""

    def _eta_text(self) -> str:
        """Seconds left at the rate so far, from the plan's work (an upper bound)."""
        if not self.work or self.work_done <= 0:
            return ""
        left = max(sum(self.work) - self.work_done, 0)
        return f", ETA {self.elapsed_s * left / self.work_done:.0f}s"

    def _log(self) -> None:
        self._last_log = time.monotonic()
        rows, output_tokens = self.shown
        prefill = f", {self._prefill_text()}" if self.work else ""
        tokens = f", {output_tokens} output tokens, {self._rate(output_tokens):.1f} tok/s" if self.count_tokens else ""
        print(
            f"[prefixbatch] {self.label}: {rows}/{self.total_rows} rows{prefill}{tokens}{self._workers_text()},"
            f" {self.elapsed_s:.0f}s{self._eta_text()}",
            file=self.stream,
            flush=True,
        )
