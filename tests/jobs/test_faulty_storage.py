"""Whole jobs on filesystems that fail the N-th write or rename, for every N a run reaches.

Two real fsspec filesystems with a fault injected: a local disk whose N-th write leaves a
torn half file behind and raises, or whose N-th rename raises; and an object store
(fsspec's memory filesystem) whose N-th PUT fails and stores nothing. After each failure
the folder must hold either the complete output (`_SUCCESS`, rows equal to a clean run's)
or a resumable one (no `_SUCCESS`; every committed row equal to the clean run's), and a
resume without faults must then finish it. Never a wrong one.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from prefixbatch.jobs.cli import main
from prefixbatch.pipeline.commits import read_committed
from tests.output_helpers import finished_output, without_cached


class Faults:
    """Which operation fails, and how many of them have run."""

    operation: str | None = None  # "write" | "rename"
    fail_at = 0
    seen = 0

    @classmethod
    def arm(cls, operation: str | None, fail_at: int = 0) -> None:
        cls.operation, cls.fail_at, cls.seen = operation, fail_at, 0

    @classmethod
    def should_fail(cls, operation: str) -> bool:
        if operation != cls.operation:
            return False
        cls.seen += 1
        return cls.seen == cls.fail_at


class FaultyLocal(LocalFileSystem):
    protocol = ("faultyfile",)

    def pipe_file(self, path, value, **kwargs):
        if Faults.should_fail("write"):
            with open(self._strip_protocol(path), "wb") as f:  # a torn write: half the bytes
                f.write(value[: len(value) // 2])
            raise OSError(28, "No space left on device (injected)")
        return super().pipe_file(path, value, **kwargs)

    def mv(self, path1, path2, **kwargs):
        if Faults.should_fail("rename"):
            raise OSError(5, "Input/output error (injected)")
        return super().mv(path1, path2, **kwargs)


class FaultyObjects(MemoryFileSystem):
    protocol = ("faultymem",)
    store: dict = {}  # its own objects, apart from memory://
    pseudo_dirs = [""]

    def pipe_file(self, path, value, **kwargs):
        if Faults.should_fail("write"):
            raise OSError(5, "PUT failed (injected)")  # an object store stores all or nothing
        return super().pipe_file(path, value, **kwargs)


fsspec.register_implementation("faultyfile", FaultyLocal, clobber=True)
fsspec.register_implementation("faultymem", FaultyObjects, clobber=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("faulty")
    rows = {"id": [f"q{i}" for i in range(14)], "prompt": [f"Question {i} about boats and {i % 3} trains" for i in range(14)]}
    rows["prompt"][4] = None  # an error row is committed like any other
    pq.write_table(pa.table(rows), folder / "in.parquet")
    spec = {
        "name": "faulty",
        "input": {"path": str(folder / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(folder / "clean"), "rows_per_part": 5},
        "model": {"path": str(tiny_llama)},
        "sampling": {"max_tokens": 3},
        "executor": {"kind": "native"},
    }
    (folder / "clean.json").write_text(json.dumps(spec))
    Faults.arm(None)
    assert main(["run", str(folder / "clean.json"), "--no-progress"]) == 0
    clean = {r["id"]: r for r in finished_output(str(folder / "clean"))}
    return folder, spec, clean



def run_with_fault(folder, spec: dict, url: str, operation: str, fail_at: int, capsys) -> int:
    path = folder / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps({**spec, "output": {**spec["output"], "path": url}}))
    Faults.arm(operation, fail_at)
    code = main(["run", str(path), "--no-progress", "--resume"])
    err = capsys.readouterr().err
    reached = Faults.seen >= fail_at
    Faults.arm(None)
    if reached:
        assert code == 2 and "failed (" in err and "--resume" in err and "Traceback" not in err, err
    else:
        assert code == 0, err
    return path, reached


def check_folder_then_resume(path, url: str, clean: dict, is_success) -> None:
    committed = {r["id"]: r for r in read_committed(url).to_pylist()}
    assert without_cached(committed) == without_cached({k: clean[k] for k in committed})
    if is_success():
        assert len(committed) == len(clean)
    assert main(["run", str(path), "--no-progress", "--resume"]) == 0
    final = {r["id"]: r for r in finished_output(url)}
    assert without_cached(final) == without_cached(clean)


@pytest.mark.parametrize("operation", ["write", "rename"])
def test_local_disk_failing_the_nth_write_or_rename(job, tmp_path, operation, capsys):
    folder, spec, clean = job
    fs = fsspec.filesystem("faultyfile")
    failures = 0
    for fail_at in range(1, 40):
        url = f"faultyfile://{tmp_path}/out-{operation}-{fail_at}"
        path, reached = run_with_fault(folder, spec, url, operation, fail_at, capsys)
        if not reached:  # this run does fewer operations: every failure point was covered
            break
        failures += 1
        check_folder_then_resume(path, url, clean, lambda fail_at=fail_at: fs.exists(f"{tmp_path}/out-{operation}-{fail_at}/_SUCCESS"))
    assert failures >= 10  # job file, 3 parts, 3 commits, manifest, summary, _SUCCESS


def test_object_store_failing_the_nth_put(job, capsys):
    folder, spec, clean = job
    fs = fsspec.filesystem("faultymem")
    failures = 0
    for fail_at in range(1, 40):
        root = f"/bucket-{uuid.uuid4().hex[:8]}/out"
        url = f"faultymem://{root}"
        path, reached = run_with_fault(folder, spec, url, "write", fail_at, capsys)
        if not reached:
            break
        failures += 1
        check_folder_then_resume(path, url, clean, lambda root=root: fs.exists(f"{root}/_SUCCESS"))
    assert failures >= 10
