"""Fixtures of the hostile-gateway suite: the module's guardian must outlive every attack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.hostile import hostile_guardian
from tests.support.harness import Guardian


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian on the shipped policy (anomaly detectors only log), shared by one module.

    When the module ends it must still be alive and serving, and every recorded call audited.
    """
    with hostile_guardian() as started:
        yield started
