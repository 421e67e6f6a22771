"""`make demo` runs examples/bank.py: its trace must tell what happened, truthfully."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "bank.py"


def run_example() -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stderr == ""
    return done.stdout


def test_demo_commits_publishes_after_commit_and_rolls_back() -> None:
    sessions = run_example().split("\n== ")
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
    assert "[rollback] bob: balance restored to 50" in rolled_back
    assert sessions[3].rstrip().endswith("Final balances in the database: {'alice': 77, 'bob': 50}")
