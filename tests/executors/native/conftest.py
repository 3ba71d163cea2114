"""The kernel library in each build flavour (`$PREFIXBATCH_KERNEL_MARCH`), for the kernel tests.

`native` is the library the engine loads (the usual cache: built once a machine); the
portable flavours are built each into a folder of their own, once a session (~5-10 s each).
A flavour this CPU cannot run is skipped.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

FLAVOURS = ("native", "x86-64-v3", "x86-64-v2")
# Flags of /proc/cpuinfo that each portable flavour's instructions need (a telling few of them).
NEEDS = {"x86-64-v3": {"avx2", "fma", "bmi2", "movbe"}, "x86-64-v2": {"sse4_2", "popcnt", "ssse3"}}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.fixture(scope="session", params=FLAVOURS)
def kernel_build(request, tmp_path_factory):
    """The library built for one flavour (a `SpanKernel`)."""
    from prefixbatch.executors.native import span_kernel

    flavour = request.param
    if flavour != "native" and (platform.machine() != "x86_64" or not NEEDS[flavour] <= cpu_flags()):
        pytest.skip(f"this CPU does not run {flavour} code")
    with pytest.MonkeyPatch.context() as env:
        if flavour != "native":
            env.setenv(span_kernel.MARCH_ENV, flavour)
            env.setenv("PREFIXBATCH_KERNEL_CACHE", str(tmp_path_factory.mktemp(f"kernels-{flavour}")))
        built = span_kernel.load_span_kernel()
    assert built is not None, f"a C compiler is on PATH, yet the {flavour} library did not build"
    return built
