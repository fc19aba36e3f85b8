"""The consumer's reconnect-loop detector, on passed-in times (``worker.delivery.consumer.ReconnectLoop``)."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from worker.delivery.consumer import LOOP_LOSSES, LOOP_RECENT_S, LOOP_WINDOW_S, ReconnectLoop

LOST = RedisConnectionError("Connection closed by server.")


def test_one_loss_is_an_outage_not_a_loop():
    loop = ReconnectLoop()
    loop.lost(100.0, LOST)
    assert loop.problem(100.0) is None and loop.problem(1000.0) is None


def test_repeated_losses_are_a_loop_named_with_the_last_error():
    loop = ReconnectLoop()
    for i in range(LOOP_LOSSES - 1):
        loop.lost(100.0 + i, LOST)
    assert loop.problem(104.0) is None
    loop.lost(105.0, KeyError("properties"))
    problem = loop.problem(105.5)
    assert problem is not None and f"lost {LOOP_LOSSES} times" in problem and "KeyError: 'properties'" in problem


def test_a_loop_that_ended_stops_counting_within_seconds():
    loop = ReconnectLoop()
    for i in range(LOOP_LOSSES * 2):
        loop.lost(100.0 + i, LOST)
    last = 100.0 + LOOP_LOSSES * 2 - 1
    assert loop.problem(last + LOOP_RECENT_S) is not None
    assert loop.problem(last + LOOP_RECENT_S + 0.1) is None


def test_losses_spread_wider_than_the_window_are_no_loop():
    loop = ReconnectLoop()
    spacing = LOOP_WINDOW_S / (LOOP_LOSSES - 1) + 1
    for i in range(LOOP_LOSSES * 3):
        loop.lost(i * spacing, LOST)
        assert loop.problem(i * spacing) is None
