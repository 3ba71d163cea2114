"""A real S3-compatible server on loopback for tests: moto's ThreadedMotoServer.

Binds 127.0.0.1 only, on a port the OS picks. While it runs, the AWS environment holds
dummy credentials and every setting that could send a request elsewhere (a real AWS
endpoint, instance metadata, a user's profile or config file) is switched off.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
from moto.server import ThreadedMotoServer

_HOST = "127.0.0.1"

# Set while the server runs; every other AWS_* variable is removed.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe 169.254.169.254 for credentials
    "AWS_CONFIG_FILE": os.devnull,  # a user's ~/.aws could name profiles or endpoints
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass
class S3Server:
    """A running server: where it listens and the s3fs options that reach it."""

    endpoint_url: str
    storage_options: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.storage_options = {
            "key": _AWS_ENV["AWS_ACCESS_KEY_ID"],
            "secret": _AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": self.endpoint_url,
        }

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("s3", **self.storage_options)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh uniquely named one by default); its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


@contextmanager
def aws_test_env() -> Iterator[None]:
    """Dummy credentials and no way out to AWS; the environment is restored afterwards."""
    saved = {k: v for k, v in os.environ.items() if _is_ours(k)}
    for key in saved:
        del os.environ[key]
    os.environ.update(_AWS_ENV)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = _HOST  # loopback never goes via a proxy
    try:
        yield
    finally:
        for key in [k for k in os.environ if _is_ours(k)]:
            del os.environ[key]
        os.environ.update(saved)


def _is_ours(key: str) -> bool:
    return key.startswith("AWS_") or key.lower() == "no_proxy"


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start moto on 127.0.0.1 (a free port), yield it, stop it."""
    with aws_test_env():
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
        server = ThreadedMotoServer(ip_address=_HOST, port=0, verbose=False)
        server.start()
        try:
            _host, port = server.get_host_and_port()
            yield S3Server(endpoint_url=f"http://{_HOST}:{port}")
        finally:
            server.stop()
