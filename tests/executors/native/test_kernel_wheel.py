"""An installed wheel builds the kernel library: every source and header of `kernels/` is in the
wheel (`[tool.setuptools.package-data]`), and a copy of prefixbatch installed from it, not the
editable checkout, compiles the library and runs attention through it (~30-60 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
KERNELS = ROOT / "prefixbatch" / "executors" / "native" / "kernels"
pytestmark = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("cc", "gcc")), reason="needs a C compiler to build the kernel"
)

# Run from the installed copy: the library built into a fresh cache, one attention call through
# it equal to PyTorch's.
INSTALLED = """
import json, torch, prefixbatch
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.span_kernel import load_span_kernel
from prefixbatch.executors.native.attention.tree import TreeAttention

kernel = load_span_kernel()
assert kernel is not None, "the installed copy did not build its kernel library"
plan = plan_attention([SegmentKV(0, None, 0, 5)], [QueryRun(0, 0, 0, 5)])  # a 5-token prefill
q, k, v = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
outs = []
for choice in (kernel, None):
    store = KVStore(num_layers=1, num_kv_heads=2, head_dim=16, capacity_tokens=5, dtype=torch.float32, device="cpu")
    attention = TreeAttention(store, plan, scale=0.25, kernel=choice)
    assert attention.kernel is choice
    outs.append(attention(0, q, k, v))
torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
print(json.dumps({"package": prefixbatch.__file__, "library": kernel.library._name}))
"""


@pytest.mark.slow
def test_the_wheel_carries_the_kernels_and_its_install_builds_them(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and egg-info beside its sources
    shutil.copytree(ROOT / "prefixbatch", source / "prefixbatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("prefixbatch-*.whl")
    inside = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("prefixbatch/executors/native/kernels/")}
    expected = {path.name for path in KERNELS.iterdir() if path.suffix in (".c", ".h")}
    assert expected <= inside, f"missing from the wheel: {sorted(expected - inside)}"

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site), "PREFIXBATCH_KERNEL_CACHE": str(tmp_path / "cache")}
    env.pop("PREFIXBATCH_SPAN_KERNEL", None)
    env.pop("PREFIXBATCH_KERNEL_MARCH", None)
    result = subprocess.run([sys.executable, "-c", INSTALLED], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(ran["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(ran["library"]).parent == tmp_path / "cache"
