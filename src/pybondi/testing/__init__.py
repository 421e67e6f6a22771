"""Test helpers: given/when/then scenarios for your handlers and aggregates.

    from pybondi.testing import Scenario

    scenario = Scenario(messagebus, accounts, dependencies={get_accounts: lambda: accounts})
    scenario.given_events("alice", Opened("alice"), Deposited("alice", 10))
    scenario.when(Withdraw("alice", 3)).then(Withdrawn("alice", 3))

See `pybondi.testing.scenarios` for what each step does.
"""

from pybondi.testing.scenarios import Scenario

__all__ = ["Scenario"]
