"""Reading a finished output folder the way a user should: through its commit records."""

from __future__ import annotations

import json

import fsspec

from prefixbatch.pipeline.commits import read_committed

SIDE_FILES = {"_SUCCESS", "_commits", "_job.json", "_manifest.json", "_summary.json"}


def finished_output(url: str, storage_options: dict | None = None) -> list[dict]:
    """The committed rows of a finished job, after checking the folder holds exactly the
    manifest's parts and the side files."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    manifest = json.loads(fs.cat_file(f"{path}/_manifest.json"))
    parts = {part["file"] for part in manifest["parts"]}
    names.discard("_openai_batch_output.jsonl")  # output.format: openai
    assert names == SIDE_FILES | parts, names ^ (SIDE_FILES | parts)
    rows = read_committed(url, storage_options=storage_options).to_pylist()
    assert len(rows) == manifest["output_rows"]
    return rows


def without_cached(rows: dict) -> dict:
    """Rows keyed as given, with `num_cached_prompt_tokens` blanked: the one column that
    depends on which rows ran together (a resumed run or a shard shares with fewer rows)."""
    return {key: {**row, "num_cached_prompt_tokens": None} for key, row in rows.items()}
