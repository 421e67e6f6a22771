"""Messaging: messages between processes, sent through the outbox, handled by workers.

- `envelope`: a message as it travels (topic, id, headers, JSON body).
- `outbox`: the publisher that writes messages in the session's database transaction;
  `relay` sends them to a broker.
- `brokers`: Redis Streams, RabbitMQ, NATS JetStream (each behind its extra) and an
  in-memory broker for tests.
- `consumer`: what a worker consumes and how; `worker`: the worker, a session per
  message with an inbox, retries and dead letters; `deadletters`: list, replay, discard.

Every name is imported on first use.
"""

from typing import TYPE_CHECKING

from pybondi import _lazy

if TYPE_CHECKING:  # what __getattr__ imports on first use, for type checkers
    from pybondi.messaging.brokers import Broker as Broker
    from pybondi.messaging.brokers import BrokerPublisher as BrokerPublisher
    from pybondi.messaging.brokers import connect as connect
    from pybondi.messaging.consumer import Binding as Binding
    from pybondi.messaging.consumer import Consumer as Consumer
    from pybondi.messaging.consumer import Retry as Retry
    from pybondi.messaging.consumer import current_session as current_session
    from pybondi.messaging.deadletters import DeadLetter as DeadLetter
    from pybondi.messaging.deadletters import DeadLetters as DeadLetters
    from pybondi.messaging.deadletters import Replayed as Replayed
    from pybondi.messaging.envelope import Envelope as Envelope
    from pybondi.messaging.outbox import Outbox as Outbox
    from pybondi.messaging.relay import Relay as Relay
    from pybondi.messaging.worker import Worker as Worker

__all__ = [
    "Binding",
    "Broker",
    "BrokerPublisher",
    "Consumer",
    "DeadLetter",
    "DeadLetters",
    "Envelope",
    "Outbox",
    "Relay",
    "Replayed",
    "Retry",
    "Worker",
    "connect",
    "current_session",
]

_MODULES = {
    "pybondi.messaging.brokers": ["Broker", "BrokerPublisher", "connect"],
    "pybondi.messaging.consumer": ["Binding", "Consumer", "Retry", "current_session"],
    "pybondi.messaging.deadletters": ["DeadLetter", "DeadLetters", "Replayed"],
    "pybondi.messaging.envelope": ["Envelope"],
    "pybondi.messaging.outbox": ["Outbox"],
    "pybondi.messaging.relay": ["Relay"],
    "pybondi.messaging.worker": ["Worker"],
}
_LAZY: _lazy.Lazy = {name: (module, None) for module, names in _MODULES.items() for name in names}

if not TYPE_CHECKING:
    __getattr__, __dir__ = _lazy.exports(__name__, globals(), _LAZY)

del TYPE_CHECKING
