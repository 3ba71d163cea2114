"""The kernel library on disk (`kernel_library`): where it is built, when it is trusted, what a
failed build leaves, and what each build flavour holds.

Most cases build a one-function library (`tiny`: a tenth of a second) through the same
`load_library` the span kernel goes through; a few go through `load_span_kernel` itself,
seeding the cache with a copy of this machine's library where what is tested is not the build.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from prefixbatch.executors.native import kernel_library, span_kernel
from prefixbatch.executors.native.kernel_library import CACHE_ENV, Recipe, load_library
from prefixbatch.executors.native.span_kernel import load_span_kernel

from .conftest import cpu_flags

COMPILER = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C compiler to build the library")
IS_ROOT = hasattr(os, "getuid") and os.getuid() == 0


@pytest.fixture(scope="module")
def genuine() -> Path:
    """This machine's span kernel library, from its usual cache (built there once a machine)."""
    kernel = load_span_kernel()
    assert kernel is not None, "a C compiler is on PATH, yet the span kernel did not build"
    return Path(kernel.library._name)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh $PREFIXBATCH_KERNEL_CACHE, and a temporary folder of the test's own."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(span_kernel, "_loaded", {})
    return tmp_path / "cache"


def tiny(tmp_path: Path) -> Recipe:
    source = tmp_path / "tiny.c"
    source.write_text("int pb_answer(void) { return 42; }\n")
    return Recipe("tiny", (source,), (), ("-O1", "-fPIC", "-shared"), "uses its fallback")


def where(library: ctypes.CDLL) -> Path:
    return Path(library._name)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def planted(tmp_path: Path, marker: Path) -> bytes:
    """A library that, once loaded, leaves `marker` behind (its constructor runs at load)."""
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
        "int pb_answer(void) { return 666; }\n"
    )
    subprocess.run([COMPILER, "-fPIC", "-shared", str(source), "-o", str(tmp_path / "planted.so")], check=True)
    return (tmp_path / "planted.so").read_bytes()


@pytest.mark.slow
def test_built_once_into_a_private_folder_and_reused(cache, monkeypatch):
    first = load_span_kernel()
    assert first is not None
    (built,) = cache.glob("span_attention-*.so")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert built.with_suffix(".sha256").read_text().strip() == kernel_library._sha256(built)
    mtime = built.stat().st_mtime_ns
    monkeypatch.setattr(span_kernel, "_loaded", {})
    assert load_span_kernel() is not None
    assert built.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    # Beside it: its SHA-256 as built, and the lock builders of this key take; no scratch left behind.
    names = sorted(path.name for path in cache.iterdir())
    assert names == sorted(built.with_suffix(suffix).name for suffix in (".lock", ".sha256", ".so"))


@pytest.mark.parametrize("mode", [0o770, 0o707], ids=["group", "others"])
def test_a_folder_others_may_write_to_is_not_built_in_nor_loaded_from(cache, tmp_path, caplog, mode):
    recipe = tiny(tmp_path)
    built = where(load_library(recipe))  # while the folder is private: a library and its record
    assert built.parent == cache
    cache.chmod(mode)
    library = load_library(recipe)
    fallback = tmp_path / "tmp" / f"prefixbatch-kernels-{os.getuid()}"
    assert where(library).parent == fallback and library.pb_answer() == 42
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert warnings(caplog) == [
        f"kernel cache folder {cache} is writable by group or others; building the kernel library in {fallback} instead"
    ]


def test_a_folder_inside_one_others_may_write_to_is_not_used_unless_that_one_is_sticky(cache, tmp_path, caplog, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv(CACHE_ENV, str(shared / "kernels"))
    shared.chmod(0o777)  # anyone may rename our folder away and put theirs in its place
    assert where(load_library(tiny(tmp_path))).parent == tmp_path / "tmp" / f"prefixbatch-kernels-{os.getuid()}"
    assert "lies in" in warnings(caplog)[0] and "which group or others may write to" in warnings(caplog)[0]
    shared.chmod(0o1777)  # sticky, as /tmp is: nobody renames another's entries
    assert where(load_library(tiny(tmp_path))).parent == shared / "kernels"


@pytest.mark.skipif(not IS_ROOT, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_not_used_and_a_squatted_temporary_name_neither(cache, tmp_path, caplog, monkeypatch):
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    squatted = tmp_path / "tmp" / f"prefixbatch-kernels-{os.getuid()}"  # made first by someone else
    squatted.mkdir(mode=0o700)
    os.chown(squatted, 65534, 65534)
    library = load_library(tiny(tmp_path))
    private = where(library).parent
    assert private.parent == tmp_path / "tmp" and private.name.startswith("prefixbatch-kernels-") and private != squatted
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and library.pb_answer() == 42
    assert warnings(caplog) == [
        f"kernel cache folder {cache} belongs to uid 65534, not to this user (0); building the kernel "
        f"library in {private} instead (this process's alone)"
    ]


@pytest.mark.parametrize("how", ["other bytes", "no record", "writable by group"])
def test_a_planted_library_is_never_loaded(cache, tmp_path, monkeypatch, caplog, how):
    recipe = tiny(tmp_path)
    name = where(load_library(recipe)).name  # built (and loaded) in the cache: its name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    monkeypatch.setenv(CACHE_ENV, str(elsewhere))
    library, record = elsewhere / name, elsewhere / name.replace(".so", ".sha256")
    marker = tmp_path / "planted-was-loaded"
    library.write_bytes(planted(tmp_path, marker))
    if how == "other bytes":
        shutil.copy(cache / record.name, record)  # the genuine library's record
        reason = f"library {library}'s SHA-256 does not match the one recorded at build"
    elif how == "no record":
        reason = f"library {library} has no SHA-256 recorded at build ({record.name})"
    else:  # its own record, but anyone in the group could have swapped it since
        record.write_text(kernel_library._sha256(library))
        library.chmod(0o775)
        reason = f"{library} is writable by group or others"
    loaded = load_library(recipe)
    assert not marker.exists(), "the planted library was loaded"
    assert loaded.pb_answer() == 42 and where(loaded) == library
    assert warnings(caplog) == [f"{reason}; building it again"]
    assert record.read_text().strip() == kernel_library._sha256(library)


@pytest.mark.slow
def test_a_planted_span_kernel_is_rebuilt_and_the_engine_gets_the_real_one(genuine, cache, tmp_path, caplog):
    cache.mkdir(mode=0o700)
    shutil.copy(genuine.with_suffix(".sha256"), cache)
    marker = tmp_path / "planted-was-loaded"
    (cache / genuine.name).write_bytes(planted(tmp_path, marker))
    kernel = load_span_kernel()
    assert kernel is not None and not marker.exists()
    assert warnings(caplog) == [f"library {cache / genuine.name}'s SHA-256 does not match the one recorded at build; building it again"]
    assert kernel_library._sha256(cache / genuine.name) == (cache / genuine.with_suffix(".sha256").name).read_text().strip()


def test_no_home_folder_builds_in_a_private_temporary_folder(genuine, cache, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(CACHE_ENV)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    folder = tmp_path / "tmp" / f"prefixbatch-kernels-{os.getuid()}"
    folder.mkdir(mode=0o700)
    for path in (genuine, genuine.with_suffix(".sha256")):  # this machine's library: no build to wait for
        shutil.copy(path, folder)
    kernel = load_span_kernel()
    assert kernel is not None and where(kernel.library) == folder / genuine.name
    assert warnings(caplog) == []  # no home is no fault


def test_a_failed_build_is_recorded_and_not_retried_until_its_record_is_deleted(cache, tmp_path, monkeypatch, caplog):
    calls = tmp_path / "calls"
    compiler = tmp_path / "broken-cc"
    compiler.write_text(
        f'#!/bin/sh\ncase "$1" in --version) echo broken 1.0;; *) echo x >> {calls}; echo "no such flag" >&2; exit 1;; esac\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    assert load_span_kernel() is None
    (failed,) = cache.glob("span_attention-*.failed")
    assert "building the kernel library failed" in caplog.text and "no such flag" in caplog.text
    assert "no such flag" in failed.read_text()
    for _ in range(2):  # other processes (a fresh `_loaded` each): told once, no compiler run
        caplog.clear()
        monkeypatch.setattr(span_kernel, "_loaded", {})
        assert load_span_kernel() is None
        assert warnings(caplog) == [
            f"the kernel library's build failed earlier ({failed} holds the compiler's error); the native engine "
            f"{span_kernel._FALLBACK}. Delete that file to try the build again"
        ]
    assert calls.read_text() == "x\n"
    failed.unlink()
    monkeypatch.setattr(span_kernel, "_loaded", {})
    assert load_span_kernel() is None
    assert calls.read_text() == "x\nx\n"  # tried again


def test_processes_building_one_key_at_once_build_it_once(cache, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    compiler = tmp_path / "counting-cc"
    compiler.write_text(f'#!/bin/sh\ncase "$1" in --version) ;; *) echo x >> {calls}; sleep 0.3;; esac\nexec {COMPILER} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    recipe, results = tiny(tmp_path), []
    threads = [threading.Thread(target=lambda: results.append(load_library(recipe))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [library.pb_answer() for library in results] == [42] * 4
    assert calls.read_text() == "x\n"


def test_no_compiler_falls_back_with_a_warning(cache, monkeypatch, caplog):
    monkeypatch.setattr(kernel_library.shutil, "which", lambda name: None)
    assert load_span_kernel() is None
    assert "no C compiler found" in caplog.text


def test_switched_off_by_the_environment(cache, monkeypatch):
    monkeypatch.setenv("PREFIXBATCH_SPAN_KERNEL", "0")
    assert load_span_kernel() is None
    assert not cache.exists()


def test_a_march_that_is_not_one_is_refused(cache, monkeypatch, caplog):
    monkeypatch.setenv(span_kernel.MARCH_ENV, "native -fplugin=x.so")
    assert load_span_kernel() is None
    assert warnings(caplog) == [
        f"$PREFIXBATCH_KERNEL_MARCH must name a -march value (native, x86-64-v3, ...), got 'native -fplugin=x.so': "
        f"the native engine {span_kernel._FALLBACK}"
    ]
    assert not cache.exists()


def _header_fields() -> list[tuple[str, type]]:
    """`struct pb_span_args`'s fields as prefixbatch_kernels.h declares them, as ctypes types."""
    text = (span_kernel.KERNELS / "prefixbatch_kernels.h").read_text()
    body = re.search(r"struct pb_span_args \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for declaration in filter(None, (part.strip() for part in body.split(";"))):
        kind, names = re.match(r"((?:const )?\w+)\s+(.*)", declaration).groups()
        for name in (n.strip() for n in names.split(",")):
            pointer = name.startswith("*")
            ctype = ctypes.c_void_p if pointer else {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float}[kind]
            fields.append((name.lstrip("*"), ctype))
    return fields


def test_the_argument_struct_mirrors_the_header_and_the_library(kernel_build):
    assert span_kernel.SpanArgs._fields_ == _header_fields()
    assert kernel_build.library.pb_span_args_size() == ctypes.sizeof(span_kernel.SpanArgs) == 216


def test_a_library_whose_struct_differs_is_refused(genuine, monkeypatch, caplog):
    class Longer(ctypes.Structure):
        _fields_ = [*span_kernel.SpanArgs._fields_, ("extra", ctypes.c_int64)]

    monkeypatch.setattr(span_kernel, "SpanArgs", Longer)
    monkeypatch.setattr(span_kernel, "_loaded", {})
    assert load_span_kernel() is None  # the library itself is this machine's, from its cache
    assert warnings(caplog) == [
        "the kernel library's struct pb_span_args is 216 bytes, span_kernel.SpanArgs 224: they no longer match "
        f"(kernels/prefixbatch_kernels.h); the native engine {span_kernel._FALLBACK}"
    ]


def test_the_library_exports_the_headers_entry_points_and_nothing_else(kernel_build):
    text = (span_kernel.KERNELS / "prefixbatch_kernels.h").read_text()
    declared = re.findall(r"PB_EXPORT [\w ]+?\**(pb_\w+)\(", text)
    assert len(declared) == 16
    dense = {"pb_dense_packed_floats", "pb_dense_pack", "pb_dense"}  # only where the library has them
    dense_bf16 = {"pb_dense_bf16_packed_halves", "pb_dense_bf16_scratch_floats", "pb_dense_bf16_pack", "pb_dense_bf16"}
    for name in declared:
        present = kernel_build.has_dense if name in dense else kernel_build.has_dense_bf16 if name in dense_bf16 else True
        assert hasattr(kernel_build.library, name) == present, name
    assert not hasattr(kernel_build.library, "pb_parallel")  # the pool's, inside


def test_each_build_says_what_it_computes_with(kernel_build, request):
    flavour, flags = request.node.callspec.params["kernel_build"], cpu_flags()
    native = 64 if "avx512f" in flags else 32 if "avx" in flags else 16
    expected = {"x86-64-v2": 16, "x86-64-v3": 32, "native": native}[flavour]
    assert kernel_build.vector_bytes == expected
    assert kernel_build.has_dense == (expected == 64)  # our dense products are AVX-512's; elsewhere oneDNN's
    assert kernel_build.has_dense_bf16 == (flavour == "native" and "avx512_bf16" in flags)  # and AVX512-BF16's
    on_x86 = os.uname().machine == "x86_64"
    assert span_kernel.attention_wins(kernel_build) == (expected == 64 or not on_x86)


@pytest.mark.slow
@pytest.mark.skipif("avx512f" in cpu_flags() or os.uname().machine != "x86_64", reason="the native build is the AVX-512 one here")
def test_the_avx512_build_compiles_where_the_cpu_cannot_run_it(tmp_path):
    # This CPU runs no AVX-512 code, so its tests never reach those paths: they must compile, at least.
    for march, symbol in (["-march=x86-64-v4"], b"pb_dense_pack"), (["-march=x86-64-v4", "-mavx512bf16"], b"pb_dense_bf16_pack"):
        command = [COMPILER, *span_kernel.FLAGS, *march, *map(str, span_kernel.SOURCES), "-o", str(tmp_path / "v4.so"), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert symbol in (tmp_path / "v4.so").read_bytes()
