"""Broker adapters: Redis Streams, RabbitMQ and NATS JetStream, each behind its extra.

    broker = connect("redis://localhost:6379")        # pip install 'pybondi[redis]'
    broker = connect("amqp://guest:guest@localhost/") # pip install 'pybondi[rabbitmq]'
    broker = connect("nats://localhost:4222")         # pip install 'pybondi[nats]'

Each module imports its client only when used; a missing client raises
`MissingDependency`, naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from pybondi._redact import redact
from pybondi.messaging.brokers.base import Broker, BrokerPublisher

__all__ = ["Broker", "BrokerPublisher", "check_url", "connect"]

# URL scheme -> (module, class)
_ADAPTERS = {
    "redis": ("redis", "RedisBroker"),
    "rediss": ("redis", "RedisBroker"),
    "amqp": ("rabbitmq", "RabbitMQBroker"),
    "amqps": ("rabbitmq", "RabbitMQBroker"),
    "nats": ("nats", "NATSBroker"),
    "tls": ("nats", "NATSBroker"),
}


def connect(url: str, **options: Any) -> Broker:
    """The broker adapter for a URL: `redis://`, `amqp://` or `nats://` (and TLS forms).

    `options` go to the adapter's constructor. The connection opens at the first send.
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
            f"URLs, as in redis://localhost:6379, amqp://guest:guest@localhost:5672/ or "
            f"nats://localhost:4222."
        )
    return scheme.lower()
