"""The web service example (examples/allocation), tested as its authors would: over HTTP.

Requests go through the ASGI app with httpx, on a SQLite file and the memory broker
(no server), and the relay and the worker run in this process (`InProcessRunner`), as
does the projection (`ProjectionRunner.acatch_up`).
Under the `postgres` and `redis` markers, 200 concurrent requests run against the real
servers, each in a session of its own, and the outbox goes through real Redis to two
workers. FastAPI and httpx come with the `dev` extra: where they are missing (the core's
own venv) this module is left out, as the run's header says.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from examples.allocation import views
from examples.allocation.domain import Allocated, Product
from examples.allocation.projection import projection
from examples.allocation.service import AddBatch, bus, unit_of_work
from examples.allocation.web import create_app, open_session
from examples.allocation.worker import Notifier, consumer, get_notifier
from fastapi import FastAPI, Request

from pybondi import Depends, Repository, Session, current_session
from pybondi.messaging import Relay, Worker
from pybondi.messaging.brokers.clock import ManualClock
from pybondi.messaging.brokers.memory import MemoryBroker
from pybondi.persistence import SQLStore
from pybondi.projection import ProjectionRunner
from pybondi.testing import InProcessRunner
from tests.backends import POSTGRES_URL, unavailable, unique
from tests.brokers import RedisKit
from tests.workers import eventually


class Notifications(Notifier):
    """The worker's notifier in the tests: keeps what it would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, orderid: str, text: str) -> None:
        self.sent.append((orderid, text))


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    sent = Notifications()
    consumer.dependency_overrides[get_notifier] = lambda: sent
    yield sent
    del consumer.dependency_overrides[get_notifier]


@pytest.fixture(autouse=True)
def empty_stock_cache() -> Iterator[None]:
    """The cache is the process's: each test starts without what another one cached."""
    views.stock_cache.clear()
    yield
    views.stock_cache.clear()


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def sqlite_store(tmp_path: Path, runner: asyncio.Runner) -> Iterator[SQLStore]:
    store = SQLStore(f"sqlite:///{tmp_path / 'allocation.db'}", asynchronous=True)
    yield store
    runner.run(store.adispose())


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app, started as uvicorn starts it (its lifespan creates the tables)."""
    transport = httpx.ASGITransport(app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://allocation") as client,
    ):
        yield client


async def add_batch(client: httpx.AsyncClient, ref: str, sku: str, qty: int, eta: Any = None):
    answer = await client.post(
        "/batches", json={"reference": ref, "sku": sku, "qty": qty, "eta": eta}
    )
    assert (answer.status_code, answer.json()) == (201, {"reference": ref})


async def allocate(client: httpx.AsyncClient, orderid: str, sku: str, qty: int) -> httpx.Response:
    line = {"orderid": orderid, "sku": sku, "qty": qty}
    return await client.post("/allocate", json=line, headers={"x-order": orderid})


async def product(store: SQLStore, sku: str) -> Product:
    """The product as stored, in a unit of work of its own."""
    async with unit_of_work(store) as session:
        found: Product = await session.repository.aget(sku)
        return found


def lines(product: Product) -> dict[str, set[str]]:
    return {
        batch.reference: {line.orderid for line in batch.allocations} for batch in product.batches
    }


OUT_OF_STOCK = "No batch of LAMP has 7 left for order o2: add a batch, or order less."


# Offline: SQLite, the memory broker ------------------------------------------------------


@pytest.mark.sqlite
def test_commands_answer_with_their_result_and_the_views_answer_queries(
    runner: asyncio.Runner, sqlite_store: SQLStore
) -> None:
    async def scenario() -> None:
        async with serving(create_app(sqlite_store)) as client:
            await add_batch(client, "shipment", "LAMP", 20, "2031-01-01")
            await add_batch(client, "warehouse", "LAMP", 10)

            answer = await allocate(client, "o1", "LAMP", 3)
            assert (answer.status_code, answer.json()) == (201, {"batchref": "warehouse"})
            answer = await client.get("/allocations/o1")
            assert answer.json() == {
                "orderid": "o1",
                "sku": "LAMP",
                "qty": 3,
                "batchref": "warehouse",
            }
            # Which product holds a batch: a lookup by something else than the product's id.
            answer = await client.get("/batches/shipment")
            assert answer.json() == {"reference": "shipment", "sku": "LAMP", "purchased": 20}
            assert (await client.get("/products/LAMP/stock")).json() == {
                "shipment": 20,
                "warehouse": 7,
            }

            # More than the warehouse has left: the shipment. The cached stock was
            # forgotten once the allocation committed.
            assert (await allocate(client, "o2", "LAMP", 8)).json() == {"batchref": "shipment"}
            assert (await client.get("/products/LAMP/stock")).json() == {
                "shipment": 12,
                "warehouse": 7,
            }

            # Deallocating finds the order's product through the view.
            answer = await client.delete("/allocations/o1")
            assert (answer.status_code, answer.json()) == (200, {"batchref": "warehouse"})
            assert (await client.get("/allocations/o1")).status_code == 404
            assert (await client.get("/products/LAMP/stock")).json() == {
                "shipment": 12,
                "warehouse": 10,
            }
        assert lines(await product(sqlite_store, "LAMP")) == {
            "shipment": {"o2"},
            "warehouse": set(),
        }

    runner.run(scenario())


@pytest.mark.sqlite
def test_domain_errors_answer_4xx_and_write_nothing(
    runner: asyncio.Runner, sqlite_store: SQLStore
) -> None:
    async def scenario() -> None:
        async with serving(create_app(sqlite_store)) as client:
            await add_batch(client, "warehouse", "LAMP", 10)
            assert (await allocate(client, "o1", "LAMP", 4)).status_code == 201
            stock = (await client.get("/products/LAMP/stock")).json()
            before = await product(sqlite_store, "LAMP")

            answer = await allocate(client, "o2", "LAMP", 7)
            assert (answer.status_code, answer.json()) == (
                409,
                {"error": "OutOfStock", "detail": OUT_OF_STOCK},
            )
            assert (await client.get("/allocations/o2")).status_code == 404
            assert (await product(sqlite_store, "LAMP")).batches == before.batches
            assert (await client.get("/products/LAMP/stock")).json() == stock

            answer = await allocate(client, "o1", "LAMP", 1)
            assert (answer.status_code, answer.json()["error"]) == (409, "AlreadyAllocated")
            answer = await allocate(client, "o3", "DESK", 1)
            assert (answer.status_code, answer.json()) == (
                404,
                {"error": "NotFound", "detail": "There is no product DESK."},
            )
            answer = await client.delete("/allocations/o9")
            assert (answer.status_code, answer.json()["error"]) == (404, "NotAllocated")
            assert (await allocate(client, "o4", "LAMP", 0)).status_code == 422  # pydantic's
            assert (await product(sqlite_store, "LAMP")).batches == before.batches

    runner.run(scenario())


def read_before_another_request_commits(app: FastAPI, store: SQLStore) -> None:
    """Make each request's session read LAMP, then let another unit of work change it."""

    async def stale(request: Request) -> AsyncIterator[Session]:
        async with asynccontextmanager(open_session)(request) as session:
            await session.repository.aget("LAMP")
            async with unit_of_work(store) as other:
                await other.aexecute(AddBatch(f"late-{request.headers['x-order']}", "LAMP", 5))
            yield session

    app.dependency_overrides[open_session] = stale


@pytest.mark.sqlite
def test_a_commit_that_fails_answers_409_and_leaves_no_view_row_nor_message(
    runner: asyncio.Runner, sqlite_store: SQLStore, notifications: Notifications
) -> None:
    app = create_app(sqlite_store)

    async def scenario() -> None:
        async with serving(app) as client:
            await add_batch(client, "warehouse", "LAMP", 10)
            read_before_another_request_commits(app, sqlite_store)
            answer = await allocate(client, "o1", "LAMP", 3)
            app.dependency_overrides.clear()

            # The handler ran and wrote its view row; the commit failed, and took it along.
            assert (answer.status_code, answer.json()["error"]) == (409, "ConcurrencyError")
            assert (await client.get("/allocations/o1")).status_code == 404
            assert (await client.get("/batches/late-o1")).status_code == 200  # the other's
            assert lines(await product(sqlite_store, "LAMP")) == {
                "warehouse": set(),
                "late-o1": set(),
            }
            # Sent again, it goes through.
            assert (await allocate(client, "o1", "LAMP", 3)).status_code == 201

        drained = await InProcessRunner(sqlite_store, MemoryBroker(clock=ManualClock())).adrain(
            consumer
        )
        assert (drained.sent, drained.handled) == (1, 1)
        assert notifications.sent == [("o1", "3 x LAMP will leave from batch warehouse.")]

    runner.run(scenario())


@pytest.mark.sqlite
def test_the_worker_notifies_each_committed_allocation_once(
    runner: asyncio.Runner, sqlite_store: SQLStore, notifications: Notifications
) -> None:
    async def scenario() -> None:
        async with serving(create_app(sqlite_store)) as client:
            await add_batch(client, "warehouse", "LAMP", 10)
            for orderid, qty in [("o1", 4), ("o2", 9), ("o3", 6)]:  # o2: out of stock
                await allocate(client, orderid, "LAMP", qty)
            await client.delete("/allocations/o1")  # Deallocated is no integration event

        runner_ = InProcessRunner(sqlite_store, MemoryBroker(clock=ManualClock()))
        drained = await runner_.adrain(consumer)
        assert (drained.sent, drained.handled, drained.retried) == (2, 2, 0)
        assert sorted(notifications.sent) == [
            ("o1", "4 x LAMP will leave from batch warehouse."),
            ("o3", "6 x LAMP will leave from batch warehouse."),
        ]
        assert (await runner_.adrain(consumer)).handled == 0

    runner.run(scenario())


@pytest.mark.sqlite
def test_the_projection_counts_what_the_log_holds_once(
    runner: asyncio.Runner, sqlite_store: SQLStore
) -> None:
    app = create_app(sqlite_store)
    projector = ProjectionRunner(projection, sqlite_store)

    async def allocated(client: httpx.AsyncClient) -> int:
        answer = await client.get("/products/LAMP/allocated")
        return int(answer.json()["allocated"])

    async def scenario() -> None:
        async with serving(app) as client:
            await add_batch(client, "warehouse", "LAMP", 10)
            await allocate(client, "o1", "LAMP", 4)
            await allocate(client, "o2", "LAMP", 9)  # out of stock: no event in the log
            read_before_another_request_commits(app, sqlite_store)
            assert (await allocate(client, "o3", "LAMP", 2)).status_code == 409
            app.dependency_overrides.clear()  # its Allocated never reached the log either
            await allocate(client, "o4", "LAMP", 5)
            await client.delete("/allocations/o1")
            assert await allocated(client) == 0  # the projection has not run yet

            assert await projector.acatch_up() > 0
            assert await allocated(client) == 5
            assert await projector.acatch_up() == 0  # nothing twice
            assert await allocated(client) == 5

            await projector.arebuild()  # the view emptied, the checkpoint back to 0
            assert await allocated(client) == 0
            await projector.acatch_up()
            assert await allocated(client) == 5

    runner.run(scenario())


@pytest.mark.sqlite
def test_the_app_for_uvicorn_opens_the_store_its_environment_names(
    runner: asyncio.Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from examples.allocation import web

    async def scenario() -> None:
        async with serving(web.app) as client:
            await add_batch(client, "warehouse", "LAMP", 10)
            assert (await allocate(client, "o1", "LAMP", 1)).json() == {"batchref": "warehouse"}

    monkeypatch.delenv("PYBONDI_STORE_URL", raising=False)
    with pytest.raises(RuntimeError, match="set PYBONDI_STORE_URL to its URL"):
        runner.run(scenario())
    monkeypatch.setenv("PYBONDI_STORE_URL", f"sqlite:///{tmp_path / 'uvicorn.db'}")
    runner.run(scenario())
    assert (tmp_path / "uvicorn.db").exists()


# Many requests at once, each in its own session -------------------------------------------


@dataclass
class Witness:
    """Which session each request opened, and which one its handlers ran in."""

    opened: dict[str, list[tuple[Session, Repository[Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    seen: dict[str, list[tuple[Session, Repository[Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )


WITNESS = Witness()


@bus.on(Allocated)
def witness(event: Allocated, session: Session = Depends(current_session)) -> None:
    """What the handlers of the request for this order see as their session."""
    WITNESS.seen[event.orderid].append((session, session.repository))


def witnessed(app: FastAPI) -> Witness:
    """Note the session each request (by its x-order header) opens."""
    WITNESS.opened.clear()
    WITNESS.seen.clear()

    async def noting(request: Request) -> AsyncIterator[Session]:
        async with asynccontextmanager(open_session)(request) as session:
            WITNESS.opened[request.headers["x-order"]].append((session, session.repository))
            yield session

    app.dependency_overrides[open_session] = noting
    return WITNESS


@dataclass
class Deployment:
    """A store, and how the outbox reaches the worker: what the test chose to run on."""

    store: SQLStore
    deliver: Callable[[int], Awaitable[None]]  # relay and work until that many notified
    run: Callable[[Any], Any]


SKUS = [f"SKU-{n}" for n in range(10)]
REQUESTS = 200


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, notifications: Notifications
) -> Iterator[Deployment]:
    if request.param == "sqlite":
        with asyncio.Runner() as loop:
            store = SQLStore(f"sqlite:///{tmp_path / 'allocation.db'}", asynchronous=True)
            memory = InProcessRunner(store, MemoryBroker(clock=ManualClock()), timeout=60)

            async def in_process(count: int) -> None:
                assert (await memory.adrain(consumer)).handled == count

            yield Deployment(store, in_process, loop.run)
            loop.run(store.adispose())
        return
    with postgres_schema() as url:
        kit = RedisKit()
        kit.start()
        store = SQLStore(url, asynchronous=True)

        async def through_redis(count: int) -> None:
            relay = Relay(store, kit.make())
            while await relay.run_once():
                pass
            # Two workers of the group share the messages; the inbox keeps repeats out.
            workers = [Worker(consumer, kit.make(), store, name=f"w{n}", grace=5) for n in (1, 2)]
            tasks = [asyncio.create_task(worker.run()) for worker in workers]
            try:
                await eventually(
                    _at_least(notifications, count), timeout=60, what=f"{count} notifications"
                )
                await asyncio.sleep(0.5)  # time for a duplicate to show up, if one would
            finally:
                for worker in workers:
                    worker.stop()
                await asyncio.gather(*tasks)
            assert sum(worker.handled for worker in workers) == count

        try:
            yield Deployment(store, through_redis, kit.run)
        finally:
            kit.run(store.adispose())
            kit.close()


def _at_least(notifications: Notifications, count: int) -> Callable[[], Coroutine[Any, Any, bool]]:
    async def check() -> bool:
        return len(notifications.sent) >= count

    return check


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A store URL whose tables, the views' included, go to a schema of the test's own."""
    schema = unique("allocation")
    admin = sa.create_engine(
        sa.make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"),
        connect_args={"connect_timeout": 3},
    )
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as error:
        admin.dispose()
        unavailable("postgres", error)
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


async def allocate_until_decided(client: httpx.AsyncClient, n: int) -> httpx.Response:
    """Order n, sent again while another request changed its product meanwhile (409).

    That is the app's answer to a ConcurrencyError: nothing was written, send it again.
    """
    sku = SKUS[n % len(SKUS)]
    for attempt in range(200):
        answer = await allocate(client, f"order-{n}", sku, 1 + n % 5)
        if answer.status_code != 409 or answer.json()["error"] != "ConcurrencyError":
            return answer
        await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    raise AssertionError(f"order-{n} kept meeting other requests: {answer.json()}")


def test_concurrent_requests_each_have_their_own_session_and_lose_no_update(
    deployment: Deployment, notifications: Notifications
) -> None:
    app = create_app(deployment.store)

    async def scenario() -> None:
        async with serving(app) as client:
            for sku in SKUS:
                await add_batch(client, f"{sku}-warehouse", sku, 30)
                await add_batch(client, f"{sku}-shipment", sku, 30, "2031-01-01")
            witness = witnessed(app)
            answers = await asyncio.gather(
                *(allocate_until_decided(client, n) for n in range(REQUESTS))
            )
            app.dependency_overrides.clear()

            # Every handler ran in the session its own request opened, with its repository.
            sessions = [pair for pairs in witness.opened.values() for pair in pairs]
            assert len({id(session) for session, _ in sessions}) == len(sessions)
            assert len({id(repository) for _, repository in sessions}) == len(sessions)
            for orderid, seen in witness.seen.items():
                for session, repository in seen:
                    assert any(
                        session is opened and repository is opened.repository
                        for opened, _ in witness.opened[orderid]
                    ), f"{orderid}'s handler ran in another request's session"

            # No update lost: what each product has left is what it had, less the
            # allocations that answered 201; the others were refused for want of stock.
            allocated: Counter[str] = Counter()
            for n, answer in enumerate(answers):
                sku, qty = SKUS[n % len(SKUS)], 1 + n % 5
                if answer.status_code == 201:
                    allocated[sku] += qty
                    view = (await client.get(f"/allocations/order-{n}")).json()
                    assert view["batchref"] == answer.json()["batchref"]
                else:
                    assert (answer.status_code, answer.json()["error"]) == (409, "OutOfStock")
            for sku in SKUS:
                left = (await client.get(f"/products/{sku}/stock")).json()
                stored = await product(deployment.store, sku)
                assert sum(batch.available for batch in stored.batches) == 60 - allocated[sku]
                assert sum(left.values()) == 60 - allocated[sku]
            # The projection, from the log, comes to the same.
            await ProjectionRunner(projection, deployment.store).acatch_up()
            for sku in SKUS:
                answer = await client.get(f"/products/{sku}/allocated")
                assert answer.json() == {"sku": sku, "allocated": allocated[sku]}
            successes = sum(answer.status_code == 201 for answer in answers)
            assert successes > 100  # most orders fit: the test tells something

        await deployment.deliver(successes)
        orders = Counter(orderid for orderid, _ in notifications.sent)
        assert len(orders) == successes and set(orders.values()) == {1}

    deployment.run(scenario())


# The README's section shows this example's code: it must stay the example's ---------------

ROOT = Path(__file__).parent.parent
SECTION = "### In a web application"


def test_the_readme_shows_the_example_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.find(f"\n{SECTION}\n")
    if start < 0:
        pytest.skip(f"README.md has no section {SECTION!r} (yet) to compare with the example")
    following = re.compile(r"^#{2,3} ", flags=re.MULTILINE).search(readme, start + len(SECTION) + 2)
    section = readme[start : following.start() if following else len(readme)]
    excerpts = re.findall(r"^```py\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert excerpts, f"the README's {SECTION!r} shows none of the example's code"
    sources = [path.read_text() for path in sorted((ROOT / "examples" / "allocation").glob("*.py"))]
    for excerpt in excerpts:
        assert any(excerpt in source for source in sources), (
            f"README.md's {SECTION!r} shows code that examples/allocation does not have "
            f"(copy it from there again):\n{excerpt}"
        )
