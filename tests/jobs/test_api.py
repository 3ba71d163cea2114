"""The Python API: validate, plan and run a job from a dict, a file or a JobSpec."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefixbatch
from prefixbatch.jobs.cli import main


def test_validate_plan_and_run_from_a_dict_match_the_cli(tmp_path, tiny_llama, capsys):
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["a b c", "a b d", "x"]}), tmp_path / "in.parquet")
    job = {
        "name": "api",
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "out")},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 3},
    }
    assert prefixbatch.validate(job) == "3 rows, 3 to generate, 0 would be error rows; device cpu (auto)"
    preview = prefixbatch.plan(job)
    summary = prefixbatch.run(job)
    assert isinstance(summary, prefixbatch.RunSummary) and summary.rows == 3
    assert summary.plan["digest"] == preview.plan.digest()

    (tmp_path / "job.json").write_text(json.dumps({**job, "output": {"path": str(tmp_path / "cli")}}))
    assert main(["run", str(tmp_path / "job.json"), "--no-progress"]) == 0
    cli = json.loads((tmp_path / "cli" / "_summary.json").read_text())
    assert cli["plan"] == summary.plan and cli["output_tokens"] == summary.output_tokens
    spec = prefixbatch.load_job(tmp_path / "job.json", overrides=["sampling.max_tokens=2"])
    assert isinstance(spec, prefixbatch.JobSpec) and spec.sampling.max_tokens == 2


def test_a_mistake_is_a_user_error(tmp_path):
    with pytest.raises(prefixbatch.UserError, match="unknown field"):
        prefixbatch.load_job({"name": "x", "input": {"path": "a"}, "output": {"path": "b"}, "model": {"path": "m"}, "oops": 1})
    with pytest.raises(TypeError, match="`job` must be"):
        prefixbatch.load_job(42)
