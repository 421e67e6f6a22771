"""The subscription contract where every broker keeps it alike, on the real servers.

What only one broker does (its streams, queues and consumers) is tested in
tests/test_subscription_<broker>.py.
"""

from __future__ import annotations

from pybondi.messaging.brokers.rabbitmq import RabbitMQBroker
from tests.brokers import BrokerKit, RabbitMQKit, on_broker, take


@on_broker
async def test_a_message_without_an_id_keeps_the_one_it_gets(broker: BrokerKit) -> None:
    # From a producer that is not pybondi: no message-id header, no id of the broker's own
    # on RabbitMQ. The id the delivery has must stay across redeliveries and retries, or
    # the worker's inbox could not tell that the group handled the message already.
    adapter, topic = broker.make(), broker.topic()
    first = broker.subscribe(adapter, [topic], consumer="c1", redeliver_after=1.0)
    assert await first.receive(10, wait=0) == []  # declares the stream or queue
    own = await broker.publish_bare(topic, b'{"n": 1}')

    [delivery] = await take(first, 1)
    message_id = delivery.envelope.id
    assert message_id
    if own is not None:  # Redis's stream/entry, NATS's stream/sequence; none on RabbitMQ
        assert message_id == own
    assert (delivery.problem, delivery.envelope.body) == (None, b'{"n": 1}')

    await first.close()  # without acknowledging: another consumer gets it back
    second = broker.subscribe(adapter, [topic], consumer="c2", redeliver_after=1.0)
    [again] = await take(second, 1, timeout=10.0)
    assert (again.envelope.id, again.attempt) == (message_id, 2)

    if isinstance(broker, RabbitMQKit) and isinstance(adapter, RabbitMQBroker):
        broker.other_queues.append(f"{adapter.queue(topic)}#retry#100")  # the delay queue
    await again.retry(0.1)
    [retried] = await take(second, 1, timeout=10.0)
    assert retried.envelope.id == message_id

    await second.close()  # a retried message, redelivered
    third = broker.subscribe(adapter, [topic], consumer="c3", redeliver_after=1.0)
    [last] = await take(third, 1, timeout=10.0)
    assert last.envelope == again.envelope == delivery.envelope
    assert last.attempt == retried.attempt + 1  # the redelivery of a retry counts too
    await last.ack()
    assert await third.receive(10, wait=1.5) == []
