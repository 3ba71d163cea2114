"""Greedy requests on the `vllm` executor in a process of its own: `python -m tests.real_model.vllm_run IN OUT`.

vLLM's CPU start-up walks every imported module's globals and fails on Flask's context
proxies, which the S3 tests' moto server brings into a test process that ran them first
(`tests/jobs/test_vllm_jobs.py`); a fresh process also keeps vLLM's thread binding and its
KV cache out of the test process. IN: JSON `{"model": folder, "requests": [[row, token ids,
max_tokens], ...]}`; OUT: JSON `[[row, token ids, finish_reason, text], ...]`.
"""

from __future__ import annotations

import json
import sys

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.types import Request, SamplingParams
from tests.executors.planned import planned

# nobind: one thread, left where the OS puts it (the tier runs beside other tests).
SPEC = ExecutorSpec(kind="vllm", device="cpu", vllm={"cpu_kv_cache_gib": 1, "cpu_threads_bind": "nobind"})


def main(source: str, target: str) -> None:
    from prefixbatch.executors.vllm_engine import VllmExecutor

    job = json.loads(open(source).read())
    requests = [Request(row, tuple(ids), SamplingParams(max_tokens=max_tokens)) for row, ids, max_tokens in job["requests"]]
    executor = VllmExecutor(ModelSpec(path=job["model"], dtype="float32"), SPEC)
    done = [[c.row_index, list(c.token_ids), c.finish_reason, c.text] for c in executor.generate(planned(requests, SPEC, kind="vllm"))]
    with open(target, "w") as out:
        json.dump(done, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
