"""Fixtures for pipeline tests: a loopback S3 server shared by the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.s3server import S3Server, running_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto on 127.0.0.1; `create_bucket()` gives each test its own bucket."""
    with running_s3_server() as server:
        yield server
