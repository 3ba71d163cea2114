"""A real S3-compatible server on loopback for tests: moto's server, in a process of its own.

Not in the test process: moto's server is a Flask app, and importing Flask leaves proxy
objects in module globals that raise on `hasattr` outside a request; vLLM's start-up scans
every module's globals that way and fails ("Working outside of application context"), so a
test process that had run an S3 test could no longer start vLLM.

Binds 127.0.0.1 only, on a free port. While it runs, the AWS environment holds
dummy credentials and every setting that could send a request elsewhere (a real AWS
endpoint, instance metadata, a user's profile or config file) is switched off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec

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
    """Start moto on 127.0.0.1 (a free port) in a child process, yield it, stop it."""
    with aws_test_env():
        port = _free_port()
        command = [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(port)]
        # Its log goes to a file: a pipe nobody reads fills up (a line per request) and blocks the server.
        with tempfile.TemporaryFile() as log:
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
            try:
                _wait_for(server, port, log)
                yield S3Server(endpoint_url=f"http://{_HOST}:{port}")
            finally:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((_HOST, 0))
        return probe.getsockname()[1]


def _wait_for(server: subprocess.Popen, port: int, log, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto's server exited ({server.returncode}): {log.read().decode()[-2000:]}")
        try:
            socket.create_connection((_HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto's server did not listen on {_HOST}:{port} within {timeout_s:.0f} s")
