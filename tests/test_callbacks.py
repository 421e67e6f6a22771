from __future__ import annotations

from typing import Any

from pybondi import Message, Publisher
from pybondi.callbacks import Callback, Callbacks


class Collect(Callback):
    def __init__(self, topic: str) -> None:
        super().__init__()
        self.topic = topic
        self.buffer: list[Any] = []
        self.epoch = 0

    def __call__(self, value: Any) -> None:
        self.buffer.append(value)

    def flush(self) -> None:
        self.publisher.publish(self.topic, Message((self.epoch, self.buffer[:])))
        self.buffer.clear()

    def reset(self) -> None:
        self.buffer.clear()
        self.epoch = 0


def test_callbacks_act_as_one_and_report_through_the_bound_publisher() -> None:
    publisher, seen = Publisher(), []
    publisher.subscribe("a", "b")(lambda message: seen.append(message.payload))
    first, second = Collect("a"), Collect("b")
    callbacks = Callbacks([first, second])
    assert first.publisher is second.publisher is callbacks.publisher
    callbacks.bind(publisher)
    assert first.publisher is publisher
    callbacks.set("epoch", 3)
    callbacks(1)
    callbacks(2)
    callbacks.flush()
    publisher.commit()
    assert seen == [(3, [1, 2]), (3, [1, 2])]
    callbacks(9)
    callbacks.reset()
    assert first.buffer == second.buffer == []
    assert first.epoch == 0


def test_a_callback_has_its_own_publisher_until_bound() -> None:
    callback = Collect("a")
    assert isinstance(callback.publisher, Publisher)
    callback.set("epoch", 1)
    assert callback.epoch == 1
