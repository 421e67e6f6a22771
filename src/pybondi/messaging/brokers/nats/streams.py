"""JetStream streams and consumers: the names JetStream takes, and why one cannot be had."""

from __future__ import annotations

import hashlib
import re

__all__ = ["NOT_IN_STREAM_NAMES", "ConsumerGone", "NoStream", "StreamConflict", "durable_name"]

# What JetStream refuses in the names of streams and consumers.
NOT_IN_STREAM_NAMES = re.compile(r"[.*>/\\\s]")


class StreamConflict(Exception):
    """No stream keeps a topic, and the one `declare_streams` would create cannot be."""


class NoStream(Exception):
    """No stream keeps a topic to consume, and `declare_streams` is off."""


class ConsumerGone(Exception):
    """A topic's consumer was deleted (with its stream, maybe) while bound."""


def durable_name(name: str) -> str:
    """A consumer name JetStream takes, and a different one for each `name`.

    Characters it refuses become `_`; then, so that groups `billing.eu` and
    `billing_eu` do not end up sharing one consumer, a short hash of the name follows.
    """
    durable = NOT_IN_STREAM_NAMES.sub("_", name)
    if durable != name:
        durable += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return durable
