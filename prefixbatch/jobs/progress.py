"""Progress of a running job: a live rich bar on a terminal, plain log lines otherwise.

Counts rows done and output tokens; shows output tokens/s. Logs go to stderr so stdout
stays clean for `--json` style output.
"""

from __future__ import annotations

import sys
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
    """`with JobProgress(total_rows) as p: p.advance(rows, output_tokens)`."""

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
        self.rows = 0
        self.output_tokens = 0
        self.log_every_s = log_every_s
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
                TextColumn("rows" + rate),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task("generate", total=self.total_rows, tps=0.0)
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
    def tokens_per_s(self) -> float:
        return self.output_tokens / max(self.elapsed_s, 1e-9)

    def advance(self, rows: int, output_tokens: int) -> None:
        self.rows += rows
        self.output_tokens += output_tokens
        if self._bar is not None:
            self._bar.update(self._task, advance=rows, tps=self.tokens_per_s)
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._log()

    def _log(self) -> None:
        self._last_log = time.monotonic()
        tokens = (
            f", {self.output_tokens} output tokens, {self.tokens_per_s:.1f} tok/s"
            if self.count_tokens
            else ""
        )
        print(
            f"[prefixbatch] {self.label}: {self.rows}/{self.total_rows} rows{tokens}, {self.elapsed_s:.0f}s",
            file=self.stream,
            flush=True,
        )
