"""The HTTP API: one unit of work per request, commands answering with their result.

    PYBONDI_STORE_URL=postgresql://localhost/allocation uvicorn examples.allocation.web:app

`create_app(store)` makes the app on a store of your choosing (the tests' own);
`app`, for uvicorn, opens `SQLStore(PYBONDI_STORE_URL, asynchronous=True)` when it
starts, and creates the tables it lacks. The relay and the worker run beside it: see
README.md in this folder.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from examples.allocation import views
from examples.allocation.domain import OutOfStock
from examples.allocation.service import (
    AddBatch,
    Allocate,
    AlreadyAllocated,
    Deallocate,
    NotAllocated,
    unit_of_work,
)
from pybondi import ConcurrencyError, NotFound, Session
from pybondi.persistence import SQLStore

Name = Annotated[str, Field(min_length=1, max_length=50)]


class BatchIn(BaseModel):
    reference: Name
    sku: Name
    qty: int = Field(gt=0)
    eta: date | None = None


class LineIn(BaseModel):
    orderid: Name
    sku: Name
    qty: int = Field(gt=0)


async def open_session(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work: it commits when the endpoint returned, or rolls back."""
    async with unit_of_work(request.app.state.store) as session:
        yield session


# scope="function": the session commits before the response is sent, so that a commit
# that fails (ConcurrencyError) answers with an error, not with the endpoint's result.
UnitOfWork = Annotated[Session, Depends(open_session, scope="function")]


async def connect(request: Request) -> AsyncIterator[AsyncConnection]:
    """A connection for queries: they read the views, committed state only."""
    async with views.engine(request.app.state.store).connect() as connection:
        yield connection


Reading = Annotated[AsyncConnection, Depends(connect)]

router = APIRouter()


@router.post("/batches", status_code=201)
async def add_batch(batch: BatchIn, session: UnitOfWork) -> dict[str, str]:
    command = AddBatch(batch.reference, batch.sku, batch.qty, batch.eta)
    return {"reference": await session.aexecute(command)}


@router.post("/allocate", status_code=201)
async def allocate(line: LineIn, session: UnitOfWork) -> dict[str, str]:
    return {"batchref": await session.aexecute(Allocate(line.orderid, line.sku, line.qty))}


@router.delete("/allocations/{orderid}")
async def deallocate(orderid: str, session: UnitOfWork) -> dict[str, str]:
    return {"batchref": await session.aexecute(Deallocate(orderid))}


@router.get("/allocations/{orderid}")
async def allocation(orderid: str, connection: Reading) -> dict[str, Any]:
    """Where an order line was allocated: its product and batch."""
    if (row := await views.allocation(connection, orderid)) is None:
        raise NotAllocated(orderid)
    return row._asdict()


@router.get("/batches/{reference}")
async def batch(reference: str, connection: Reading) -> dict[str, Any]:
    """A batch, and so the product that holds it."""
    if (row := await views.batch(connection, reference)) is None:
        raise HTTPException(404, f"There is no batch {reference}.")
    return row._asdict()


@router.get("/products/{sku}/stock")
async def stock(sku: str, connection: Reading) -> dict[str, int]:
    """What each batch of the product has left (cached until the product changes)."""
    if (left := views.stock_cache.get(sku)) is None:
        left = views.stock_cache[sku] = await views.stock(connection, sku)
    if not left:
        raise HTTPException(404, f"There is no product {sku}.")
    return left


@router.get("/products/{sku}/allocated")
async def allocated(sku: str, connection: Reading) -> dict[str, Any]:
    """How much of the product is allocated, from the projection (a little behind)."""
    return {"sku": sku, "allocated": await views.allocated_quantity(connection, sku)}


ERRORS: dict[type[Exception], int] = {
    OutOfStock: 409,
    AlreadyAllocated: 409,
    # Another request changed the product since this one read it; nothing of this one
    # was written, and the client may send it again.
    ConcurrencyError: 409,
    NotFound: 404,  # no product has that sku
    NotAllocated: 404,
}


async def answer_error(request: Request, error: Exception) -> JSONResponse:
    """A domain error as a 4xx response: {"error": its kind, "detail": what to do}."""
    status = next(code for kind, code in ERRORS.items() if isinstance(error, kind))
    detail = f"There is no product {error.id}." if isinstance(error, NotFound) else str(error)
    return JSONResponse({"error": type(error).__name__, "detail": detail}, status_code=status)


def create_app(store: SQLStore | None = None) -> FastAPI:
    """The API on `store` (async), or on `PYBONDI_STORE_URL`'s when it starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store or SQLStore(store_url(), asynchronous=True)
        await views.create_tables(app.state.store)
        try:
            yield
        finally:
            if store is None:
                await app.state.store.adispose()

    app = FastAPI(title="allocation", lifespan=lifespan)
    app.include_router(router)
    for kind in ERRORS:
        app.add_exception_handler(kind, answer_error)
    return app


def store_url() -> str:
    url = os.environ.get("PYBONDI_STORE_URL")
    if not url:
        raise RuntimeError(
            "The allocation service keeps its products in a SQL database: set "
            "PYBONDI_STORE_URL to its URL (sqlite:///allocation.db, postgresql://host/db)."
        )
    return url


app = create_app()
