"""Shared fixtures: a real guardian process per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, running_guardian


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian process on a fresh state dir, shared by one test module (anomalies only logged)."""
    with running_guardian(anomaly=LOG_ONLY_ANOMALIES) as started:
        yield started
