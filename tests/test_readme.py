"""The README's Python blocks run, in order, in one namespace: the docs cannot drift."""

from __future__ import annotations

import re
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    find_spec("sqlalchemy") is None,
    reason="the README's examples use SQLStore: pip install 'pybondi[sqlite]'",
)

README = Path(__file__).parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks(README.read_text())) >= 6


def test_readme_blocks_run_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real module, so that dataclasses and annotations resolve as in a user's file.
    module = types.ModuleType("readme")
    monkeypatch.setitem(sys.modules, "readme", module)
    for number, block in enumerate(python_blocks(README.read_text()), start=1):
        exec(compile(block, f"README.md block {number}", "exec"), module.__dict__)
