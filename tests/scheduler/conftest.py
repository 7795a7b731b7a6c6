"""Fixtures of the scheduler tests (constants and builders live in scheduler_helpers.py)."""

from __future__ import annotations

import pytest
from scheduler_helpers import TINY_CLUSTER

from hexgen.cluster import parse_cluster


@pytest.fixture
def tiny_cluster():
    return parse_cluster(TINY_CLUSTER, "tiny")
