"""Contract suites: the behaviour every backend keeps, as pytest tests yours can run.

- `pybondi.testing.contracts.brokers`: `BrokerContract`, on a `BrokerTarget`.
- `pybondi.testing.contracts.stores`: `StoreContract`, on a `StoreTarget`.
"""
