"""Test helpers: given/when/then scenarios, and the relay and workers run in-process.

    from pybondi.testing import Scenario

    scenario = Scenario(messagebus, accounts, dependencies={get_accounts: lambda: accounts})
    scenario.given_events("alice", Opened("alice"), Deposited("alice", 10))
    scenario.when(Withdraw("alice", 3)).then(Withdrawn("alice", 3))

    runner = InProcessRunner(MemoryStore(), MemoryBroker(clock=ManualClock()))
    drained = runner.drain(consumer)    # outbox -> relay -> broker -> worker, retries too

See `pybondi.testing.scenarios` and `pybondi.testing.runner`. The pytest plugin
(`pybondi.testing.plugin`, loaded by pytest where pybondi is installed) gives both as
fixtures: `memory_store`, `memory_broker`, `manual_clock`, `pybondi_runner`,
`pybondi_bus`. `pybondi.testing.contracts` holds the suites every broker passes.

Every name is imported on first use, so that loading the plugin costs little.
"""

from typing import TYPE_CHECKING

from pybondi import _lazy

if TYPE_CHECKING:  # what __getattr__ imports on first use, for type checkers
    from pybondi.testing.runner import Drained as Drained
    from pybondi.testing.runner import InProcessRunner as InProcessRunner
    from pybondi.testing.scenarios import Scenario as Scenario

__all__ = ["Drained", "InProcessRunner", "Scenario"]

_LAZY: _lazy.Lazy = {
    "Drained": ("pybondi.testing.runner", None),
    "InProcessRunner": ("pybondi.testing.runner", None),
    "Scenario": ("pybondi.testing.scenarios", None),
}

if not TYPE_CHECKING:
    __getattr__, __dir__ = _lazy.exports(__name__, globals(), _LAZY)

del TYPE_CHECKING
