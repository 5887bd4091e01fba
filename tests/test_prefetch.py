"""``fmnist.prefetch``: work started before a flow's imports reaches the flow once, with its
result or its exception; a call nobody started is made on the spot."""

from __future__ import annotations

import math

import pytest

from fmnist import prefetch


def test_a_started_call_is_used_once_with_its_result():
    prefetch.start("math:factorial", 5)
    assert ("math:factorial", (5,)) in prefetch.PENDING
    assert prefetch.result_or_call(math.factorial, 5) == 120
    assert ("math:factorial", (5,)) not in prefetch.PENDING


def test_a_failure_reaches_whoever_uses_the_result():
    prefetch.start("math:factorial", -1)
    with pytest.raises(ValueError, match="factorial"):
        prefetch.result_or_call(math.factorial, -1)
    assert ("math:factorial", (-1,)) not in prefetch.PENDING


def test_a_call_nobody_started_is_made_now():
    assert prefetch.result_or_call(math.factorial, 4) == 24
