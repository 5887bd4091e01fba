"""``fmnist.prefetch``: work started before a flow's imports reaches the flow once, with its
result or its exception; a key nobody started gives None (the flow then does the work)."""

from __future__ import annotations

import pytest

from fmnist import prefetch


def test_a_started_call_is_taken_once_with_its_result():
    prefetch.start(("test", 1), "math:factorial", 5)
    future = prefetch.take(("test", 1))
    assert future is not None and future.result(timeout=10) == 120
    assert prefetch.take(("test", 1)) is None


def test_a_failure_reaches_whoever_takes_it():
    prefetch.start(("test", 2), "math:factorial", -1)
    with pytest.raises(ValueError, match="factorial"):
        prefetch.take(("test", 2)).result(timeout=10)


def test_a_key_nobody_started_is_none():
    assert prefetch.take(("test", "never started")) is None
