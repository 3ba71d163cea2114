"""fsspec helpers shared by the reader and the writer.

Owns turning a user's URL into a filesystem and a path, and back into a URL the user will
recognise in a message. Every file prefixbatch reads or writes goes through fsspec, so
local paths, `file://`, `memory://` and `s3://` (s3fs) behave the same.
in: URL + storage_options -> (filesystem, path); (filesystem, path) -> URL.
"""

from __future__ import annotations

from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def open_fs(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` (built with `storage_options`) and the path inside it."""
    return url_to_fs(url, **(storage_options or {}))


def has_protocol(url: str) -> bool:
    return "://" in url


def to_url(fs: fsspec.AbstractFileSystem, path: str, *, like: str) -> str:
    """`path` as the user would write it: with the protocol if they gave one (`like`)."""
    # A plain local path stays plain; "s3://", "memory://" and "file://" keep their protocol.
    return fs.unstrip_protocol(path) if has_protocol(like) else path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether a rename is cheap and atomic here (object stores copy on rename)."""
    return isinstance(fs, LocalFileSystem)


def modified_tag(info: dict[str, Any]) -> str | None:
    """A string that changes when the file's content changes: ETag, else mtime, if known."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


__all__ = ["has_protocol", "is_local", "modified_tag", "open_fs", "to_url"]
