"""The package's layout shows its architecture: no import cycles, short modules, clear names.

Read from the source with `ast`, without importing anything:

- The import graph of `src/pybondi` has no cycle. An edge is an import that runs when the
  module is imported: at module level, in a class body or under `if`/`try`/`with`, but
  not inside a function nor under `if TYPE_CHECKING:` (neither runs at import).
  `from pybondi.x import y` is an edge to the module `pybondi.x.y` when there is one,
  else to `pybondi.x`; relative imports are resolved first. Only explicit imports count:
  that Python imports a module's parent packages before it is no edge, since a package
  that imports its submodules while a submodule is being imported is what every
  package does, and breaks nothing unless the submodule asks its parent for a name,
  which is an explicit import and counts. (The `__init__` modules of `pybondi`,
  `persistence` and `messaging` export their names lazily, through `pybondi._lazy`, so
  that their submodules can import one another's.)
- No module is over `LONGEST` lines, but for the exceptions in `LONG_MODULES`, each
  with its reason.
- No name of one letter is bound at module or function level: assignments, loop and
  `with` targets, `except ... as`, imports, parameters, functions and classes. Type
  variables (`T = TypeVar("T")`), the throwaway `_`, and the variables of comprehensions
  that fit on one line are fine.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import pybondi

SOURCE = Path(pybondi.__file__).parent

LONGEST = 500

# module -> why it may be longer than LONGEST lines.
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` tests `TYPE_CHECKING` (or `typing.TYPE_CHECKING`)."""
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def imports_run(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports among `statements` that run when they do, nested blocks included."""
    for statement in statements:
        if isinstance(statement, ast.Import | ast.ImportFrom):
            yield statement
        elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            continue  # runs when called, not at import
        elif isinstance(statement, ast.If) and is_type_checking(statement.test):
            yield from imports_run(statement.orelse)
        elif isinstance(statement, ast.If) and (
            isinstance(statement.test, ast.UnaryOp)
            and isinstance(statement.test.op, ast.Not)
            and is_type_checking(statement.test.operand)
        ):
            yield from imports_run(statement.body)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for block in getattr(statement, field, []):
                    inner = isinstance(block, ast.ExceptHandler | ast.match_case)
                    yield from imports_run(block.body if inner else [block])


def imported_modules(name: str, path: Path) -> set[str]:
    """The modules of pybondi that importing module `name` imports explicitly."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for statement in imports_run(tree.body):
        if isinstance(statement, ast.Import):
            found.update(alias.name for alias in statement.names)
            continue
        base = statement.module or ""
        if statement.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - statement.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in statement.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as [a, b, ..., a], for each strongly connected group of modules."""
    # Tarjan's algorithm, iterative, then a path around each group found.
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = lowest[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowest[parent] = min(lowest[parent], lowest[node])
                if lowest[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif successor not in index:
                index[successor] = lowest[successor] = len(index)
                stack.append(successor)
                on_stack.add(successor)
                work.append((successor, iter(sorted(graph[successor]))))
            elif successor in on_stack:
                lowest[node] = min(lowest[node], index[successor])
    return [cycle_in(graph, group) for group in groups]


def cycle_in(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A path from the group's first module back to it, through the group."""
    members, start = set(group), group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way around
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    return [*paths[node], start]
                if successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    cycles = find_cycles(graph)
    assert not cycles, "Import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_cycles_are_found_and_reported_as_the_modules_in_them() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_relative_type_checking_and_function_imports(tmp_path: Path) -> None:
    source = """
from typing import TYPE_CHECKING
from . import records
from .sql import store
from pybondi.persistence import memory
import pybondi.messaging.envelope
if TYPE_CHECKING:
    from pybondi.session import Session
else:
    from pybondi import depends
try:
    from pybondi.tracing import Tracer
except ImportError:
    from pybondi.events import Added
def later():
    from pybondi.messagebus import Messagebus
"""
    path = tmp_path / "repositories.py"
    path.write_text(source)
    assert imported_modules("pybondi.persistence.repositories", path) == {
        "pybondi.persistence.records",
        "pybondi.persistence.sql.store",
        "pybondi.persistence.memory",
        "pybondi.messaging.envelope",
        "pybondi.depends",
        "pybondi.tracing",
        "pybondi.events",
    }


def lines(name: str) -> int:
    return len(MODULES[name].read_text().splitlines())


def test_no_module_is_longer_than_about_500_lines() -> None:
    long = {name: lines(name) for name in MODULES if lines(name) > LONGEST}
    unexplained = {name: count for name, count in long.items() if name not in LONG_MODULES}
    assert not unexplained, f"Over {LONGEST} lines: {unexplained}; split them by concept."
    # An exception that no longer applies goes, so that the list stays true.
    assert not LONG_MODULES.keys() - long.keys(), "No longer too long; remove from LONG_MODULES"


def is_type_variable(value: ast.expr | None) -> bool:
    """Whether an assigned value makes a type variable: `TypeVar("T", ...)` and the like."""
    if not isinstance(value, ast.Call):
        return False
    function = value.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    return name in ("TypeVar", "ParamSpec", "TypeVarTuple")


def short_names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, name) of each one-letter name bound in the tree, but for those allowed."""
    for node in ast.walk(tree):
        names: list[ast.AST] = []
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            if is_type_variable(node.value):
                continue
            names = list(node.targets) if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.NamedExpr | ast.For | ast.AsyncFor):
            names = [node.target]
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            names = [node.optional_vars]
        elif isinstance(node, ast.comprehension):
            continue  # checked with their comprehension, below
        elif isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            if node.lineno != node.end_lineno:
                names = [generator.target for generator in node.generators]
        elif isinstance(node, ast.ExceptHandler | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name and len(node.name) == 1 and node.name != "_":
                yield node.lineno, node.name
            if isinstance(node, ast.ExceptHandler):
                continue
        elif isinstance(node, ast.ClassDef):
            names = []
            if len(node.name) == 1:
                yield node.lineno, node.name
        elif isinstance(node, ast.alias):
            bound = node.asname or node.name.partition(".")[0]
            if len(bound) == 1 and bound != "_":
                yield node.lineno, bound
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            arguments = node.args
            for argument in (
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                *filter(None, (arguments.vararg, arguments.kwarg)),
            ):
                if len(argument.arg) == 1 and argument.arg != "_":
                    yield argument.lineno, argument.arg
        for target in names:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and len(name.id) == 1 and name.id != "_":
                    yield name.lineno, name.id


@pytest.mark.parametrize("name", sorted(MODULES))
def test_names_are_more_than_one_letter(name: str) -> None:
    path = MODULES[name]
    found = sorted(set(short_names(ast.parse(path.read_text(), str(path)))))
    assert not found, f"{path}: one-letter names, say what they are: {found}"


def test_one_letter_names_are_found_where_they_are_bound() -> None:
    source = """
T = TypeVar("T")
x = 1
for i in range(3):
    pass
def f(a, *, b=1) -> None:
    with open("f") as g:
        pass
    squares = [n * n for n in range(9)]
    pairs = [
        (k, v)
        for k, v in {}.items()
    ]
    _ = (w := 2)
callback = lambda y: y
from os import path as p
"""
    found = {name for _, name in short_names(ast.parse(source))}
    assert found == {"x", "i", "f", "a", "b", "g", "k", "v", "w", "y", "p"}
