"""Dependency injection "just like FastAPI", planned once per handler.

Handlers take the message as their first argument and everything else through `Depends`:

    def handle(event: Deposited, db: Database = Depends(get_db)) -> None: ...

`Depends` is fast-depends' own marker, so one imported from `fast_depends` works as well.
pybondi does not solve dependencies per call the way `fast_depends.inject` does (that costs
many times a handler's own run time). When a route is first used, `compile_sync` or
`compile_async` turns the handler and the overrides in force into a flat list of steps in
dependency order, and the dispatch runs that list. A handler without dependencies runs
as itself, with nothing in between. Changing `dependency_overrides` throws the compiled
plans away, so an override set after registration (as in the README) applies to the
next dispatch.

Supported: sub-dependencies, generator dependencies (code after `yield` runs once the
handler returned or raised), async functions and async generators (on the async path),
and per-dispatch caching: a dependency needed twice in one dispatch is called once,
unless marked `Depends(f, use_cache=False)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, TypeVar, get_args, get_origin

from fast_depends import Depends
from fast_depends.dependencies import Dependant

from pybondi.exceptions import AsyncRequired, InvalidHandler, callable_name

__all__ = [
    "DependencyOverrides",
    "Depends",
    "Handler",
    "Overridable",
    "async_twin",
    "compile_async",
    "compile_sync",
]

AnyCallable = Callable[..., Any]
F = TypeVar("F", bound=AnyCallable)


class Kind(Enum):
    """How a handler or dependency must be called."""

    FUNCTION = "function"
    COROUTINE = "coroutine"
    GENERATOR = "generator"
    ASYNC_GENERATOR = "async generator"

    @property
    def is_async(self) -> bool:
        return self in (Kind.COROUTINE, Kind.ASYNC_GENERATOR)


def kind_of(call: AnyCallable) -> Kind:
    """Tell how `call` runs; a callable object is judged by its `__call__`."""
    plain = inspect.isroutine(call) or inspect.isclass(call)
    targets = (call,) if plain else (call, type(call).__call__)
    # A sync wrapper made with functools.wraps around an `async def` returns a coroutine.
    targets += tuple(inspect.unwrap(target) for target in targets if hasattr(target, "__wrapped__"))
    for kind, test in _KIND_TESTS:
        if any(test(target) for target in targets):
            return kind
    return Kind.FUNCTION


_KIND_TESTS = (
    (Kind.ASYNC_GENERATOR, inspect.isasyncgenfunction),
    (Kind.COROUTINE, inspect.iscoroutinefunction),
    (Kind.GENERATOR, inspect.isgeneratorfunction),
)


@dataclass(frozen=True, slots=True)
class Callee:
    """A handler or dependency, with the parameters pybondi fills through `Depends`."""

    call: AnyCallable
    kind: Kind
    dependencies: tuple[tuple[str, Dependant], ...]
    # The first dependency is the parameter right after the message and can be passed
    # by position, which spares a keyword dictionary per call.
    positional: bool = False


class Handler:
    """A registered handler: the user's function and what it needs, inspected once.

    The first parameter receives the message; the others must be `Depends(...)` or have a
    default. Anything else is an `InvalidHandler` error at registration, not at dispatch.
    """

    __slots__ = ("callee", "name")

    def __init__(self, call: AnyCallable) -> None:
        if not callable(call):
            raise InvalidHandler(f"A handler must be callable, got {type(call).__name__}.")
        self.callee = inspect_callee(call, takes_message=True)
        self.name = callable_name(call)
        if self.callee.kind in (Kind.GENERATOR, Kind.ASYNC_GENERATOR):
            raise InvalidHandler(
                f"Handler {self.name} is a {self.callee.kind.value} function: its body would "
                f"never run. Handlers return; only dependencies may yield."
            )

    @property
    def call(self) -> AnyCallable:
        """The user's function."""
        return self.callee.call

    def __repr__(self) -> str:
        return f"Handler({self.name})"


def signature_of(call: AnyCallable) -> inspect.Signature:
    """The signature with string annotations evaluated where they can be."""
    try:
        return inspect.signature(call, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        pass
    except ValueError as error:
        raise InvalidHandler(f"Cannot inspect {callable_name(call)}: {error}") from error
    # A name in the annotations cannot be resolved (yet). Plain `= Depends(...)` defaults
    # still work; a `Depends` inside an unresolved `Annotated[...]` would be silently
    # missed, so that is an error.
    signature = inspect.signature(call)
    for parameter in signature.parameters.values():
        annotation = parameter.annotation
        if isinstance(annotation, str) and ("Depends(" in annotation or "Security(" in annotation):
            raise InvalidHandler(
                f"Cannot evaluate the annotation of {parameter.name!r} in "
                f"{callable_name(call)}: {parameter.annotation!r}. Define the names it uses "
                f"at module level, or write the dependency as a default: = Depends(...)."
            )
    return signature


def marker_of(parameter: inspect.Parameter) -> Dependant | None:
    """The `Depends(...)` marker of a parameter, as a default or inside `Annotated`."""
    if isinstance(parameter.default, Dependant):
        return parameter.default
    if get_origin(parameter.annotation) is Annotated:
        for extra in get_args(parameter.annotation)[1:]:
            if isinstance(extra, Dependant):
                return extra
    return None


def foreign_marker(parameter: inspect.Parameter) -> str | None:
    """The name of FastAPI's marker on a parameter (`Depends`, `Security`), if it has one.

    FastAPI's `Depends` looks like pybondi's but is not fast-depends' marker: as a default
    it would reach the handler as the argument itself. Told by its module, so that
    FastAPI need not be installed.
    """
    extras = (
        get_args(parameter.annotation)[1:] if get_origin(parameter.annotation) is Annotated else ()
    )
    for value in (parameter.default, *extras):
        kind = type(value)
        if kind.__module__.startswith("fastapi.") and kind.__name__ in ("Depends", "Security"):
            return kind.__name__
    return None


def inspect_callee(call: AnyCallable, *, takes_message: bool) -> Callee:
    """Read which parameters of `call` pybondi fills, and check that it can call it."""
    parameters = list(signature_of(call).parameters.values())
    role = "handler" if takes_message else "dependency"
    if takes_message:
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            raise InvalidHandler(
                f"Handler {callable_name(call)} must take the message as its first "
                f"positional parameter, as in `def handler(event: MyEvent): ...`."
            )
        parameters = parameters[1:]
    dependencies: list[tuple[str, Dependant]] = []
    for parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if foreign := foreign_marker(parameter):
            raise InvalidHandler(
                f"Parameter {parameter.name!r} of {role} {callable_name(call)} has FastAPI's "
                f"{foreign}(...), which pybondi does not read: the handler would get the marker "
                f"itself as the value. Use pybondi's: `from pybondi import Depends`."
            )
        marker = marker_of(parameter)
        if marker is not None:
            if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise InvalidHandler(
                    f"Parameter {parameter.name!r} of {role} {callable_name(call)} is "
                    f"positional-only; a Depends(...) parameter must accept a keyword."
                )
            dependencies.append((parameter.name, marker))
        elif parameter.default is inspect.Parameter.empty:
            raise InvalidHandler(
                f"Parameter {parameter.name!r} of {role} {callable_name(call)} has neither a "
                f"default nor Depends(...). pybondi passes the message as the first argument "
                f"and fills the others only through Depends(...)."
            )
    positional = bool(
        takes_message
        and parameters
        and parameters[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and marker_of(parameters[0]) is not None
    )
    return Callee(call, kind_of(call), tuple(dependencies), positional)


class DependencyOverrides(MutableMapping[AnyCallable, AnyCallable]):
    """`original -> replacement` for dependencies, as FastAPI's `app.dependency_overrides`.

    Each change calls `on_change`, which lets the owner (a messagebus or publisher) drop
    the plans it compiled with the old overrides.
    """

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._overrides: dict[AnyCallable, AnyCallable] = {}
        self._on_change = on_change

    def __getitem__(self, original: AnyCallable) -> AnyCallable:
        return self._overrides[original]

    def __setitem__(self, original: AnyCallable, replacement: AnyCallable) -> None:
        _check_replacement(replacement)
        self._overrides[original] = replacement
        self._on_change()

    def __delitem__(self, original: AnyCallable) -> None:
        del self._overrides[original]
        self._on_change()

    def __iter__(self) -> Iterator[AnyCallable]:
        return iter(self._overrides)

    def __len__(self) -> int:
        return len(self._overrides)

    def replace(self, overrides: Mapping[AnyCallable, AnyCallable]) -> None:
        """Replace every entry with those of `overrides` (copied), in one change."""
        for replacement in overrides.values():
            _check_replacement(replacement)
        self._overrides = dict(overrides)
        self._on_change()

    def __repr__(self) -> str:
        return f"DependencyOverrides({self._overrides!r})"


class Overridable:
    """Gives a messagebus or publisher its `dependency_overrides` attribute.

    Subclasses create `self._overrides = DependencyOverrides(self._forget_routes)`, so
    that every change drops the plans compiled with the old overrides.
    """

    _overrides: DependencyOverrides

    @property
    def dependency_overrides(self) -> DependencyOverrides:
        """`original -> replacement` for dependencies, as FastAPI's `app.dependency_overrides`.

        Set entries at any time, before or after registration. Assigning a whole mapping
        replaces the entries with a copy of it: change it later through this attribute.
        """
        return self._overrides

    @dependency_overrides.setter
    def dependency_overrides(self, overrides: Mapping[AnyCallable, AnyCallable]) -> None:
        self._overrides.replace(overrides)


def _check_replacement(replacement: object) -> None:
    if not callable(replacement):
        raise TypeError(
            f"A dependency override must be callable, got {type(replacement).__name__}; "
            f"to give a fixed value, use `lambda: value`."
        )


@dataclass(frozen=True, slots=True)
class Step:
    """Call `call` with earlier steps' values as keywords: `{name: values[index]}`."""

    call: AnyCallable
    kind: Kind
    arguments: tuple[tuple[str, int], ...]


def async_twin(twin: AnyCallable) -> Callable[[F], F]:
    """Mark a sync dependency with the `async def` one the async path uses instead.

    For a dependency that needs I/O on async stores only (`pybondi.current_connection`):
    one name in `Depends(...)`, whatever the session. An override replaces both.
    """

    def mark(function: F) -> F:
        function.__pybondi_async_twin__ = twin  # type: ignore[attr-defined]
        return function

    return mark


class Planner:
    """Flattens a handler's dependency graph into steps, applying overrides and caching.

    On the async path (`asynchronous`), a dependency marked with `async_twin` is planned
    as its twin.
    """

    def __init__(
        self, overrides: Mapping[AnyCallable, AnyCallable], asynchronous: bool = False
    ) -> None:
        self.overrides = overrides
        self.asynchronous = asynchronous
        self.steps: list[Step] = []
        self.cached: dict[AnyCallable, int] = {}
        self.resolving: list[AnyCallable] = []

    def arguments(self, callee: Callee) -> tuple[tuple[str, int], ...]:
        return tuple((name, self.step_for(marker)) for name, marker in callee.dependencies)

    def step_for(self, marker: Dependant) -> int:
        original = marker.dependency
        if marker.use_cache and original in self.cached:
            return self.cached[original]
        if original in self.resolving:
            chain = " -> ".join(map(callable_name, [*self.resolving, original]))
            raise InvalidHandler(f"Dependency cycle: {chain}.")
        call = self.overrides.get(original, original)
        if self.asynchronous:
            call = getattr(call, "__pybondi_async_twin__", call)
        self.resolving.append(original)
        callee = inspect_callee(call, takes_message=False)
        arguments = self.arguments(callee)
        self.resolving.pop()
        if callee.kind is Kind.GENERATOR:
            call = contextmanager(call)
        elif callee.kind is Kind.ASYNC_GENERATOR:
            call = asynccontextmanager(call)
        self.steps.append(Step(call, callee.kind, arguments))
        index = len(self.steps) - 1
        if marker.use_cache:
            self.cached[original] = index
        return index


def plan(
    handler: Handler, overrides: Mapping[AnyCallable, AnyCallable], asynchronous: bool = False
) -> tuple[tuple[Step, ...], tuple[tuple[str, int], ...]]:
    """The steps that compute a handler's dependencies, and the keywords it receives."""
    planner = Planner(overrides, asynchronous)
    arguments = planner.arguments(handler.callee)
    return tuple(planner.steps), arguments


def compile_sync(
    handler: Handler, overrides: Mapping[AnyCallable, AnyCallable], *, what: str, instead: str
) -> Callable[[Any], Any]:
    """A plain function `invoke(message)` that runs the handler with its dependencies.

    Raises `AsyncRequired` (naming `what` and suggesting `instead`) if the handler or any
    dependency it would use is async.
    """
    steps, arguments = plan(handler, overrides)
    culprits: list[Callee | Step] = [handler.callee, *steps]
    for culprit in culprits:
        if culprit.kind.is_async:
            raise AsyncRequired(what, getattr(culprit.call, "__wrapped__", culprit.call), instead)
    call = handler.call
    if not steps:
        return call
    if len(steps) == 1 and len(arguments) == 1 and steps[0].kind is Kind.FUNCTION:
        if handler.callee.positional:
            return _invoke_with_next(call, steps[0].call)
        return _invoke_with_one(call, arguments[0][0], steps[0].call)
    if not any(step.kind is Kind.GENERATOR for step in steps):
        return _invoke_with_steps(call, steps, arguments)
    return _invoke_with_teardown(call, steps, arguments)


# The common case, one plain dependency (often overridden), gets closures of its own that
# cost little more than calling both functions by hand.


def _invoke_with_next(call: AnyCallable, dependency: AnyCallable) -> AnyCallable:
    def invoke(message: Any) -> Any:
        return call(message, dependency())

    return invoke


def _invoke_with_one(call: AnyCallable, name: str, dependency: AnyCallable) -> AnyCallable:
    def invoke(message: Any) -> Any:
        return call(message, **{name: dependency()})

    return invoke


def _run_steps(steps: tuple[Step, ...], stack: ExitStack | None) -> list[Any]:
    values: list[Any] = []
    for step in steps:
        kwargs = {name: values[index] for name, index in step.arguments}
        if step.kind is Kind.GENERATOR:
            assert stack is not None
            values.append(stack.enter_context(step.call(**kwargs)))
        else:
            values.append(step.call(**kwargs))
    return values


def _invoke_with_steps(
    call: AnyCallable, steps: tuple[Step, ...], arguments: tuple[tuple[str, int], ...]
) -> AnyCallable:
    def invoke(message: Any) -> Any:
        values = _run_steps(steps, None)
        return call(message, **{name: values[index] for name, index in arguments})

    return invoke


def _invoke_with_teardown(
    call: AnyCallable, steps: tuple[Step, ...], arguments: tuple[tuple[str, int], ...]
) -> AnyCallable:
    def invoke(message: Any) -> Any:
        with ExitStack() as stack:
            values = _run_steps(steps, stack)
            return call(message, **{name: values[index] for name, index in arguments})

    return invoke


def compile_async(
    handler: Handler, overrides: Mapping[AnyCallable, AnyCallable]
) -> tuple[Callable[[Any], Any], bool]:
    """`(invoke, awaited)`: `invoke(message)` returns a coroutine to await when `awaited`.

    A handler whose whole plan is sync keeps the sync invoker, so the async path pays for
    a coroutine only where the user wrote one.
    """
    steps, arguments = plan(handler, overrides, asynchronous=True)
    if not handler.callee.kind.is_async and not any(step.kind.is_async for step in steps):
        return compile_sync(handler, overrides, what="", instead=""), False
    if not steps:
        return handler.call, True
    return _ainvoke(handler, steps, arguments), True


def _ainvoke(
    handler: Handler, steps: tuple[Step, ...], arguments: tuple[tuple[str, int], ...]
) -> AnyCallable:
    call, awaited = handler.call, handler.callee.kind.is_async

    async def invoke(message: Any) -> Any:
        async with AsyncExitStack() as stack:
            values: list[Any] = []
            for step in steps:
                kwargs = {name: values[index] for name, index in step.arguments}
                if step.kind is Kind.FUNCTION:
                    values.append(step.call(**kwargs))
                elif step.kind is Kind.COROUTINE:
                    values.append(await step.call(**kwargs))
                elif step.kind is Kind.GENERATOR:
                    values.append(stack.enter_context(step.call(**kwargs)))
                else:
                    values.append(await stack.enter_async_context(step.call(**kwargs)))
            result = call(message, **{name: values[index] for name, index in arguments})
            return await result if awaited else result

    return invoke
