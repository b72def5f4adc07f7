"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_gate_recorder():
    """kit.gate's recorder is module state (one per kernel): each test starts empty and leaves it as found."""
    from kit.gate import record

    saved_run, saved = record._run, list(record._session)
    record._run = None
    record._session.clear()
    yield
    record._run = saved_run
    record._session[:] = saved
