"""SHA-256 of large files, computed once: cached by path, size and modification time.

A job's fingerprint names its weights by content, so a resume into a folder whose checkpoint
was replaced by another of the same shape (a fine-tune written over it) is refused. Hashing
100 GB of safetensors takes minutes, so a file's digest is kept in the per-user cache
(`$PREFIXBATCH_CACHE`, else `~/.cache/prefixbatch`, else a private temporary folder; see
`private_cache_dir`) under `digests/`, keyed by the file's resolved path, inode, size, mtime and ctime (ns): a file
rewritten or replaced changes its ctime even where a copy kept the old mtime (`cp -p`,
`rsync -t`), so it is hashed again.

Invariants: the cache folder is the user's own (mode 0700, not writable by others) or it is
not used — a digest read from a folder another user can write could vouch for planted
weights. A cache entry is trusted only when its recorded key matches the file's.

in → out: a file path → its SHA-256 (hex).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import uuid
from pathlib import Path

__all__ = ["file_sha256", "private_cache_dir", "sha256_of"]

log = logging.getLogger(__name__)

CACHE_ENV = "PREFIXBATCH_CACHE"
_CHUNK = 8 << 20
_LOG_ABOVE_BYTES = 1 << 30  # a hash that takes seconds is said, not silent


def private_cache_dir(name: str) -> Path | None:
    """`<cache root>/<name>`, made mode 0700 and checked to be the user's alone; None where no
    such folder can be had (then nothing is cached). The root is `$PREFIXBATCH_CACHE`, else
    `~/.cache/prefixbatch`, else (no home folder, as for an arbitrary container UID)
    `<tmp>/prefixbatch-<uid>`."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        try:
            root = str(Path.home() / ".cache" / "prefixbatch")
        except RuntimeError:  # no home folder
            root = os.path.join(tempfile.gettempdir(), f"prefixbatch-{os.getuid()}")
    folder = Path(root) / name
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = untrusted_reason(folder)
    except OSError as error:
        reason = str(error)
    if reason:
        log.warning("not caching in %s: %s", folder, reason)
        return None
    return folder


def untrusted_reason(path: Path) -> str | None:
    """Why `path` (a folder or file) cannot be trusted: another user owns it or may write it."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if info.st_uid != os.getuid():
        return f"{path} belongs to user {info.st_uid}, not to this user ({os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), from the cache when the file is unchanged since it was hashed."""
    path = Path(path).resolve()
    info = path.stat()
    key = {"path": str(path), "inode": info.st_ino, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
           "ctime_ns": info.st_ctime_ns}
    folder = private_cache_dir("digests")
    entry = None if folder is None else folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.json"
    if entry is not None and entry.is_file():
        try:
            cached = json.loads(entry.read_text())
            if {k: cached.get(k) for k in key} == key and untrusted_reason(entry) is None:
                return cached["sha256"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable: hashed again and rewritten
    digest = _hash(path, info.st_size)
    if entry is not None:
        _write_atomically(entry, json.dumps({**key, "sha256": digest}).encode())
    return digest


def _hash(path: Path, size: int) -> str:
    if size > _LOG_ABOVE_BYTES:
        log.warning("hashing %s (%.1f GB) once for the job's fingerprint; later runs read it from the cache", path, size / 1e9)
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    """A file's SHA-256 (hex), read in chunks, never cached (for files that are checked once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:  # a cache that cannot be written costs a hash next time, nothing more
        log.warning("could not cache a digest in %s: %s", path.parent, error)
        temporary.unlink(missing_ok=True)
