"""`make demo` runs examples/bank.py: its trace must tell what happened, truthfully."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    find_spec("sqlalchemy") is None,
    reason="the bank example keeps its accounts in SQLite: pip install 'pybondi[sqlite]'",
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "bank.py"


def run_example(database: Path) -> list[str]:
    """Run the demo on a database file; return its trace, split into sessions."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(database)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stderr == ""
    return done.stdout.split("\n== ")


def test_demo_commits_publishes_after_commit_and_rolls_back(tmp_path: Path) -> None:
    start, *sessions = run_example(tmp_path / "bank.db")
    assert start.endswith("holds no accounts yet\n")
    assert len(sessions) == 4
    for session in (sessions[0], sessions[1], sessions[3]):
        lines = session.splitlines()
        commits = [i for i, line in enumerate(lines) if line.startswith("[commit]")]
        publishes = [i for i, line in enumerate(lines) if line.startswith("[publish]")]
        assert commits and publishes
        assert max(commits) < min(publishes)  # messages leave only after the commit
    rolled_back = sessions[2]
    assert "[publish]" not in rolled_back
    assert "[commit]" not in rolled_back
    assert "[rollback] bob: unsaved balance 55 discarded" in rolled_back
    assert "Final balances in the database: {'alice': 77, 'bob': 50}; 6 events" in sessions[3]


def test_the_second_run_starts_from_what_the_first_left(tmp_path: Path) -> None:
    run_example(tmp_path / "bank.db")
    start, *sessions = run_example(tmp_path / "bank.db")
    assert start.endswith("holds {'alice': 77, 'bob': 50}\n")
    assert "alice is already open (a previous run opened it)" in sessions[0]
    assert "[rollback] bob: unsaved balance 105 discarded" in sessions[2]
    assert "{'alice': 161, 'bob': 100}; 10 events in its log" in sessions[3]
