"""Names a package exports without importing them until first used.

    __getattr__, __dir__ = exports(__name__, globals(), {
        "SQLStore": ("pybondi.persistence.sql", "sqlalchemy"),  # needs an extra
        "Registry": ("pybondi.persistence.serialization", None),
    })

So `import pybondi` (or `pybondi.persistence`) loads no database driver or broker client,
and a name whose extra is missing raises the `MissingDependency` its module raises. Type
checkers see the names through the package's `if TYPE_CHECKING:` imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from typing import Any

__all__ = ["exports"]

Lazy = Mapping[str, tuple[str, str | None]]
"""name -> (the module that defines it, the package its extra installs, if it needs one)."""


def exports(
    package: str, namespace: dict[str, Any], lazy: Lazy
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of a package whose `lazy` names load on first use."""

    def __getattr__(name: str) -> Any:
        if name not in lazy:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(lazy[name][0]), name)
        namespace[name] = value  # later lookups find it without __getattr__
        return value

    def __dir__() -> list[str]:
        # `help()` and `inspect.getmembers` get every name `dir` lists: leaving out those
        # whose extra is missing keeps both working on an installation without it.
        present = {name for name, (_, needs) in lazy.items() if needs is None or find_spec(needs)}
        return sorted(set(namespace) | present)

    return __getattr__, __dir__
