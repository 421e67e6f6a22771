"""Callbacks: let an aggregate report results through a publisher without knowing it.

An aggregate method receives a callback and calls it like a function; the callback turns
what it receives into messages for its bound publisher, at once or in `flush()`.

    class LossCallback(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[float] = []

        def __call__(self, loss: float) -> None:
            self.losses.append(loss)

        def flush(self) -> None:
            self.publisher.publish("losses", Message(self.losses[:]))
            self.losses.clear()

        def reset(self) -> None:
            self.losses.clear()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from pybondi.publisher import BasePublisher, Publisher

__all__ = ["Callback", "Callbacks"]


class Callback(ABC):
    """A function-like object an aggregate calls; it reports to `self.publisher`.

    Override `__call__` (receive data), `flush` (send what was buffered) and `reset`
    (forget it). A new callback has its own in-memory publisher until `bind` gives it one.
    """

    def __init__(self) -> None:
        self.publisher: BasePublisher = Publisher()

    def bind(self, publisher: BasePublisher) -> None:
        """Send to `publisher` from now on."""
        self.publisher = publisher

    def set(self, name: str, value: Any) -> None:
        """Set an attribute, for context the aggregate provides (an epoch, a phase...)."""
        setattr(self, name, value)

    @abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Receive data from the aggregate."""

    @abstractmethod
    def flush(self) -> None:
        """Send buffered data to the publisher."""

    @abstractmethod
    def reset(self) -> None:
        """Forget any buffered data or state."""


class Callbacks:
    """Several callbacks used as one: each call, flush, reset or set reaches all."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.list: list[Callback] = list(callbacks)
        self.publisher: BasePublisher = Publisher()
        self.bind(self.publisher)

    def bind(self, publisher: BasePublisher) -> None:
        """Bind every callback to `publisher`."""
        self.publisher = publisher
        for callback in self.list:
            callback.bind(publisher)

    def set(self, name: str, value: Any) -> None:
        """Set an attribute on every callback."""
        for callback in self.list:
            callback.set(name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Call every callback with the same arguments, in order."""
        for callback in self.list:
            callback(*args, **kwargs)

    def flush(self) -> None:
        """Flush every callback, in order."""
        for callback in self.list:
            callback.flush()

    def reset(self) -> None:
        """Reset every callback."""
        for callback in self.list:
            callback.reset()
