"""`plan` shows exactly what `run` executes: the same digest, groups and shards, and the
prefill tokens the plan predicts are the ones the executors compute — for jobs of several
shapes and KV budgets, in one process and on a real Dask LocalCluster."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.cli import main

SYSTEMS = ("You answer questions about trains. ", "You are a gardener who loves roses. ", "Reply in short rhymes. ")
WORDS = "apple river stone cloud lamp seed tower bread violin ocean".split()


def prompts(shape: str) -> list[str]:
    rnd = random.Random(7)
    if shape == "systems":  # shared system prompts
        return [SYSTEMS[i % 3] + f"Question {i}: " + " ".join(rnd.sample(WORDS, 3)) for i in range(18)]
    if shape == "two_level":  # instruction × few-shot block × question
        return [
            f"Task {a}: sort the words. " + f"Example {b}: {' '.join(WORDS[b:b + 4])}. " + f"Now: {WORDS[c]}"
            for a in range(2) for b in range(3) for c in range(3)
        ]
    # no sharing: every prompt starts differently
    return [f"{w}{i} " + " ".join(rnd.sample(WORDS, 4)) for i, w in enumerate(WORDS + WORDS[:6])]


def write_job(folder, model, shape: str, *, n: int = 1, executor: str = "native", budget=None, cluster=None) -> str:
    texts = prompts(shape)
    pq.write_table(pa.table({"id": list(range(len(texts))), "prompt": texts}), folder / "in.parquet")
    spec = {
        "name": f"plan-is-run-{shape}",
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "model": {"path": str(model)},
        "sampling": {"max_tokens": 4, "n": n, "temperature": 0.8 if n > 1 else 0.0},
        "executor": {"kind": executor, "device": "cpu", "kv_budget_tokens": budget},
    }
    if cluster:
        spec["cluster"] = cluster
    (folder / "job.json").write_text(json.dumps(spec))
    return str(folder / "job.json")


def plan_then_run(spec: str, folder, capsys) -> tuple[dict, dict]:
    assert main(["plan", spec, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["plan"]
    assert main(["run", spec, "--no-progress"]) == 0
    summary = json.loads((folder / "out" / "_summary.json").read_text())
    return planned, summary


def check_same(planned: dict, summary: dict) -> None:
    assert summary["plan"] == planned  # digest, groups, shards, predicted prefill and peak KV
    executed = summary["executed"]
    assert executed["prefill_tokens"] == planned["prefill_tokens"] == summary["prefill_tokens_computed"]
    assert executed["groups"] == planned["groups"]


@pytest.mark.parametrize(
    ("shape", "n", "budget", "min_groups"),
    [
        ("systems", 1, None, 1),
        ("systems", 1, 200, 3),  # groups split by the budget
        ("two_level", 1, None, 1),
        ("two_level", 1, 120, 4),
        ("none", 1, 150, 3),
        ("systems", 3, 300, 3),  # n samples share their prompt
    ],
)
def test_plan_and_run_agree_in_one_process(tmp_path, tiny_llama, capsys, shape, n, budget, min_groups):
    spec = write_job(tmp_path, tiny_llama, shape, n=n, budget=budget)
    planned, summary = plan_then_run(spec, tmp_path, capsys)
    check_same(planned, summary)
    assert planned["groups"] >= min_groups and planned["shards"] == 1
    assert planned["kv_budget_tokens"] == (budget or 131_072)
    assert planned["group_budget_tokens"] == planned["kv_budget_tokens"] // 2
    if shape != "none":
        assert planned["prefill_tokens"] < summary["prompt_tokens"]  # sharing was planned and done


def test_the_cpu_budget_shrinks_to_what_memory_holds(tmp_path, tiny_llama, capsys, monkeypatch):
    """A model whose default budget (131,072 tokens) would not fit in half the memory available
    after its weights gets the largest power of two that does, in `plan` and `run` alike."""
    import psutil

    from prefixbatch.model_folder import kv_bytes_per_token, read_config, weights_bytes

    available = 200 * 2**20
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    config = read_config(str(tiny_llama))
    fits = (available - weights_bytes(str(tiny_llama), config, 4)) // 2 // kv_bytes_per_token(config, 4)
    spec = write_job(tmp_path, tiny_llama, "systems")
    planned, summary = plan_then_run(spec, tmp_path, capsys)
    check_same(planned, summary)
    assert planned["kv_budget_tokens"] == 32_768 <= fits < 65_536


def test_hf_is_planned_without_sharing_and_computes_what_it_predicts(tmp_path, tiny_llama, capsys):
    spec = write_job(tmp_path, tiny_llama, "systems", executor="hf", budget=400)
    planned, summary = plan_then_run(spec, tmp_path, capsys)
    check_same(planned, summary)
    assert planned["prefix_sharing"] is False
    assert planned["prefill_tokens"] == summary["prompt_tokens"]


@pytest.mark.parametrize(("shape", "n", "budget"), [("systems", 1, None), ("two_level", 2, 160)])
def test_plan_and_run_agree_on_a_dask_cluster(tmp_path, tiny_llama, capsys, shape, n, budget):
    cluster = {"kind": "dask", "local_workers": 2, "threads_per_worker": 1, "shards_per_worker": 2}
    spec = write_job(tmp_path, tiny_llama, shape, n=n, budget=budget, cluster=cluster)
    planned, summary = plan_then_run(spec, tmp_path, capsys)
    check_same(planned, summary)
    assert planned["shards"] == 4
    ran = [s for s in summary["shards"]]
    assert 1 < len(ran) <= 4
    assert sum(s["prefill_tokens"] for s in ran) == planned["prefill_tokens"]
