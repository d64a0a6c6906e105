"""Fixtures shared by every layer."""

from __future__ import annotations

import pytest

from mailbus.codec import Registry


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()
