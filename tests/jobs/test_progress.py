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
    assert lines[0].startswith("[prefixbatch] generating: 0/4 rows, 0 output tokens, ")  # at once
    assert lines[1].startswith("[prefixbatch] generating: 3/4 rows, 12 output tokens, ")
    assert lines[-1].startswith("[prefixbatch] generating: 4/4 rows, 16 output tokens, ")


def test_tokenizing_progress_has_no_token_rate():
    stream = io.StringIO()
    with JobProgress(2, label="tokenizing", count_tokens=False, live=False, stream=stream) as progress:
        progress.advance(2, 0)
    assert stream.getvalue().strip().splitlines()[-1].startswith("[prefixbatch] tokenizing: 2/2 rows, ")
    assert "tok/s" not in stream.getvalue()


def test_default_is_live_only_on_a_terminal():
    assert JobProgress(1, stream=io.StringIO()).live is False


def test_work_under_way_shows_until_committed_and_late_reports_are_ignored():
    stream = io.StringIO()
    with JobProgress(10, live=False, stream=stream, log_every_s=0.0) as progress:
        progress.set_workers(2)
        progress.running("shard-a", 3, 30)
        progress.running("shard-b", 1, 10)
        assert progress.shown == (4, 40)
        progress.advance(5, 50, settles="shard-a")  # the shard's committed rows replace its reports
        progress.running("shard-a", 4, 40)  # a report that was on its way: ignored
        assert progress.shown == (6, 60)
        progress.settle("shard-b")  # lost with its worker: its rows run again elsewhere
        progress.set_workers(1)
        assert progress.shown == (5, 50) and (progress.rows, progress.output_tokens) == (5, 50)
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("[prefixbatch] generating: 0/10 rows") and "· 2 workers alive" in lines[1]
    assert "4/10 rows, 40 output tokens" in stream.getvalue()
    assert lines[-1].startswith("[prefixbatch] generating: 5/10 rows, 50 output tokens") and "· 1 worker alive" in lines[-1]


def test_live_bar_shows_workers_alive():
    stream = io.StringIO()
    with JobProgress(2, live=True, stream=stream) as progress:
        progress.set_workers(3)
        progress.advance(2, 4)
    assert "3 workers alive" in stream.getvalue()


def test_the_plans_work_drives_the_bar_and_the_eta_before_any_row_finishes():
    stream = io.StringIO()
    with JobProgress(4, live=False, stream=stream, log_every_s=0.0, work=(1000, 400)) as progress:
        progress.running("engine", 0, 0, 600)  # prefill under way, no row done
        progress.running("engine", 0, 50, 1000)
        assert progress.work_done == 1050 and progress.rows == 0
        progress.advance(1, 100, unused_tokens=0)
        progress.advance(1, 20, unused_tokens=80)  # stopped early: its unused budget is done
        assert progress.work_done == 1000 + 170 + 80
    lines = stream.getvalue().splitlines()
    assert lines[1].startswith("[prefixbatch] generating: 0/4 rows, prefill 600/1,000 tokens, 0 output tokens")
    assert lines[2].startswith("[prefixbatch] generating: 0/4 rows, prefill 1,000/1,000 tokens, 50 output tokens")
    assert "ETA" in lines[2]


def test_live_bar_shows_prefill_and_rows_with_a_plan():
    stream = io.StringIO()
    with JobProgress(2, live=True, stream=stream, work=(300, 20)) as progress:
        progress.running("engine", 0, 5, 300)
        progress.advance(2, 0)
    assert "2/2 rows · prefill 300/300 tokens" in stream.getvalue()
