"""Fixtures of every producer test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def no_deepqueue_env(monkeypatch):
    """A developer's own DEEPQUEUE_* settings must not leak into these tests."""
    for name in [name for name in os.environ if name.startswith("DEEPQUEUE_")]:
        monkeypatch.delenv(name)
