"""The C kernel library on disk: which folder holds it, building it there, and loading it only
when it can be trusted.

ctypes runs a library's code as it loads it, so a library someone else could have written is
never loaded. A folder is trusted when it and every folder above it are safe from other
users: it is ours (this uid) and not writable by group or others, and each folder above is
not writable by group or others unless it is sticky (as /tmp is, where nobody can rename
another's entries). A library is loaded only from a trusted folder, only when the file is a
regular file, ours, not writable by group or others, and its SHA-256 is the one recorded
beside it when it was built (`<stem>.sha256`). Anything else is rebuilt, and the log says why
in one line.

Where (the first folder that exists or can be made, mode 0700, and is trusted):
`$PREFIXBATCH_KERNEL_CACHE`, else `~/.cache/prefixbatch/kernels`, else (no home folder, as
under an arbitrary container uid) `<tmp>/prefixbatch-kernels-<uid>`; if none is, a fresh
private folder from `tempfile.mkdtemp`, this process's alone.

Names: `<name>-<key>.so`, the key a hash of the sources, headers, flags, the compiler's
version and, for `-march=native`, the CPU's model and flags (a home folder shared by several
machines never loads a library built for another CPU). A failed build leaves
`<stem>.failed` (the compiler's error): later processes do not build again until that file
is deleted. One process builds a key at a time (`<stem>.lock`); the others wait for it and
load its result.

in → out: `Recipe` → `ctypes.CDLL`, or None where it cannot be built (said once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CACHE_ENV", "Recipe", "cache_folder", "load_library"]

log = logging.getLogger(__name__)

CACHE_ENV = "PREFIXBATCH_KERNEL_CACHE"
_GROUP_OR_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Recipe:
    """What to compile into one library, and how."""

    name: str  # the file name's stem, before the key
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]  # not compiled, but in the key: a changed header is a new library
    flags: tuple[str, ...]  # -march=... among them
    fallback: str  # what the engine does without the library, for the log: "uses PyTorch's kernels"

    @property
    def is_native(self) -> bool:
        """Built for this very CPU: its identity goes into the key."""
        return "-march=native" in self.flags


def load_library(recipe: Recipe) -> ctypes.CDLL | None:
    """The recipe's library, built on first use into the cache folder; None (logged) where
    there is no compiler, the build fails or failed before, or the library cannot be loaded."""
    if platform.system() != "Linux":
        log.info("the kernel library is built on Linux only; the native engine %s", recipe.fallback)
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found (set $CC, or install gcc): the native engine %s", recipe.fallback)
        return None
    try:
        target = cache_folder() / f"{recipe.name}-{_key(recipe, compiler)}.so"
        return _build_or_reuse(recipe, compiler, target)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("kernel library unavailable (%s); the native engine %s", error, recipe.fallback)
        return None


def cache_folder() -> Path:
    """The first trusted folder of the resolution order (module docstring), made if need be."""
    configured = _configured_folder()
    shared_tmp = Path(tempfile.gettempdir()) / f"prefixbatch-kernels-{os.getuid()}"
    refused = None  # why the configured folder was passed over: logged once, with where instead
    for folder in (configured, shared_tmp) if configured else (shared_tmp,):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = folder.resolve(strict=True)
            reason = _untrusted_folder(folder)
        except OSError as error:
            reason = f"kernel cache folder {folder} cannot be used ({error})"
        if reason is None:
            if refused:
                log.warning("%s; building the kernel library in %s instead", refused, folder)
            return folder
        refused = refused or reason
    private = Path(tempfile.mkdtemp(prefix="prefixbatch-kernels-"))
    log.warning("%s; building the kernel library in %s instead (this process's alone)", refused, private)
    return private


def _configured_folder() -> Path | None:
    """$PREFIXBATCH_KERNEL_CACHE, else the home folder's cache; None where there is no home
    folder (no $HOME and no passwd entry for this uid: an arbitrary container uid)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    try:
        return Path.home() / ".cache" / "prefixbatch" / "kernels"
    except RuntimeError:
        return None


def _untrusted_folder(folder: Path) -> str | None:
    """Why a folder (resolved) is not to be trusted, or None."""
    info = os.lstat(folder)
    if info.st_uid != os.getuid():
        return f"kernel cache folder {folder} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & _GROUP_OR_OTHERS_WRITE:
        return f"kernel cache folder {folder} is writable by group or others"
    for parent in folder.parents:
        mode = os.lstat(parent).st_mode
        if mode & _GROUP_OR_OTHERS_WRITE and not mode & stat.S_ISVTX:
            return f"kernel cache folder {folder} lies in {parent}, which group or others may write to"
    return None


def _untrusted_file(path: Path) -> str | None:
    """Why a file of a trusted folder is not to be trusted, or None."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & _GROUP_OR_OTHERS_WRITE:
        return f"{path} is writable by group or others"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _untrusted_library(library: Path, record: Path) -> str | None:
    """Why the built library may not be loaded, or None: see the module docstring."""
    if not record.exists():
        return f"library {library} has no SHA-256 recorded at build ({record.name})"
    reason = _untrusted_file(library) or _untrusted_file(record)
    if reason is None and _sha256(library) != record.read_text().strip():
        reason = f"library {library}'s SHA-256 does not match the one recorded at build"
    return reason


def _build_or_reuse(recipe: Recipe, compiler: str, target: Path) -> ctypes.CDLL | None:
    import fcntl  # Linux only, as is the rest of this path

    record, failed = target.with_suffix(".sha256"), target.with_suffix(".failed")
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building this key: wait, then use its result
        if failed.exists():
            log.warning(
                "the kernel library's build failed earlier (%s holds the compiler's error); the native "
                "engine %s. Delete that file to try the build again", failed, recipe.fallback,
            )  # fmt: skip
            return None
        if target.exists():
            reason = _untrusted_library(target, record)
            if reason is None:
                return ctypes.CDLL(str(target))
            log.warning("%s; building it again", reason)
        if not _build(recipe, compiler, target, record, failed):
            return None
        return ctypes.CDLL(str(target))


def _build(recipe: Recipe, compiler: str, target: Path, record: Path, failed: Path) -> bool:
    """Compiles into a private scratch folder, then records the SHA-256 and moves the library in
    (each file replaced whole: a reader never sees half of one). False: failed, recorded."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *recipe.flags, *map(str, recipe.sources), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode:
            error = result.stderr[-2000:]
            _write(failed, f"{' '.join(command)}\n{error}", scratch)
            log.warning(
                "building the kernel library failed (%s; recorded in %s, delete it to try again); the "
                "native engine %s:\n%s", compiler, failed, recipe.fallback, error,
            )  # fmt: skip
            return False
        _write(record, _sha256(built) + "\n", scratch)
        os.replace(built, target)
    return True


def _write(path: Path, text: str, scratch: str) -> None:
    staged = Path(scratch) / path.name
    staged.write_text(text)
    os.replace(staged, path)


def _key(recipe: Recipe, compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    digest = hashlib.sha256()
    for path in (*recipe.sources, *recipe.headers):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr(recipe.flags).encode() + version.encode())
    if recipe.is_native:
        digest.update(_cpu_identity().encode())
    return digest.hexdigest()[:16]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """The CPU's model and feature flags: what `-march=native` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)) + platform.machine()
