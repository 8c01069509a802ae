"""The simulation dispatcher is woken by the server's messages (server/dispatch.py)."""

from __future__ import annotations

import threading
from queue import Empty, Queue

import pytest

from server.dispatch import WakeOnStore, prompt_dispatch, waking_dispatcher


class FakeState:
    """The two LinkState methods the dispatcher and the grid use, over a dict of lists."""

    def __init__(self):
        self.pending: dict[int, list] = {}
        self.lock = threading.Lock()

    def store_message_ins(self, message):
        node, payload = message
        with self.lock:
            self.pending.setdefault(node, []).append(payload)
        return payload

    def get_message_ins(self, node_id, limit=None):
        with self.lock:
            taken, self.pending[node_id] = self.pending.get(node_id, [])[:limit], self.pending.get(node_id, [])[limit:]
        return taken


def slow_dispatcher(state, queue, nodes_mapping, f_stop):
    """Flower's loop, with a wait so long that only a wake-up can deliver in time."""
    while not f_stop.is_set():
        for node_id in nodes_mapping:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(3600)


def test_wait_ends_when_a_message_is_stored_and_is_rearmed():
    stop, stored = threading.Event(), threading.Event()
    event = WakeOnStore(stop, stored)
    stored.set()
    returned = []
    waiter = threading.Thread(target=lambda: returned.append(event.wait(3600)), daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    assert returned == [False]  # woken long before its timeout, and the engine is not stopping
    assert not stored.is_set()
    assert event.wait(0.01) is False  # nothing new: waits out its timeout
    stop.set()
    assert event.is_set() and event.wait(0.01) is True


def test_a_stored_message_is_dispatched_without_waiting_out_the_loop():
    state, queue, stop = FakeState(), Queue(), threading.Event()
    loop = threading.Thread(target=waking_dispatcher(slow_dispatcher), args=(state, queue, {1: 0, 2: 1}, stop))
    loop.start()
    try:
        for payload in ("a", "b", "c"):
            state.store_message_ins((2, payload))  # what the grid calls when the server sends
            assert queue.get(timeout=60) == payload
        stop.set()
        state.store_message_ins((1, "last"))  # wakes the loop, which then sees the stop
        loop.join(timeout=60)
        assert not loop.is_alive()
    finally:
        stop.set()
        state.store_message_ins((1, "wake"))
        loop.join(timeout=60)
    assert "store_message_ins" not in vars(state)  # the state's own method is back


def test_flowers_dispatcher_is_wrapped_only_inside_the_block():
    from flwr.server.superlink.fleet.vce import vce_api

    shipped = vce_api.add_messages_to_queue
    with prompt_dispatch() as wrapped:
        # The pinned Flower has the dispatcher this wraps; a Flower that changed it
        # would silently lose the wake-up, so this says so.
        assert wrapped is True
        assert vce_api.add_messages_to_queue is not shipped
        with prompt_dispatch() as again:
            assert again is True
            assert vce_api.add_messages_to_queue.wrapped is shipped  # not wrapped twice
    assert vce_api.add_messages_to_queue is shipped


def test_flowers_own_dispatcher_delivers_and_stops_when_wrapped():
    from flwr.server.superlink.fleet.vce import vce_api

    state, queue, stop = FakeState(), Queue(), threading.Event()
    with prompt_dispatch():
        loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue, {7: 0}, stop))
        loop.start()
    state.store_message_ins((7, "train"))
    assert queue.get(timeout=60) == "train"
    stop.set()
    loop.join(timeout=60)
    assert not loop.is_alive()
    with pytest.raises(Empty):
        queue.get_nowait()


def test_a_flower_without_the_dispatcher_is_left_alone(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    def other(state, queue):
        return None

    monkeypatch.setattr(vce_api, "add_messages_to_queue", other)
    with prompt_dispatch() as wrapped:
        assert wrapped is False
        assert vce_api.add_messages_to_queue is other
