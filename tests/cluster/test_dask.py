"""Jobs on a real Dask LocalCluster of worker processes: the same output as one process,
shared prefixes computed on one worker, workers lost mid-job, a row that kills every worker,
a cluster left without workers, one worker per GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefixbatch.jobs.run import run_job
from prefixbatch.jobs.spec import spec_from_dict
from prefixbatch.pipeline.commits import ranges_to_indices
from tests.jobs.test_resume import run_cli
from tests.jobs.test_run import SYSTEMS as RUN_SYSTEMS
from tests.jobs.test_run import conversation as run_conversation
from tests.output_helpers import finished_output, without_cached

# A hang on a cluster is a failure with a traceback, not a test run that never ends.
pytestmark = pytest.mark.timeout(600)

# The three system prompts of the run tests and a fourth: 4 shards, one prompt each.
SYSTEMS = (*RUN_SYSTEMS, "You are a patient chess teacher for beginners.")
NUM_ROWS = 32


def conversation(i: int) -> list[dict]:
    return run_conversation(i, SYSTEMS)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("dask")
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table({
        "id": [f"q{i:02d}" for i in range(NUM_ROWS)],
        "messages": pa.array([conversation(i) for i in range(NUM_ROWS)], messages),
        "max_tokens": [3 + i % 4 for i in range(NUM_ROWS)],
    })
    pq.write_table(table, folder / "in.parquet")
    base = {
        "name": "dask",
        "input": {"path": str(folder / "in.parquet"), "messages_column": "messages"},
        "output": {"path": str(folder / "local"), "rows_per_part": 4},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 6},
        "executor": {"kind": "native"},
    }
    run_job(spec_from_dict(base, base_dir=folder, source="test"), live_progress=False, log=lambda _: None)
    local = {r["id"]: r for r in finished_output(str(folder / "local"))}
    return folder, base, local


def dask_spec(base: dict, output, **cluster) -> dict:
    return {
        **base,
        "output": {**base["output"], "path": str(output)},
        "cluster": {"kind": "dask", "local_workers": 2, "threads_per_worker": 1, "shards_per_worker": 2, **cluster},
    }


def run(spec: dict, folder):
    return run_job(spec_from_dict(spec, base_dir=folder, source="test"), live_progress=False, log=lambda _: None)


def test_two_workers_give_the_local_output_and_each_system_prompt_runs_on_one_worker(job, tmp_path, capsys):
    folder, base, local = job
    summary = run(dask_spec(base, tmp_path / "out"), folder)
    last = [line for line in capsys.readouterr().err.splitlines() if "generating:" in line][-1]
    assert "32/32 rows" in last and "· 2 workers alive" in last  # the bar covers the cluster
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert summary.output_tokens == sum(r["num_output_tokens"] for r in output.values())
    assert summary.output_tokens_per_s > 0  # counted from the workers' parts too
    assert without_cached(output) == without_cached(local)
    shards = summary.shards
    assert len(shards) == 4 and len({s["pid"] for s in shards}) == 2  # both workers worked
    assert len({(s["pid"], s["engine_loaded_at"]) for s in shards}) == 2  # one engine load per worker
    worker_of_row = {int(row): s["worker"] for s in shards for row in ranges_to_indices(s["rows"])}
    for system in range(4):  # every row under a system prompt ran on one worker, in one shard
        rows = [i for i in range(NUM_ROWS) if i % 4 == system]
        assert len({worker_of_row[i] for i in rows}) == 1
        assert len({s["shard"] for s in shards for i in rows if i in ranges_to_indices(s["rows"])}) == 1
    # Prefill work: each system prompt once (shard statistics add up to one pass over the
    # tree, plus the chat template's few header tokens every shard starts with).
    assert sum(s["prefill_tokens"] for s in shards) == summary.prefill_tokens_computed
    local_summary = json.loads((folder / "local" / "_summary.json").read_text())
    assert summary.prefill_tokens_computed <= local_summary["prefill_tokens_computed"] + 4 * 16


@pytest.mark.parametrize("plan_on", ["driver", "workers"])
def test_a_worker_killed_mid_job_costs_a_retry_not_a_row(job, tmp_path, monkeypatch, plan_on):
    folder, base, local = job
    monkeypatch.setenv("PREFIXBATCH_FAULT", "decode:3")
    monkeypatch.setenv("PREFIXBATCH_FAULT_ONCE", str(tmp_path / "killed-once"))
    summary = run(dask_spec(base, tmp_path / "out", plan_on=plan_on), folder)
    assert (tmp_path / "killed-once").exists()  # a worker did die mid-decode
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)
    assert len(summary.shards) == 4  # every shard committed once, whichever worker ran it


@pytest.mark.parametrize("plan_on", ["driver", "workers"])
def test_a_row_that_kills_every_worker_becomes_an_error_row(job, tmp_path, monkeypatch, plan_on):
    folder, base, local = job
    monkeypatch.setenv("PREFIXBATCH_CRASH_ROW", "9")
    summary = run(dask_spec(base, tmp_path / "out", max_attempts=1, plan_on=plan_on), folder)
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert set(output) == set(local)
    crashed = output.pop("q09")
    assert crashed["finish_reason"] == "error" and crashed["error"].startswith("worker_crash: ")
    assert without_cached(output) == without_cached({k: v for k, v in local.items() if k != "q09"})
    assert summary.errors_by_code == {"worker_crash": 1}


@pytest.mark.parametrize("plan_on", ["driver", "workers"])
def test_a_driver_killed_mid_job_resumes_on_the_cluster(job, tmp_path, plan_on):
    """The driver (a CLI process, client of a cluster that outlives it) dies by SIGKILL after
    its second commit; resuming on the same cluster runs only the rows no commit covers."""
    from distributed import LocalCluster

    folder, base, local = job
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spec = dask_spec(base, tmp_path / "out")
        spec["cluster"] = {"kind": "dask", "address": cluster.scheduler_address, "shards_per_worker": 2, "plan_on": plan_on}
        path = tmp_path / "job.json"
        path.write_text(json.dumps(spec))
        killed = run_cli(path, fault="committed:2")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = run_cli(path, fault=None)
        assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert 0 < summary["resumed_rows"] < NUM_ROWS  # the first run's commits were kept, not redone
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)


def test_a_driver_stopped_by_sigterm_mid_job_commits_what_is_done_and_resumes_on_the_cluster(job, tmp_path):
    """SIGTERM reaches the driver right after its first commit, while other shards decode on
    the workers: it places no more shards, exits 143 naming the committed rows and the resume
    command; resuming on the same cluster gives the local output exactly."""
    from distributed import LocalCluster

    folder, base, local = job
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spec = dask_spec(base, tmp_path / "out")
        spec["cluster"] = {"kind": "dask", "address": cluster.scheduler_address, "shards_per_worker": 2}
        path = tmp_path / "job.json"
        path.write_text(json.dumps(spec))
        stopped = run_cli(path, fault="committed:1", fault_signal="TERM")
        assert stopped.returncode == 143, stopped.stderr
        assert "SIGTERM: stopping" in stopped.stderr and "input rows are committed in" in stopped.stderr
        assert stopped.stderr.strip().endswith(f"prefixbatch run {path} --no-progress --resume")
        resumed = run_cli(path, fault=None)
        assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert 0 < summary["resumed_rows"] < NUM_ROWS
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)


def test_shards_run_only_on_workers_with_the_resources_and_none_is_a_user_error(job, tmp_path):
    from distributed import LocalCluster

    from prefixbatch.errors import UserError

    folder, base, local = job
    # Workers of 2 threads that hold one "slot" each: one shard at a time per worker.
    summary = run(dask_spec(base, tmp_path / "out", threads_per_worker=2, resources={"slot": 1}), folder)
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local) and len({s["pid"] for s in summary.shards}) == 2
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        spec = dask_spec(base, tmp_path / "out2")
        spec["cluster"] = {"kind": "dask", "address": cluster.scheduler_address, "resources": {"GPU": 1}}
        with pytest.raises(UserError, match=r"cluster.resources GPU=1: no worker of inproc://.* has them \(workers have: none\)"):
            run(spec, folder)
    assert not (tmp_path / "out2" / "_SUCCESS").exists()


def test_a_cluster_left_without_workers_stops_with_an_error_in_bounded_time_and_resumes(job, tmp_path, monkeypatch):
    """The only worker of a running cluster leaves for good after the first shard, just as the
    next shard is handed to it: that shard counts as its worker's death a few seconds later
    (Dask itself would keep it waiting for a worker forever), and with no worker for
    `worker_wait_s` the run stops with an error naming the scheduler; the committed rows are
    kept and a resume on a cluster with workers gives the local output."""
    from distributed import LocalCluster

    from prefixbatch.cluster.placer import Placer
    from prefixbatch.errors import UserError

    folder, base, local = job
    submit, handed = Placer._submit, []

    def leave_then_submit(placer, task, where):
        if handed:  # the second shard: its worker leaves first (gone from the scheduler's list)
            cluster.scale(0)
            deadline = time.monotonic() + 60
            while placer.client.scheduler_info()["workers"] and time.monotonic() < deadline:
                time.sleep(0.05)
        handed.append(task.shard_id)
        submit(placer, task, where)

    monkeypatch.setattr(Placer, "_submit", leave_then_submit)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spec = dask_spec(base, tmp_path / "out")
        address = cluster.scheduler_address
        spec["cluster"] = {"kind": "dask", "address": address, "shards_per_worker": 4, "worker_wait_s": 2}
        started = time.monotonic()
        message = rf"^no worker of the Dask scheduler at {re.escape(address)} could take a task for \d+ s \(cluster.worker_wait_s 2\).* --resume"
        with pytest.raises(UserError, match=message):
            run(spec, folder)
        assert time.monotonic() - started < 120
    assert len(handed) == 2  # one shard committed, one lost with its worker
    monkeypatch.undo()
    resumed = dask_spec(base, tmp_path / "out")
    run({**resumed, "output": {**resumed["output"], "mode": "resume"}}, folder)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert 0 < summary["resumed_rows"] < NUM_ROWS
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)


def test_local_workers_gpus_starts_one_worker_per_visible_gpu_pinned_to_it(job, tmp_path, monkeypatch):
    """`local_workers: gpus` on a machine whose visible GPUs are 3 and 5 (faked: this machine
    has none): two workers, each seeing only its own device and holding one GPU, and shards
    placed on them as on any workers (run here on the CPU)."""
    from distributed import Client

    from prefixbatch.cluster import local_cluster
    from prefixbatch.cluster.dask_run import count_shards

    folder, base, local = job
    monkeypatch.setattr(local_cluster, "visible_gpus", lambda: ["3", "5"])
    raw = dask_spec({**base, "executor": {**base["executor"], "device": "cpu"}}, tmp_path / "out", local_workers="gpus")
    cluster_spec = spec_from_dict(raw, base_dir=folder, source="test").cluster
    assert cluster_spec.resources == {"GPU": 1} and count_shards(cluster_spec) == 2 * 2
    with local_cluster.start_local_cluster(cluster_spec) as cluster, Client(cluster, set_as_default=False) as client:
        devices = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = client.scheduler_info()["workers"]
    assert sorted(devices.values()) == ["3", "5"]
    assert [w["resources"] for w in workers.values()] == [{"GPU": 1}, {"GPU": 1}]
    summary = run(raw, folder)
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)
    assert len(summary.shards) == 4 and len({s["pid"] for s in summary.shards}) == 2


def test_a_model_a_worker_cannot_load_is_a_user_error_naming_the_worker(job, tmp_path):
    import shutil

    from prefixbatch.errors import UserError

    folder, base, local = job
    model = shutil.copytree(base["model"]["path"], tmp_path / "model")
    with open(model / "model.safetensors", "r+b") as weights:
        weights.truncate(1000)  # the driver sees a model folder; the workers cannot read it
    spec = dask_spec({**base, "model": {"path": str(model)}}, tmp_path / "out")
    with pytest.raises(UserError, match=r"^worker tcp://[\d.:]+: model.path .*: cannot read model.safetensors"):
        run(spec, folder)


def test_planning_on_the_workers_gives_the_local_output_with_each_prefix_on_one_worker(job, tmp_path):
    folder, base, local = job
    spec = dask_spec(base, tmp_path / "out", plan_on="workers")
    summary = run(spec, folder)
    output = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    assert without_cached(output) == without_cached(local)
    shards = summary.shards
    assert len(shards) == 4 and len({s["pid"] for s in shards}) == 2
    shard_of_row = {int(row): s["shard"] for s in shards for row in ranges_to_indices(s["rows"])}
    for system in range(4):  # the rows under a system prompt landed in one partition
        assert len({shard_of_row[i] for i in range(NUM_ROWS) if i % 4 == system}) == 1
    local_summary = json.loads((folder / "local" / "_summary.json").read_text())
    assert summary.prefill_tokens_computed <= local_summary["prefill_tokens_computed"] + 4 * 16
    assert summary.input_rows == NUM_ROWS and summary.rows == NUM_ROWS


def test_planning_on_the_workers_with_several_files_error_rows_samples_and_carried_columns(tiny_llama, tmp_path):
    """Two input files, rows that are errors, rows with n = 2 samples, a carried column: the
    same rows as a local run, every (id, sample) once."""
    from tests.jobs.test_resume import by_key, write_input

    inputs = write_input(tmp_path / "in")
    for k in range(2):  # a carried column, of the rows' own values
        path = tmp_path / "in" / f"in-{k}.parquet"
        table = pq.read_table(path)
        pq.write_table(table.append_column("topic", pa.array([f"t{i}" for i in range(table.num_rows)])), path)
    base = {
        "name": "files",
        "input": {"path": str(tmp_path / "in" / "*.parquet"), "messages_column": "messages", "carry_columns": ["topic"]},
        "output": {"path": str(tmp_path / "local"), "rows_per_part": 5},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 6},
        "executor": {"kind": "native"},
    }
    local_summary = run(base, tmp_path)
    local = by_key(finished_output(str(tmp_path / "local")))
    summary = run(dask_spec(base, tmp_path / "out", plan_on="workers"), tmp_path)
    output = by_key(finished_output(str(tmp_path / "out")))
    assert without_cached(output) == without_cached(local)
    assert {r["finish_reason"] for r in output.values()} >= {"error", "length"} and len(output) > len(inputs)
    assert summary.errors_by_code == local_summary.errors_by_code and summary.input_rows == len(inputs)


def long_job(tmp_path, tiny_llama) -> tuple[dict, object]:
    """8 rows generating 1,500 tokens each, checkpointed every 0.3 s; its one-process summary."""
    prompts = [f"Chapter {i}. The lighthouse keeper {i} wrote in the log" for i in range(8)]
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(8)], "prompt": prompts}), tmp_path / "in.parquet")
    base = {
        "name": "dask-checkpoints",
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "local"), "checkpoint_seconds": 0.3},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 1500},
        # Exact across resumes and batch mates (workers vs one process): see test_checkpoints.
        "executor": {"kind": "native", "device": "cpu", "native": {"batch_invariant": True}},
    }
    local = run_job(spec_from_dict(base, base_dir=tmp_path, source="test"), live_progress=False, log=lambda _: None)
    return base, local


def check_resumed_from_checkpoints(tmp_path, local, at_least: int) -> None:
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["tokens_reused_from_checkpoints"] >= at_least and summary["rows_resumed_mid_generation"] >= 1
    assert summary["decode_tokens_computed"] <= local.decode_tokens_computed - summary["tokens_reused_from_checkpoints"]
    got = {r["id"]: r for r in finished_output(str(tmp_path / "out"))}
    want = {r["id"]: r for r in finished_output(str(tmp_path / "local"))}
    assert without_cached(got) == without_cached(want)


def test_sigterm_mid_decode_stops_the_workers_within_a_step_and_they_checkpoint(tmp_path, tiny_llama):
    """SIGTERM to the driver while every shard decodes: the workers stop within a step, save
    what is in flight, hand back their whole rows; exit 143 within 10 s; the resume on the same
    cluster continues every generation (no decode token of the stopped run is recomputed)."""
    import os
    import re
    import subprocess
    import sys
    import time

    from distributed import LocalCluster

    base, local = long_job(tmp_path, tiny_llama)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFIXBATCH_FAULT", None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spec = {**base, "output": {**base["output"], "path": str(tmp_path / "out"), "checkpoint_seconds": 600},
                "cluster": {"kind": "dask", "address": cluster.scheduler_address, "shards_per_worker": 1}}
        path = tmp_path / "job.json"
        path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "prefixbatch", "run", str(path), "--no-progress", "--log-every", "0.2"]
        driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        for line in driver.stderr:
            tokens = re.search(r"generating: \d+/\d+ rows, .* (\d+) output tokens", line)
            if tokens and int(tokens.group(1)) >= 300:
                break
        signalled = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        rest = driver.stderr.read()
        assert driver.wait(timeout=15) == 143, rest
        assert time.monotonic() - signalled < 10
        assert "input rows are committed in" in rest and "--resume" in rest
        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
    # checkpoints every 600 s: what the resume reuses was saved by the workers at the stop
    check_resumed_from_checkpoints(tmp_path, local, at_least=300)


@pytest.mark.parametrize("plan_on", ["driver", "workers"])
def test_workers_checkpoint_their_generations_and_a_resume_continues_them(tmp_path, tiny_llama, plan_on):
    """A long generation on a cluster that outlives its driver: the driver is SIGKILLed once
    the workers' checkpoints hold tokens; resuming on the same cluster continues those
    generations (fewer decode tokens) and gives the one-process output exactly (greedy),
    whether the driver plans or each partition is planned on its worker."""
    import os
    import subprocess
    import sys
    import time

    from distributed import LocalCluster

    from prefixbatch.pipeline.checkpoints import Checkpoints
    from prefixbatch.pipeline.commits import OutputFolder

    base, local = long_job(tmp_path, tiny_llama)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PREFIXBATCH_FAULT", None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        spec = {**base, "output": {**base["output"], "path": str(tmp_path / "out")},
                "cluster": {"kind": "dask", "address": cluster.scheduler_address, "shards_per_worker": 1,
                            "plan_on": plan_on}}
        path = tmp_path / "job.json"
        path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "prefixbatch", "run", str(path), "--no-progress"]
        driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder = OutputFolder(str(tmp_path / "out"), mode="resume")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and sum(map(len, Checkpoints(folder).load().values())) < 100:
            assert driver.poll() is None, "the job ended before the workers checkpointed"
            time.sleep(0.05)
        driver.kill()
        driver.wait(timeout=10)
        resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
    check_resumed_from_checkpoints(tmp_path, local, at_least=100)
