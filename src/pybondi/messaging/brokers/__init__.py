"""Broker adapters: Redis Streams, RabbitMQ, NATS JetStream, and one in this process.

    broker = connect("redis://localhost:6379")        # pip install 'pybondi[redis]'
    broker = connect("amqp://guest:guest@localhost/") # pip install 'pybondi[rabbitmq]'
    broker = connect("nats://localhost:4222")         # pip install 'pybondi[nats]'
    broker = connect("memory://orders")               # this process's broker "orders"

Each module imports its client only when used; a missing client raises
`MissingDependency`, naming the extra to install. `memory://` needs none: every call
with the same name gives the same `MemoryBroker` (pybondi.messaging.brokers.memory).
"""

from __future__ import annotations

import importlib
from typing import Any

from pybondi._redact import redact
from pybondi.messaging.brokers.base import Broker, BrokerPublisher
from pybondi.messaging.brokers.memory import MemoryBroker

__all__ = ["Broker", "BrokerPublisher", "MemoryBroker", "check_url", "connect"]

# URL scheme -> (module, class or factory taking the URL and the options)
_ADAPTERS = {
    "memory": ("memory", "shared"),
    "redis": ("redis", "RedisBroker"),
    "rediss": ("redis", "RedisBroker"),
    "amqp": ("rabbitmq", "RabbitMQBroker"),
    "amqps": ("rabbitmq", "RabbitMQBroker"),
    "nats": ("nats", "NATSBroker"),
    "tls": ("nats", "NATSBroker"),
}


def connect(url: str, **options: Any) -> Broker:
    """The broker adapter for a URL: `redis://`, `amqp://`, `nats://` (TLS too), `memory://`.

    `options` go to the adapter's constructor. The connection opens at the first send.
    `memory://name` gives the process's in-process broker of that name (`options` may
    give its `clock` the first time); see `pybondi.messaging.brokers.memory.shared`.
    """
    module, name = _ADAPTERS[check_url(url)]
    # The adapter raises MissingDependency, naming the extra, when its client is missing.
    adapter = importlib.import_module(f"pybondi.messaging.brokers.{module}")
    broker: Broker = getattr(adapter, name)(url, **options)
    return broker


def check_url(url: str) -> str:
    """The URL's scheme, if pybondi has an adapter for it; else a ValueError saying which."""
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in _ADAPTERS:
        raise ValueError(
            f"No broker adapter for {redact(url)!r}: pybondi knows {', '.join(sorted(_ADAPTERS))} "
            f"URLs, as in redis://localhost:6379, amqp://guest:guest@localhost:5672/, "
            f"nats://localhost:4222 or memory://orders."
        )
    return scheme.lower()
