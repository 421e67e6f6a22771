"""`pybondi relay`, with adapter options it has no flags for; one process or many.

    python tests/relay_cli.py '{"prefix": "pybondi_ab12_"}' relay --store ... --broker ...
    python tests/relay_cli.py '{"prefix": "pybondi_ab12_"}' --fork relay --store ...

The first argument is a JSON object of options for `pybondi.messaging.brokers.connect`; the rest
is the `pybondi` command line, run by `pybondi.cli.main` as `python -m pybondi` runs it.
The tests need the options because `pybondi relay` names streams, queues and exchanges
with the adapters' defaults, while a test's broker kit reads and deletes only names of
its own.

With `--fork`, the script imports what the relay needs, prints `ready`, and then, for
each `start` line on stdin, forks a relay process that runs the command, prints its pid,
waits for it to end and prints `exited STATUS` (the negated signal number if a signal
ended it). It ends at end of file. A test that kills relay after relay so spends the
half second of imports once, and not on every relay. Each relay is a process of its
own from `main()` on: its own event loop, engine, connections and relay name.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from typing import Any

import pybondi.messaging.brokers
from pybondi.cli import main
from pybondi.messaging.brokers import Broker

_connect = pybondi.messaging.brokers.connect


def connect(url: str, **options: Any) -> Broker:
    """`connect`, with the options given on this script's command line added."""
    return _connect(url, **{**json.loads(sys.argv[1]), **options})


def fork_relays(arguments: list[str]) -> int:
    """Serve `start` lines on stdin: see the module docstring."""
    _load(arguments)
    print("ready", flush=True)
    for line in sys.stdin:
        assert line.strip() == "start", line
        pid = os.fork()
        if pid == 0:
            _relay(arguments)  # never returns
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exited {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _load(arguments: list[str]) -> None:
    """Import what the command will: the relay, the store's driver, the broker's client."""
    import pybondi.messaging.relay  # noqa: F401
    from pybondi.persistence.sql import SQLStore

    def option(name: str) -> str:
        return arguments[arguments.index(name) + 1]

    SQLStore(option("--store"), asynchronous=True)  # an engine connects only when used
    _connect(option("--broker"))  # nor does an adapter


def _relay(arguments: list[str]) -> None:
    """In the forked process: run the command, and exit with its status."""
    status = 1
    try:
        random.seed()  # not the sequence of the relay before
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(2, 1)  # stdout is the fork server's line to the test
        status = main(arguments)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    # The command imports `connect` from pybondi.messaging.brokers when it starts the relay.
    pybondi.messaging.brokers.connect = connect
    if sys.argv[2] == "--fork":
        sys.exit(fork_relays(sys.argv[3:]))
    sys.exit(main(sys.argv[2:]))
