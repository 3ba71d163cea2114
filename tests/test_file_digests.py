"""Weight files hashed once: the digest cache, keyed by the file's identity, in a private folder."""

from __future__ import annotations

import hashlib
import os
import shutil

from prefixbatch import file_digests
from prefixbatch.file_digests import file_sha256, private_cache_dir


def counting_hashes(monkeypatch) -> list:
    calls = []
    real = file_digests._hash

    def counted(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(file_digests, "_hash", counted)
    return calls


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    calls = counting_hashes(monkeypatch)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    expected = hashlib.sha256(b"a" * 1000).hexdigest()
    assert file_sha256(weights) == expected and file_sha256(weights) == expected
    assert len(calls) == 1
    assert oct((tmp_path / "cache" / "digests").stat().st_mode & 0o777) == "0o700"

    # Rewritten with the same size, its old mtime put back (as `cp -p` would): hashed again.
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest()
    # Replaced by a copy: hashed again.
    shutil.copy2(tmp_path / "model.safetensors", tmp_path / "copy")
    os.replace(tmp_path / "copy", weights)
    assert file_sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 3


def test_a_cache_folder_others_may_write_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFIXBATCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "digests").mkdir(parents=True)
    (tmp_path / "cache" / "digests").chmod(0o777)
    assert private_cache_dir("digests") is None
    assert "is writable by group or others (mode 777)" in caplog.text
    weights = tmp_path / "w"
    weights.write_bytes(b"x")
    calls = counting_hashes(monkeypatch)
    assert file_sha256(weights) == file_sha256(weights) == hashlib.sha256(b"x").hexdigest()
    assert len(calls) == 2  # never read from, nor written to, that folder
    assert list((tmp_path / "cache" / "digests").iterdir()) == []


def test_no_home_folder_uses_a_private_temporary_one(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXBATCH_CACHE", raising=False)
    monkeypatch.setattr(file_digests.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    monkeypatch.setattr(file_digests.tempfile, "gettempdir", lambda: str(tmp_path))
    assert private_cache_dir("digests") == tmp_path / f"prefixbatch-{os.getuid()}" / "digests"
