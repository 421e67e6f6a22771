"""The worker: handles a broker's messages in sessions, exactly once in effect.

    worker = Worker(consumer, connect("amqp://guest:guest@localhost/"),
                    SQLStore("postgresql://localhost/bank", asynchronous=True))
    await worker.run()          # until worker.stop(), or SIGTERM under `pybondi worker`

The worker takes the messages of the consumer's topics (`pybondi.messaging.consumer`) from the
broker, as one consumer of the consumer's group, up to `consumer.in_flight` at a time.
Each message gets a `Session` of its own. In its database transaction, the message's id
goes into the store's inbox table, next to what the handlers changed and the messages
they published through the session's outbox. The message is acknowledged only after
that transaction committed.

**The guarantee.** Brokers deliver at least once: a message comes again when its worker
dies before acknowledging it, or when the acknowledgement is lost. A message whose id
the inbox already holds for the group is acknowledged and skipped, without running its
handlers. So what the handlers do *in the session's transaction* (aggregates, events,
outbox messages) happens exactly once. What they do *outside it* (an e-mail, an HTTP
call) happens at least once: after a crash between the side effect and the commit, the
message is handled again. Make such calls idempotent, or publish a message and do them
in a subscriber of their own. The inbox keeps ids for `inbox_retention` (seven days):
a duplicate arriving later than that is handled again. Only the worker writes the
inbox; no header a producer sets makes a group skip a message. A replayed dead letter
(`pybondi.messaging.deadletters`) is skipped by the topic's other groups because their inbox has
its id, from the original: one replayed after their retention is new to them.

**Failures.** A handler that raises rolls its session back; the message comes back
after a delay (`consumer.retry`: exponential backoff, through the broker, so nothing
waits in memory), up to `consumer.retry.attempts` attempts; then it goes to the dead
letters, a table of the store, with the error, the attempt count and the original
headers and body (`pybondi dead-letters list|show|replay|discard`), and into the
group's inbox, so that a redelivery changes nothing. A handler that takes longer than
`consumer.timeout` (async stores) is cancelled: a failed attempt. A message delivered
more times than its attempts without ever failing (its worker died each time: a crash,
an exhausted memory) is dead-lettered without running a handler (on RabbitMQ, quorum
queues count redeliveries; a classic queue you declared does not, and there the message
comes back until it stops killing its worker). A message the group's inbox already has
is never dead-lettered. Either way the worker goes on with the next message.

**Unreadable messages** (not JSON, an unregistered type, a payload that fails
validation, a command for a `dispatch`ed topic that is not one, an id the inbox cannot
keep: over 255 characters, or not text) are dead-lettered at once, without running a
handler: retrying would not help. They do not go into the inbox, as the group never
handled them: a corrected message sent with the same id is handled, and the same bad
message delivered again is acknowledged without a second dead letter. A flood of them
costs one transaction each and holds nothing up. Should dead-lettering itself fail for
another reason than the store being out of reach (a bug), the worker logs the message
and the error once, with the traceback, and acknowledges it: the message is then lost
but for that log line, rather than coming back forever.

**The store out of reach.** A session that fails because the database does not answer
is no failed attempt (`pybondi.messaging._storehealth`): once a trivial transaction fails too, the
worker takes no new messages, and those under way wait, without counting an attempt
and with their heartbeats going on, to be handled again as soon as the store answers
(it is probed every second). The log says so once when it starts and once when it
ends, and once a minute in between.

**Stopping.** `stop()` (SIGTERM under the CLI) stops taking messages, lets those under
way finish and acknowledges them, for up to `grace` seconds; a message still under way
after that is rolled back and comes back to another worker, as does one waiting for the
store, at once. `run` returns within `grace` (and a second more to close the
connections, if the messages took all of it), whatever the broker is doing: a receive
waiting for a broker that does not answer, or a connection being made, is given up.

A `ConcurrencyError` (another session changed the same aggregate meanwhile) is not a
failure of the message: it is handled again at once, in a new session, up to ten times.

**Order.** Messages are handled concurrently. With `consumer.key`, messages with one key
are handled one after the other, in the order this worker received them. Across
workers, and for a retried message, order is not kept: a retry comes after messages
received in the meantime.

**Batches** (`batch=N`, opt-in; `pybondi.messaging.worker.batching`): the messages ready
together, of different keys, commit up to N in one transaction, each in a session of its
own, and are acknowledged after it. A batch that fails rolls back, and its messages go
on one transaction each, exactly as above: a failed batch counts no attempt.

Stores: with an async store, sessions run on the event loop (`async with Session`) and
handlers may be sync or async; with a sync store, each session runs in a thread of its
own (`with Session`), for sync handlers that use the sync API (`repository.get`): async
handlers are refused at start, and a stop waits for the threads, which cannot be
interrupted, beyond the grace if need be.
"""

from pybondi.messaging.worker.loop import Worker

__all__ = ["Worker"]
