"""A consumer for `pybondi worker` in the CLI tests: `tests.worker_app:consumer`.

It counts `Counted` messages of the topic named by the `PYBONDI_TEST_TOPIC` environment
variable into their key's `Tally`, and logs a line for each.
"""

from __future__ import annotations

import logging
import os

from pybondi import Depends, Message, Messagebus, Root, Session
from pybondi.exceptions import NotFound
from pybondi.messaging.consumer import Consumer, Retry, current_session
from tests.workers import Counted, Tally, registry, tallies

logger = logging.getLogger("tests.worker_app")

consumer = Consumer(None, registry, repository=tallies, retry=Retry(attempts=2, delay=0.1))
not_a_consumer = object()
bus = Messagebus()  # for `pybondi worker tests.worker_app:bus --topic ...`


@bus.on
def counted(event: Counted) -> None:
    logger.info("dispatched %d for %s", event.n, event.key)


@consumer.subscribe(os.environ.get("PYBONDI_TEST_TOPIC", "tests.counted"))
async def count(message: Message[Counted], session: Session = Depends(current_session)) -> None:
    logger.info("counting %d for %s", message.payload.n, message.payload.key)
    repository = session.repository
    try:
        tally = await repository.aget(message.payload.key)
    except NotFound:
        tally = Tally(Root(message.payload.key))
        repository.add(tally)
    tally.numbers.append(message.payload.n)
