"""An allocation service on pybondi: a FastAPI app, its outbox, a worker, a projection.

    domain.py      products, batches, order lines; `OutOfStock`; the events
    service.py     commands and handlers, reaching their unit of work through
                   `current_session` and the read model through `current_connection`
    views.py       the read model's tables and queries
    web.py         the HTTP API: one session per request (`create_app`, `app`)
    worker.py      the consumer that notifies customers of their allocations
    projection.py  how much of each product is allocated, from the event log

Run it (from the repository's root; see README.md here):

    export PYBONDI_STORE_URL=sqlite:///allocation.db PYBONDI_BROKER_URL=redis://localhost:6379
    uvicorn examples.allocation.web:app
    pybondi relay
    pybondi worker examples.allocation.worker:consumer
    pybondi project examples.allocation.projection:projection
"""
