from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import fast_depends
import pytest

try:  # a dev dependency, for the web example; the core's tests run without it
    import fastapi
except ModuleNotFoundError:  # pragma: no cover - depends on the installation
    fastapi = None  # type: ignore[assignment]

import pybondi
from pybondi import AsyncRequired, Event, InvalidHandler, Messagebus, Publisher
from pybondi.messagebus import Depends
from tests.conftest import Driver


@dataclass
class Ping(Event):
    value: int = 0


def get_db() -> dict[str, int]:
    raise NotImplementedError("overridden in tests")


def test_depends_is_one_marker_everywhere() -> None:
    assert pybondi.Depends is Depends is pybondi.publisher.Depends is fast_depends.Depends


def test_override_set_after_registration_applies(driver: Driver) -> None:
    bus, db = Messagebus(), {"hits": 0}

    @bus.on(Ping)
    def handler(event: Ping, store: dict[str, int] = Depends(get_db)) -> None:
        store["hits"] += 1

    bus.dependency_overrides[get_db] = lambda: db
    driver.handle(bus, Ping())
    replacement = {"hits": 10}
    bus.dependency_overrides[get_db] = lambda: replacement
    driver.handle(bus, Ping())
    assert db == {"hits": 1}
    assert replacement == {"hits": 11}
    del bus.dependency_overrides[get_db]
    with pytest.raises(NotImplementedError):
        driver.handle(bus, Ping())


def test_override_must_be_callable() -> None:
    with pytest.raises(TypeError, match="lambda: value"):
        Messagebus().dependency_overrides[get_db] = {"hits": 0}  # type: ignore[assignment]


def test_overrides_belong_to_their_bus(driver: Driver) -> None:
    first, second, seen = Messagebus(), Messagebus(), []
    for bus, name in ((first, "first"), (second, "second")):
        bus.on(Ping)(lambda event, db=Depends(get_db): seen.append(db))
        bus.dependency_overrides[get_db] = lambda name=name: name
    driver.handle(first, Ping())
    driver.handle(second, Ping())
    assert seen == ["first", "second"]


def number() -> int:
    return 7


def test_fast_depends_marker_and_annotated_work(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(Ping)
    def handler(
        event: Ping,
        a: int = fast_depends.Depends(number),
        b: Annotated[int, Depends(number)] = 0,
    ) -> None:
        seen.append((a, b))

    driver.handle(bus, Ping())
    assert seen == [(7, 7)]


def test_sub_dependencies_and_per_dispatch_cache(driver: Driver) -> None:
    bus, calls, seen = Messagebus(), [], []

    def settings() -> str:
        calls.append("settings")
        return "dsn"

    def connection(dsn: str = Depends(settings)) -> str:
        calls.append("connection")
        return f"conn({dsn})"

    def fresh() -> int:
        calls.append("fresh")
        return len(calls)

    @bus.on(Ping)
    def handler(
        event: Ping,
        conn: str = Depends(connection),
        dsn: str = Depends(settings),
        one: int = Depends(fresh, use_cache=False),
        two: int = Depends(fresh, use_cache=False),
    ) -> None:
        seen.append((conn, dsn, one != two))

    driver.handle(bus, Ping())
    driver.handle(bus, Ping())
    assert seen == [("conn(dsn)", "dsn", True)] * 2
    # settings is needed twice per dispatch but called once; the cache does not outlive it.
    assert calls.count("settings") == 2
    assert calls.count("fresh") == 4


def test_override_with_its_own_dependencies(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    def tenant() -> str:
        return "acme"

    def scoped_db(name: str = Depends(tenant)) -> dict[str, int]:
        return {name: 1}

    bus.on(Ping)(lambda event, db=Depends(get_db): seen.append(db))
    bus.dependency_overrides[get_db] = scoped_db
    driver.handle(bus, Ping())
    assert seen == [{"acme": 1}]


def test_generator_dependency_tears_down_after_handler(driver: Driver) -> None:
    bus, log = Messagebus(), []

    def resource() -> Iterator[str]:
        log.append("open")
        try:
            yield "resource"
        except ValueError:
            log.append("saw error")
            raise
        finally:
            log.append("close")

    @bus.on(Ping)
    def handler(event: Ping, r: str = Depends(resource)) -> None:
        log.append(f"handle {r}")
        if event.value:
            raise ValueError("fail")

    driver.handle(bus, Ping())
    assert log == ["open", "handle resource", "close"]
    log.clear()
    with pytest.raises(ValueError):
        driver.handle(bus, Ping(1))
    assert log == ["open", "handle resource", "saw error", "close"]


def test_unresolvable_annotated_depends_is_an_error_not_ignored() -> None:
    def local() -> int:
        return 1

    def handler(event: Ping, n: Annotated[int, Depends(local)] = 0) -> None: ...

    with pytest.raises(InvalidHandler, match="Cannot evaluate the annotation of 'n'"):
        Messagebus().on(Ping)(handler)


def test_dependency_cycle_is_reported() -> None:
    bus = Messagebus()

    def a(x: int = Depends(lambda y=Depends(get_db): y)) -> int:
        return x

    bus.on(Ping)(lambda event, v=Depends(a): None)
    bus.dependency_overrides[get_db] = a
    with pytest.raises(InvalidHandler, match="Dependency cycle"):
        bus.handle(Ping())


def test_dependency_with_unfillable_parameter_is_reported() -> None:
    bus = Messagebus()

    def needs(thing: int) -> int:
        return thing

    bus.on(Ping)(lambda event, v=Depends(needs): None)
    with pytest.raises(InvalidHandler, match="'thing' of dependency"):
        bus.handle(Ping())


def test_handler_without_dependencies_is_called_directly() -> None:
    bus = Messagebus()

    def handler(event: Ping) -> None: ...

    bus.on(Ping)(handler)
    bus.handle(Ping())
    assert bus._routes[Ping] is handler


def test_async_dependencies_in_async_handlers() -> None:
    bus, log = Messagebus(), []

    async def token() -> str:
        await asyncio.sleep(0)
        return "token"

    async def client(t: str = Depends(token)) -> AsyncIterator[str]:
        log.append("connect")
        yield f"client({t})"
        log.append("disconnect")

    def sync_part() -> int:
        return 1

    @bus.on(Ping)
    async def handler(event: Ping, c: str = Depends(client), n: int = Depends(sync_part)) -> None:
        log.append(f"{c} {n}")

    @bus.on(Ping)
    def sync_handler(event: Ping, t: str = Depends(token)) -> None:
        log.append(f"sync {t}")

    asyncio.run(bus.ahandle(Ping()))
    assert log == ["connect", "client(token) 1", "disconnect", "sync token"]


def test_sync_path_refuses_async_dependency_by_name() -> None:
    bus = Messagebus()

    async def token() -> str:
        return "t"

    bus.on(Ping)(lambda event, t=Depends(token): None)
    with pytest.raises(AsyncRequired, match=r"token is async"):
        bus.handle(Ping())


def test_publisher_dependencies_and_overrides(driver: Driver) -> None:
    publisher, sink = Publisher(), list[int]()

    @publisher.subscribe("t")
    def subscriber(message: pybondi.Message[int], out: list[int] = Depends(get_db)) -> None:
        out.append(message.payload)

    publisher.dependency_overrides[get_db] = lambda: sink
    publisher.publish("t", pybondi.Message(1))
    driver.deliver(publisher)
    assert sink == [1]


def test_single_dependency_by_position_or_keyword(driver: Driver) -> None:
    bus, seen = Messagebus(), list[tuple[object, ...]]()

    @bus.on(Ping)
    def next_to_message(event: Ping, n: int = Depends(number)) -> None:
        seen.append(("next", n))

    @bus.on(Ping)
    def keyword_only(event: Ping, *, n: int = Depends(number)) -> None:
        seen.append(("keyword", n))

    @bus.on(Ping)
    def after_a_default(event: Ping, flag: bool = True, n: int = Depends(number)) -> None:
        seen.append(("after default", n, flag))

    driver.handle(bus, Ping())
    assert seen == [("next", 7), ("keyword", 7), ("after default", 7, True)]


def test_assigning_a_whole_overrides_mapping_applies_and_copies(driver: Driver) -> None:
    bus, seen = Messagebus(), list[object]()
    bus.on(Ping)(lambda event, db=Depends(get_db): seen.append(db))
    bus.dependency_overrides[get_db] = lambda: "first"
    driver.handle(bus, Ping())
    mapping = {get_db: lambda: "second"}
    bus.dependency_overrides = mapping
    driver.handle(bus, Ping())
    mapping[get_db] = lambda: "ignored: the bus keeps a copy"
    driver.handle(bus, Ping())
    assert seen == ["first", "second", "second"]
    with pytest.raises(TypeError, match="must be callable"):
        bus.dependency_overrides = {get_db: "not callable"}  # type: ignore[dict-item]


def test_a_wrapped_async_handler_is_async() -> None:
    import functools

    bus, seen = Messagebus(), []

    def logged(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)  # a plain decorator, around an async function
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return wrapper

    @bus.on(Ping)
    @logged
    async def handler(event: Ping) -> None:
        seen.append(event.value)

    with pytest.raises(AsyncRequired, match="handler is async"):
        bus.handle(Ping(1))
    asyncio.run(bus.ahandle(Ping(2)))
    assert seen == [2]


def test_generator_handlers_are_refused_at_registration() -> None:
    def handler(event: Ping) -> Iterator[None]:
        yield None

    with pytest.raises(InvalidHandler, match="generator function: its body would never run"):
        Messagebus().on(Ping)(handler)


# FastAPI's markers ---------------------------------------------------------------------


def get_number() -> int:
    return 1


@pytest.mark.skipif(fastapi is None, reason="FastAPI is not installed (pybondi[dev] has it)")
def test_fastapis_depends_in_a_handler_is_refused_at_registration() -> None:
    assert fastapi is not None
    bus = Messagebus()
    with pytest.raises(InvalidHandler, match=r"Parameter 'number' .* FastAPI's Depends") as default:

        @bus.on(Ping)
        def as_default(event: Ping, number: int = fastapi.Depends(get_number)) -> None: ...

    assert "from pybondi import Depends" in str(default.value)
    with pytest.raises(InvalidHandler, match="FastAPI's Security"):

        @bus.on(Ping)
        def in_annotated(
            event: Ping, number: Annotated[int, fastapi.Security(get_number)]
        ) -> None: ...
