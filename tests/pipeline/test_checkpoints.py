"""Checkpoint files: written whole, older ones removed after, the longest generation kept."""

from __future__ import annotations

from prefixbatch.pipeline.checkpoints import Checkpoints, merge
from prefixbatch.pipeline.commits import OutputFolder

FINGERPRINT = {"model": {}, "input": {}, "prefixbatch": "0"}


def test_a_new_checkpoint_replaces_the_older_and_resume_keeps_the_longest(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), mode="error")
    folder.open(FINGERPRINT)
    first = Checkpoints(folder)
    first.write({(0, 0): (1, 2), (1, 0): (9,)})
    first.write({(0, 0): (1, 2, 3)})
    assert [p.name for p in (tmp_path / "out" / "_checkpoints").iterdir()] == [f"{folder.attempt}-000001.json"]
    # another writer's (a later attempt, or another shard): both stay, the longest wins
    later = OutputFolder(str(tmp_path / "out"), mode="resume")
    (tmp_path / "out" / "_checkpoints" / f"{later.attempt}-000000.json").write_text(
        '{"partials": [[0, 0, [1]], [2, 1, [4, 4]]]}'
    )
    (tmp_path / "out" / "_checkpoints" / "_x.json.123.tmp").write_text("{")  # a write that died
    assert Checkpoints(later).load() == {(0, 0): (1, 2, 3), (2, 1): (4, 4)}
    assert len(list((tmp_path / "out" / "_checkpoints").glob("*.json"))) == 2
    assert merge({(0, 0): (1,), (5, 0): (7,)}, {(0, 0): (1, 2)}) == {(0, 0): (1, 2), (5, 0): (7,)}


def test_success_removes_the_checkpoints(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"), mode="error")
    folder.open(FINGERPRINT)
    Checkpoints(folder).write({(0, 0): (1,)})
    folder.mark_success([])
    assert not (tmp_path / "out" / "_checkpoints").exists() and (tmp_path / "out" / "_SUCCESS").exists()
