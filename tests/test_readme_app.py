"""The README's "Testing your application": its bank and its tests, run as tests here.

The section's Python blocks run, in order, as this module's code: pytest collects the
tests they define and gives them the plugin's fixtures, as in a user's test_bank.py.
A failure points at the README's line. They need no server, and no extra.
"""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
SECTION = "### Testing your application"


def section_blocks(text: str) -> list[tuple[int, str]]:
    """The section's Python blocks, each with the README line its code starts on."""
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        raise LookupError(f"README.md has no section {SECTION!r}, whose tests run here.")
    start += len(SECTION) + 2
    following = re.compile(r"^#{2,3} ", flags=re.MULTILINE).search(text, start)
    end = following.start() if following else len(text)
    code = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
    return [
        (text.count("\n", 0, block.start(1)), block.group(1))
        for block in code.finditer(text, start, end)
    ]


for _line, _code in section_blocks(README.read_text()):
    # Blank lines first, so that tracebacks show the README's own line numbers.
    exec(compile("\n" * _line + _code, str(README), "exec", dont_inherit=True), globals())
