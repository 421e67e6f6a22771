"""`pybondi dead-letters`: list, show, replay or discard the messages workers gave up on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pybondi.cli.options import log_level, positive, store_arguments
from pybondi.cli.running import open_store, refuse, tables_ready

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add `dead-letters` and its actions to the command line's subcommands."""
    letters = commands.add_parser(
        "dead-letters", help="list, show, replay or discard the messages workers gave up on"
    )
    actions = letters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    show = actions.add_parser("show", help="a dead letter in full: headers, body, error")
    show.add_argument("ids", type=_id, nargs="+", metavar="ID")
    replay = actions.add_parser(
        "replay", help="send dead letters to their topic again, through the outbox"
    )
    discard = actions.add_parser("discard", help="delete dead letters for good")
    for action in (replay, discard):
        action.add_argument("ids", type=_id, nargs="*", metavar="ID")
        action.add_argument(
            "--all", action="store_true", help="every dead letter (of --group/--topic)"
        )
    for action in (listing, replay, discard):
        action.add_argument("--group", help="only those of this consumer group")
        action.add_argument("--topic", help="only those of this topic")
    listing.add_argument("--limit", type=positive, default=100, help="at most (default 100)")
    listing.add_argument("--after", type=int, default=0, help="ids above this one")
    for action in (listing, show, replay, discard):
        store_arguments(action)
        log_level(action)


async def run(arguments: argparse.Namespace) -> int:
    """Carry out the dead-letters action asked for; return the exit status."""
    from pybondi.messaging.deadletters import DeadLetters  # noqa: PLC0415

    store = open_store(arguments)
    if store is None:
        return 2
    try:
        if not await tables_ready(store, create=False, wait=False):
            return 2
        letters = DeadLetters(store)
        action: Callable[[DeadLetters, argparse.Namespace], Any] = _ACTIONS[arguments.action]
        return int(await action(letters, arguments))
    finally:
        await store.adispose()


async def _list(letters: Any, arguments: argparse.Namespace) -> int:
    found = await letters.list(
        group=arguments.group, topic=arguments.topic, after=arguments.after, limit=arguments.limit
    )
    for letter in found:
        reason = letter.error.splitlines()[0] if letter.error else ""
        print(
            f"{letter.id}\t{letter.failed_at:%Y-%m-%d %H:%M:%S}\t{letter.group}\t{letter.topic}"
            f"\t{letter.message_id}\t{letter.attempts}\t{reason}"
        )
    return 0


async def _show(letters: Any, arguments: argparse.Namespace) -> int:
    status = 0
    for id in arguments.ids:
        letter = await letters.get(id)
        if letter is None:
            print(f"pybondi dead-letters: no dead letter {id}", file=sys.stderr)
            status = 1
            continue
        print(f"Dead letter {letter.id}, failed at {letter.failed_at.isoformat()}")
        print(f"  group: {letter.group}\n  topic: {letter.topic}\n  id: {letter.message_id}")
        print(f"  attempts: {letter.attempts}\n  headers:")
        for name, value in letter.headers.items():
            print(f"    {name}: {value}")
        print(f"  body: {letter.body}\n  error:")
        print("    " + letter.error.replace("\n", "\n    "))
    return status


async def _selected(letters: Any, arguments: argparse.Namespace) -> list[int] | None:
    """The ids given, or every id of --group/--topic with --all; None if neither."""
    if arguments.ids and (arguments.all or arguments.group or arguments.topic):
        refuse("give ids, or --all (with --group, --topic): not both")
        return None
    if arguments.ids:
        return sorted(set(arguments.ids))
    if not arguments.all:
        refuse("give the ids of the dead letters, or --all (with --group, --topic)")
        return None
    ids: list[int] = []
    while batch := await letters.list(
        group=arguments.group, topic=arguments.topic, after=ids[-1] if ids else 0, limit=1000
    ):
        ids += [letter.id for letter in batch]
    return ids


async def _replay(letters: Any, arguments: argparse.Namespace) -> int:
    ids = await _selected(letters, arguments)
    if ids is None:
        return 2
    result = await letters.replay(ids)
    for letter in result.replayed:
        print(f"replayed {letter.id}: {letter.message_id} to {letter.topic}")
    if result.missing:
        missing = ", ".join(map(str, result.missing))
        print(f"pybondi dead-letters: no dead letter {missing}", file=sys.stderr)
    for id, reason in result.failed.items():
        print(f"pybondi dead-letters: cannot replay {id}: {reason}", file=sys.stderr)
    return 1 if result.missing or result.failed else 0


async def _discard(letters: Any, arguments: argparse.Namespace) -> int:
    ids = await _selected(letters, arguments)
    if ids is None:
        return 2
    discarded = await letters.discard(ids)
    print(f"discarded {discarded} dead letter(s)")
    return 0 if discarded == len(ids) else 1


_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "list": _list,
    "show": _show,
    "replay": _replay,
    "discard": _discard,
}


def _id(text: str) -> int:
    value = positive(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"no dead letter has an id that large: {value}")
    return value
