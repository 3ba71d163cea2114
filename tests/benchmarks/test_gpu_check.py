"""benchmarks/gpu_check.py runs end to end before a GPU is lent: its dry run (the CPU, tiny
shapes, the reference backend, FA2's packing emulated, Triton interpreted) with only the
packages a lent GPU machine has — torch, transformers, numpy, safetensors, triton —
importable; everything else prefixbatch uses (pydantic, pyarrow, dask, ...) hidden."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]

# What the lent machines do not have: hidden as a missing package looks (find_spec None, import fails).
HIDDEN = ("pydantic", "pydantic_core", "xgrammar", "pyarrow", "dask", "distributed", "fsspec", "polars", "rich",
          "psutil", "vllm", "s3fs", "hypothesis", "moto", "jsonschema")  # fmt: skip

RUN_HIDDEN = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, importlib.util, runpy, sys
    HIDDEN = set(sys.argv[1].split(","))
    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, None) if name.split(".")[0] in HIDDEN else None
    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in HIDDEN else real(name, package)
    sys.meta_path.insert(0, Hide())
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def test_the_dry_run_goes_end_to_end_with_only_what_a_gpu_machine_has(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "-c", RUN_HIDDEN, ",".join(HIDDEN), str(ROOT / "benchmarks" / "gpu_check.py"),
               "--dry-run", "--json", str(out), "--model-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert all("failed" not in checks[step] for step in ("probe", "contract", "exactness", "speed")), checks
    assert checks["contract"]["passed"] and checks["contract"]["cases"] > 0
    assert set(checks["contract"]["max_abs_error"]) >= {"flash-emulated/float32", "triton/float32"}
    exact = checks["exactness"]["hf-float32"]
    assert exact["identical"] == checks["exactness"]["prompts"]  # fp32 on the CPU: every token
    for scenario in ("a", "c"):
        for variant in gpu_check.VARIANTS:
            entry = report[f"{scenario}/{variant}"]  # the peer benchmark's fields
            assert {"walls", "generates", "computed", "unique", "output_tokens", "setup"} <= set(entry)
            assert 0 < entry["roofline"]["fraction"]
        assert report[f"{scenario}/new-path"]["computed"] == report[f"{scenario}/new-path"]["unique"]
        assert report[f"{scenario}/new-path-noshare"]["computed"] >= report[f"{scenario}/new-path"]["computed"]
    assert set(report["timings_s"]) == set(gpu_check.BUDGETS_S)


def test_the_device_run_fits_eight_minutes_by_construction():
    # Every step stops at its budget; with the model's build and loading, the call fits 8 minutes.
    assert sum(gpu_check.BUDGETS_S.values()) <= 7 * 60
