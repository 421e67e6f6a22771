"""SQL stores on SQLAlchemy 2: SQLite embedded, PostgreSQL and MariaDB for production.

`SQLStore` and its transactions are in `store`; the tables and the statements compiled
for each dialect in `statements`; the reads and writes of a transaction in `records`,
with the outbox's in `outbox` and the inbox's and dead letters' in `inbox`.
"""

from pybondi.persistence.sql.store import SQLStore, SQLTransaction

__all__ = ["SQLStore", "SQLTransaction"]
