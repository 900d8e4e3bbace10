"""The one sandboxed Jinja environment: every template is parsed, checked and rendered here.

Spec templates (parsed by the compiler, rendered by the runtime) and the
trainer's meta-prompts share `ENV` and its cache of compiled templates. A
template is user input, so on top of Jinja's sandbox (no attribute starting
with `_`, no unsafe callables) a render is bounded:

- size: no value may hold more than `MAX_CHARS` characters (a list counts the
  characters of its items), and a render may write no more than that. `*`,
  `+`, `%`, `**`, `~`, list and dict literals, calls and filters are checked;
  where an operation's size follows from its operands (`'a' * 100000000`,
  `replace`, `join`, `indent`, integer widths) it is refused before it runs;
- time: every loop iteration, call, filter and write checks a deadline
  `MAX_RENDER_SECONDS` after the render started (nested `range(100000)` loops
  would otherwise run for hours);
- any other failure (recursion, a division by zero, a type error) is a
  `jinja2.TemplateError`, which callers turn into an error naming the node.

The bounds are added by rewriting the parsed template (`BoundedSandbox._parse`):
loop iterables, written values, `~` and literals go through filters that check
them. At compile time, `unsafe_attribute(ast)` finds attribute access the sandbox
would refuse at run time (`{{ ''.__class__ }}`), and `trial` renders a template
with placeholder values to find one that exceeds a bound whatever the data.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    SandboxedEnvironment,
    SecurityError,
)
from jinja2.visitor import NodeTransformer

MAX_CHARS = 1 << 20  # ~250k tokens: more than the context of the models dlngraph drives
MAX_RENDER_SECONDS = 1.0  # a real template renders in well under a millisecond
_DIGITS_PER_BIT = 0.302  # log10(2): the printed length of a power, from its bits
_MAX_DEPTH = 16  # of nested lists and dicts that `_size` looks into

# Attribute names the sandbox refuses whatever the object: its `_` rule, the
# frame/code attributes of generators and coroutines, and `mro` of types.
_UNSAFE = UNSAFE_GENERATOR_ATTRIBUTES | UNSAFE_COROUTINE_ATTRIBUTES | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES | {"mro"}
# a width of a million or more (or one given as an argument) in a `%` or `str.format` format
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(?:\*|\d{7,})|\{[^{}]*:[^{}]*(?:\d{7,}|\{)")


class LimitExceeded(SecurityError):
    """A render went past one of the bounds."""


class UnsafeAttribute(jinja2.TemplateSyntaxError):
    """A template reads an attribute the sandbox refuses; found when it is parsed."""


@dataclass
class _Budget:
    deadline: float
    written: int = 0


_BUDGET: ContextVar[_Budget | None] = ContextVar("dlngraph_render_budget", default=None)


def _tick() -> _Budget | None:
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise LimitExceeded(f"the template ran for more than {MAX_RENDER_SECONDS:g} s (a loop too large?)")
    return budget


def _check(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise LimitExceeded(f"{what} would be {size:,} characters long, more than the limit of {MAX_CHARS:,}")


def _size(value: Any, depth: int = 0) -> int:
    """Characters `value` holds (items of lists and dicts included); stops counting past the limit."""
    if isinstance(value, str | bytes):
        return len(value)
    if depth > _MAX_DEPTH or not isinstance(value, list | tuple | set | frozenset | dict):
        return 1
    total = 0
    items = value.items() if isinstance(value, dict) else ((item, "") for item in value)
    for key, item in items:
        total += 1 + _size(key, depth + 1) + _size(item, depth + 1)
        if total > MAX_CHARS:
            break
    return total


def _checked(value: Any, what: str) -> Any:
    _check(_size(value), what)
    return value


def _growth(name: str, target: Any, args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """The length a growing string operation would produce, computed without running it.

    `target` is the string (or list) operated on: `self` of a method, the value of a filter.
    """
    if name == "replace" and isinstance(target, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        return len(target) + (target.count(old) if old else len(target) + 1) * (len(new) - len(old))
    if name == "join":
        if isinstance(target, str) and args and isinstance(args[0], list | tuple):  # str.join(items)
            items, separator = args[0], target
        elif isinstance(target, list | tuple):  # items | join(separator)
            items, separator = target, str(args[0]) if args else ""
        else:
            return None
        return _size(list(items)) + len(separator) * max(0, len(items) - 1)
    if name in ("expandtabs", "indent") and isinstance(target, str):
        width = args[0] if args else kwargs.get(*(("tabsize", 8) if name == "expandtabs" else ("width", 4)))
        width = len(width) if isinstance(width, str) else width
        lines = target.count("\t" if name == "expandtabs" else "\n") + 1
        return len(target) + lines * width if isinstance(width, int) else None
    return None


def _bounded(name: str, run: Any, target: Any, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """Run a call or filter `name` unless its arguments size the result past the limit."""
    _tick()
    what = f"the result of `{name}`"
    if name == "format":  # its arguments are values to format; a width is in the format string
        if isinstance(target, str) and _FORMAT_WIDTH.search(target):
            raise LimitExceeded("a `format` width of a million or more, or one given as an argument, is not allowed")
    else:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool):
                _check(abs(arg), what)  # a width or count
    grown = _growth(name, target, args, kwargs)
    if grown is not None:
        _check(grown, what)
    return _checked(run(), what)


class _Bounds(NodeTransformer):
    """Routes what can grow or loop through the checking filters below.

    Constant text is counted only where it can repeat (in a loop, macro or
    call block); elsewhere the template's own length bounds it.
    """

    def __init__(self) -> None:
        self.repeating = 0

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self._inside(node)
        node.iter = _filter(node.iter, "dlngraph_loop")
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return self._inside(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return self._inside(node)

    def _inside(self, node: nodes.Node) -> nodes.Node:
        self.repeating += 1
        try:
            return self.generic_visit(node)
        finally:
            self.repeating -= 1

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [
            child if isinstance(child, nodes.TemplateData) and not self.repeating else _filter(child, "dlngraph_write")
            for child in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), "dlngraph_concat")

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return _filter(self.generic_visit(node), "dlngraph_value")

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return _filter(self.generic_visit(node), "dlngraph_value")

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        node = self.generic_visit(node)
        return _filter(node, "dlngraph_value") if node.ctx == "load" else node


def _filter(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


# The checking filters take the context (`pass_context`), so Jinja never
# evaluates them at compile time on constant arguments.
@pass_context
def _loop(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        _tick()
        yield item


@pass_context
def _write(context: Context, value: Any) -> Any:
    budget = _tick()
    if budget is not None:
        budget.written += len(value) if isinstance(value, str) else _size(value)
        _check(budget.written, "the text written (by macros and blocks too)")
    return value


@pass_context
def _concat(context: Context, parts: list[Any]) -> str:
    texts = [str(_checked(p, "a `~` operand")) for p in parts]
    _check(sum(map(len, texts)), "a `~` concatenation")
    return "".join(texts)


@pass_context
def _value(context: Context, value: Any) -> Any:
    _tick()
    return _checked(value, "a literal")


def _bounded_filter(name: str, function: Any) -> Any:
    """Jinja's filter `function` behind the deadline, argument, growth and result checks."""
    passes = getattr(function, "jinja_pass_arg", None)  # it then takes a context or environment first
    skip = 1 if passes is not None else 0

    def bounded(*args: Any, **kwargs: Any) -> Any:
        target = args[skip] if len(args) > skip else None
        return _bounded(name, lambda: function(*args, **kwargs), target, args[skip + 1 :], kwargs)

    if passes is not None:
        bounded.jinja_pass_arg = passes  # type: ignore[attr-defined]
    return bounded


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with bounded sizes, writes and time (see the module docstring)."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters |= {
            "dlngraph_loop": _loop,
            "dlngraph_write": _write,
            "dlngraph_concat": _concat,
            "dlngraph_value": _value,
        }

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                _check(int((abs(left).bit_length() + abs(right).bit_length()) * _DIGITS_PER_BIT), "a product")
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    _check(_size(seq) * max(0, times), "a repeated value")
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _check(_size(left) + _size(right), "a joined value")
        elif operator == "%" and isinstance(left, str):
            if _FORMAT_WIDTH.search(left):
                raise LimitExceeded("a `%` format width of a million or more (or `*`) is not allowed")
            _check(len(left) + _size(right), "a formatted value")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _check(int(right * max(1, abs(left).bit_length()) * _DIGITS_PER_BIT), "a power")
        return _checked(super().call_binop(context, operator, left, right), "a value")

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # (Jinja's own signature: its double underscores keep `self` and `context` free as keywords.)
        def run() -> Any:
            return SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)

        name = getattr(__obj, "__name__", "call")
        bound = getattr(__obj, "__wrapped__", __obj)  # Jinja wraps `str.format` to sandbox it
        return _bounded(name, run, getattr(bound, "__self__", None), args, kwargs)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        template = super()._parse(source, name, filename)
        return _Bounds().visit(template)


ENV = BoundedSandbox()


@lru_cache(maxsize=1024)
def compiled(text: str) -> jinja2.Template:
    """`text` compiled once in `ENV` (node templates and meta-prompts alike)."""
    return ENV.from_string(text)


def render(text: str, variables: Mapping[str, Any]) -> str:
    """`text` rendered with `variables` within the bounds; every failure is a `jinja2.TemplateError`."""
    template = compiled(text)
    token = _BUDGET.set(_Budget(deadline=time.monotonic() + MAX_RENDER_SECONDS))
    try:
        return template.render(variables)
    except jinja2.TemplateError:
        raise
    except RecursionError:
        raise LimitExceeded("the template recurses too deeply (a macro calling itself?)") from None
    except Exception as exc:  # the template's own code failed: 1/0, 'a' + 1, range(10**9)
        raise jinja2.TemplateRuntimeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)


@lru_cache(maxsize=1024)
def trial(text: str, names: frozenset[str]) -> str | None:
    """Why `text` exceeds a bound when every variable in `names` is one character, if it does.

    Such a template exceeds it whatever the data (`{{ 'a' * 100000000 }}`, nested
    `range(100000)` loops), so the compiler reports it. Other failures depend on
    the data (`{{ 1 / (input | length - 1) }}`) and are left to the runtime.
    """
    try:
        render(text, dict.fromkeys(names, "x"))
    except LimitExceeded as exc:
        return str(exc)
    except jinja2.TemplateError:
        return None
    return None


def unsafe_attribute(template: nodes.Node) -> UnsafeAttribute | None:
    """The first attribute access in `template` that the sandbox would refuse, if any.

    Children are looked at before their parent, so in `x.__class__.__mro__`
    the first one written (`__class__`) is the one reported.
    """
    for child in template.iter_child_nodes():
        found = unsafe_attribute(child)
        if found is not None:
            return found
    if isinstance(template, nodes.Getattr):
        names = [template.attr]
    elif isinstance(template, nodes.Getitem) and isinstance(template.arg, nodes.Const):
        names = [template.arg.value]
    elif isinstance(template, nodes.Filter) and template.name in _ATTRIBUTE_FILTERS:
        # `attr('__class__')`, `map(attribute='a.__class__')`: dotted paths, each part looked up
        given = [*template.args, *(k.value for k in template.kwargs)]
        paths = [a.value for a in given if isinstance(a, nodes.Const) and isinstance(a.value, str)]
        names = [part for path in paths for part in path.split(".")]
    else:
        return None
    for attr in names:
        if isinstance(attr, str) and (attr.startswith("_") or attr in _UNSAFE):
            return UnsafeAttribute(
                f"attribute `{attr}` is not allowed: templates may not reach Python internals", template.lineno
            )
    return None


# Filters that look attributes up by a name given as a string.
_ATTRIBUTE_FILTERS = frozenset(
    {"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max", "dictsort"}
)
