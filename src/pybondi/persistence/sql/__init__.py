"""SQL stores on SQLAlchemy 2: SQLite embedded, PostgreSQL and MariaDB for production.

`SQLStore` is in `store`, its unit of work in `transaction` (psycopg's pipeline mode in
`pipelining`); the tables and the statements compiled for each dialect in `statements`;
the reads and writes of a transaction in `records`, with the outbox's in `outbox` and the
inbox's and dead letters' in `inbox`.
"""

from pybondi.persistence.sql.store import SQLStore
from pybondi.persistence.sql.transaction import SQLTransaction

__all__ = ["SQLStore", "SQLTransaction"]
