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

from pybondi.brokers.base import Broker, BrokerPublisher

__all__ = ["Broker", "BrokerPublisher", "connect"]

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
    scheme = url.partition("://")[0].lower()
    if scheme not in _ADAPTERS:
        raise ValueError(
            f"No broker adapter for {url.partition('://')[0]!r} URLs; pybondi knows "
            f"{', '.join(sorted(_ADAPTERS))}, as in redis://localhost:6379, "
            f"amqp://guest:guest@localhost:5672/ or nats://localhost:4222."
        )
    module, name = _ADAPTERS[scheme]
    # The adapter raises MissingDependency, naming the extra, when its client is missing.
    adapter = importlib.import_module(f"pybondi.brokers.{module}")
    broker: Broker = getattr(adapter, name)(url, **options)
    return broker
