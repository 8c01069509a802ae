"""Hand the server's messages to the simulated clients as soon as they are stored.

Flower's Simulation Engine moves messages from its in-memory state to the Ray actors
in a dispatcher thread (``vce_api.add_messages_to_queue``) that scans the state, then
waits 0.1 s on the engine's stop event before scanning again. Every phase of a round
(train, evaluate) therefore started 0-0.1 s after the server sent it, on average
about 0.1 s per round: a third of a digits round here (``bench/run_overhead.py``).

:func:`prompt_dispatch` wraps that function rather than replacing it: Flower's own
loop still runs, but the event it waits on also wakes the moment the state stores
a new instruction. Stopping is unchanged: the stop event is still checked at least
every 0.1 s. When the installed Flower no longer has the function with the expected
parameters, nothing is wrapped and the engine behaves as Flower ships it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator

DISPATCHER_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


class WakeOnStore:
    """The engine's stop event as the dispatcher sees it: ``wait`` also ends when
    ``stored`` is set, and clears it so that the next wait waits for a newer message.

    Clearing after waking cannot lose a message: ``stored`` is set only after the
    state holds the message, so the scan that follows the clear sees it.
    """

    def __init__(self, stop: threading.Event, stored: threading.Event):
        self._stop = stop
        self._stored = stored

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        self._stored.wait(timeout)
        self._stored.clear()
        return self._stop.is_set()


def waking_dispatcher(original):
    """``original`` (Flower's dispatcher loop), woken whenever its state stores a message."""

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        stored = threading.Event()
        store = state.store_message_ins

        def store_and_wake(*args, **kwargs):
            try:
                return store(*args, **kwargs)
            finally:
                stored.set()

        state.store_message_ins = store_and_wake  # the grid shares this state object
        try:
            return original(state, queue, nodes_mapping, WakeOnStore(f_stop, stored))
        finally:
            del state.store_message_ins

    add_messages_to_queue.wrapped = original
    return add_messages_to_queue


def _can_wrap(function) -> bool:
    try:
        return list(inspect.signature(function).parameters) == DISPATCHER_PARAMETERS
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def prompt_dispatch() -> Iterator[bool]:
    """Within this block, simulations dispatch each message as soon as it is stored.

    Yields whether the dispatcher was wrapped (False on a Flower without it).
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "add_messages_to_queue", None)
    if hasattr(original, "wrapped"):  # an enclosing block wrapped it already
        yield True
        return
    if original is None or not _can_wrap(original):
        yield False
        return
    vce_api.add_messages_to_queue = waking_dispatcher(original)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
