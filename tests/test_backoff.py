"""The one backoff that every retry and reconnection waits by."""

from __future__ import annotations

from pybondi.messaging.backoff import backoff


def test_doubles_from_first_up_to_longest() -> None:
    waits = [backoff(n, first=0.5, longest=3.0) for n in range(1, 6)]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_custom_factor() -> None:
    assert backoff(3, first=1.0, longest=100.0, factor=3.0) == 9.0


def test_huge_failure_counts_stay_at_the_cap_without_overflow() -> None:
    assert backoff(10**6, first=0.1, longest=30.0) == 30.0


def test_jitter_waits_anything_up_to_the_exponential_wait() -> None:
    waits = {backoff(4, first=1.0, longest=60.0, jitter=True) for _ in range(200)}
    assert all(0 <= wait <= 8.0 for wait in waits)
    assert len(waits) > 100  # random, not one fixed fraction
    assert max(waits) > 4.0
