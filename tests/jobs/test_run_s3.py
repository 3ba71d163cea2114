"""`prefixbatch run` reading from and writing to s3:// on a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from prefixbatch.jobs.cli import main
from tests.jobs.test_run import Oracle, conversation, input_table
from tests.output_helpers import finished_output


def test_run_from_and_to_s3(tmp_path, tiny_llama, s3_server):
    bucket = s3_server.create_bucket()
    fs = s3_server.filesystem()
    rows = [
        {"id": f"s{i}", "messages": conversation(i), "max_tokens": 3 + i % 5, "temperature": None,
         "topic": f"t{i % 3}", "weight": float(i), "stop": None, "stop_token_ids": None}
        for i in range(40)
    ]
    for k in range(2):
        with fs.open(f"{bucket}/in/part-{k}.parquet", "wb") as f:
            pq.write_table(input_table(rows[k * 20:(k + 1) * 20]), f)
    spec = {
        "name": "s3",
        "input": {"path": f"s3://{bucket}/in/*.parquet", "messages_column": "messages",
                  "carry_columns": ["topic"], "storage_options": s3_server.storage_options},
        "output": {"path": f"s3://{bucket}/out", "rows_per_part": 16, "storage_options": s3_server.storage_options},
        "model": {"path": str(tiny_llama)},
    }
    (tmp_path / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML too
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0

    rows_out = finished_output(f"s3://{bucket}/out", s3_server.storage_options)
    assert len(fs.ls(f"{bucket}/out/_commits")) == 3  # 40 rows at 16 a part: 3 parts, 3 commits
    output = {r["id"]: r for r in rows_out}
    assert len(output) == len(rows_out)
    assert sorted(output) == sorted(r["id"] for r in rows)
    oracle = Oracle(tiny_llama)
    for row in rows:
        out = output[row["id"]]
        ids, reason = oracle.greedy(row["messages"], row["max_tokens"])
        assert (out["output_token_ids"], out["finish_reason"], out["topic"]) == (ids, reason, row["topic"])
        assert out["output_text"] == oracle.tokenizer.decode(ids, skip_special_tokens=True)
    summary = json.loads(fs.cat(f"{bucket}/out/_summary.json"))
    assert summary["rows"] == 40 and summary["error_rows"] == 0
