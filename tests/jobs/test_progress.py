"""Progress: a live bar when asked (a terminal), plain log lines otherwise."""

import io

from prefixbatch.jobs.progress import JobProgress


def test_live_bar_shows_rows_and_token_rate():
    stream = io.StringIO()
    with JobProgress(10, live=True, stream=stream) as progress:
        for _ in range(10):
            progress.advance(1, 5)
    text = stream.getvalue()
    assert "generating" in text and "10/10" in text and "output tok/s" in text
    assert progress.rows == 10 and progress.output_tokens == 50


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with JobProgress(4, live=False, stream=stream, log_every_s=0.0) as progress:
        progress.advance(3, 12)
        progress.advance(1, 4)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[prefixbatch] generating: 3/4 rows, 12 output tokens, ")
    assert lines[-1].startswith("[prefixbatch] generating: 4/4 rows, 16 output tokens, ")


def test_tokenizing_progress_has_no_token_rate():
    stream = io.StringIO()
    with JobProgress(2, label="tokenizing", count_tokens=False, live=False, stream=stream) as progress:
        progress.advance(2, 0)
    assert stream.getvalue().strip().startswith("[prefixbatch] tokenizing: 2/2 rows, ")
    assert "tok/s" not in stream.getvalue()


def test_default_is_live_only_on_a_terminal():
    assert JobProgress(1, stream=io.StringIO()).live is False
