"""Several worker processes under one command: restarted when they die, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from pybondi.messaging.backoff import backoff

__all__ = ["Supervisor"]

logger = logging.getLogger("pybondi.cli")


class Supervisor:
    """Runs N worker processes: restarts one that dies, passes SIGTERM and Ctrl-C on.

    A worker that exits 2 (a wrong argument) stops them all: every restart would fail.
    A second SIGTERM or Ctrl-C kills the workers at once; their messages come back to
    the group.
    """

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.signals = 0  # SIGTERM and SIGINT received

    def run(self, count: int) -> int:
        """Run `count` workers until they are all stopped; return the exit status."""
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGINT, self._signalled)
        children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # and when started
        due = dict.fromkeys(range(count), 0.0)  # when to start each missing worker
        failures = dict.fromkeys(range(count), 0)  # deaths in a row, each soon after start
        status, passed_on = 0, 0
        while children or (due and not self.signals):
            if self.signals > passed_on:
                passed_on = self.signals
                due.clear()
                for child, _ in children.values():
                    child.send_signal(signal.SIGTERM if passed_on == 1 else signal.SIGKILL)
            now = time.monotonic()
            for index, at in list(due.items()):
                if at <= now:
                    del due[index]
                    children[index] = (self._spawn(index), now)
            time.sleep(0.1)
            for index, (child, started) in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                del children[index]
                if self.signals:
                    # A worker still starting dies of the SIGTERM passed on: no failure.
                    stopped = code == -signal.SIGTERM and passed_on
                    status = max(status, 0 if stopped else code if code >= 0 else 128 - code)
                elif code == 2:
                    status, self.signals = 2, 1  # the others stop too
                else:
                    lived = time.monotonic() - started
                    failures[index] = 0 if lived > _STABLE else failures[index] + 1
                    delay = backoff(failures[index], first=1.0, longest=30.0)
                    delay = delay if failures[index] else 0.0
                    logger.warning(
                        "Worker process %d exited with %d; restarting it in %.1f s",
                        child.pid, code, delay,
                    )  # fmt: skip
                    due[index] = time.monotonic() + delay
        return 130 if passed_on > 1 else status

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(self.command, env={**os.environ, "PYBONDI_WORKER": str(index)})
        logger.info("Worker process %d started (%d)", child.pid, index)
        return child

    def _signalled(self, *_: object) -> None:
        self.signals += 1


_STABLE = 60.0  # seconds a worker process must live for its restart to be immediate
