"""Running an untrusted Jinja template within bounds of time and size.

A chat template comes with a checkpoint (``tokenizer_config.json``): it is code somebody else wrote.
Jinja's ``ImmutableSandboxedEnvironment`` -- what transformers and vLLM render chat templates with --
keeps it from Python's internals and from changing its inputs, but not from working without end:
``{% for i in range(100000) %}`` nested twice, ``'{:>999999999}'.format(1)``, ``lipsum(10**6)`` or a
macro that calls itself run for minutes or exhaust the memory. :class:`BoundedSandbox` is that
environment with bounds, and :func:`render` runs one of its templates under :class:`RenderLimits`:

* **time**: a deadline, checked in every hook the compiled template goes through: attribute and item
  access, every call (functions, methods, filters, macros, ``loop()``), the operators ``+ * ** % ~``,
  every iteration of every ``{% for %}`` (the compiled loops iterate through a checking wrapper) and
  every chunk of output. minijinja (the Rust Jinja) bounds templates the same way with its "fuel", an
  instruction budget; a wall clock is what a caller waiting on a render cares about.
* **size**: no value a hook sees may be larger than the output may be, and the operations that can
  build a large value in one step are checked *before* they run: ``*`` (``'x' * n``, ``[x] * n``),
  ``**``, ``%`` and ``str.format`` widths, ``center``/``ljust``/``rjust``/``zfill``/``expandtabs``/
  ``indent`` widths, ``replace``, ``translate``, ``join``, ``lipsum``, ``range`` (at most
  ``max_range`` items). So the work between two deadline checks is bounded too: a deadline checked in
  hooks cannot stop one slow C-level operation, but no single operation here can be larger than the
  size bound.
* **output**: it streams out chunk by chunk and stops past the size bound.
* **a backstop**: between two hooks a template can still run one long filter of Jinja's own, a Python
  loop (``wordwrap``, ``urlize``, ``batch`` over a value of the largest size allowed took 15-80 s);
  :func:`~gpt2lab.generation.interrupt.deadline` interrupts the rendering thread's Python code just past
  the deadline wherever it is. So a render never holds its caller much past ``timeout_s``: at most one C
  call over a value within the size bound.

A template that crosses a bound raises :class:`RenderLimitExceeded` (a recursion too deep and running
out of memory are reported the same way); the caller decides whose fault that is.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import update_wrapper
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace

from .interrupt import Interrupted, deadline

_BACKSTOP_S = 0.05  # the watchdog's deadline comes this long after the hooks' (whose message says more)
MAX_INT_BITS = 1 << 16  # ~20,000 decimal digits: far past any count or id a template needs
_CLOCK_EVERY = 64  # hooks between two looks at the clock


class RenderLimitExceeded(Exception):
    """A render crossed one of its :class:`RenderLimits` (or recursed too deeply, or ran out of memory);
    the message says which."""


@dataclass(frozen=True)
class RenderLimits:
    """Bounds of one render.

    ``timeout_s``: wall-clock seconds. ``max_output_chars``: characters the output (and any value built
    on the way) may have beyond ``input_factor`` times the size of the input (the messages and
    variables): a template may lay out a large conversation, not multiply it. ``max_range``: items of
    one ``range()`` (Jinja's own sandbox allows 100,000).
    """

    timeout_s: float = 10.0
    max_output_chars: int = 1 << 20  # a GPT-2 prompt is a few thousand characters; 8x the input comes on top
    input_factor: int = 8
    max_range: int = 100_000

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        for name in ("max_output_chars", "input_factor", "max_range"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _Budget:
    """What is left of one render's limits (one per render, found through a context variable, so the
    same compiled template renders on several threads at once)."""

    __slots__ = ("deadline", "timeout_s", "max_chars", "max_range", "countdown", "written", "steps", "built")

    def __init__(self, limits: RenderLimits, input_chars: int) -> None:
        self.timeout_s = limits.timeout_s
        self.deadline = time.monotonic() + limits.timeout_s
        self.max_chars = limits.max_output_chars + limits.input_factor * input_chars
        self.max_range = limits.max_range
        self.countdown = _CLOCK_EVERY
        self.written = 0  # characters of output so far
        self.steps = 0  # hooks passed: operations of the template
        self.built = 0  # characters and items of the values operations built: the work of copying

    def tick(self) -> None:
        self.steps += 1
        self.countdown -= 1
        if self.countdown <= 0:
            self.countdown = _CLOCK_EVERY
            if time.monotonic() > self.deadline:
                raise RenderLimitExceeded(f"rendering took more than {self.timeout_s:g} s (a loop or a recursion "
                                          "that does not end?)")

    def check_size(self, value: Any, what: str) -> None:
        if not isinstance(value, str) and size_of(value, self.max_chars, self) > self.max_chars:
            raise RenderLimitExceeded(f"{what} would be larger than {self.max_chars} characters")
        if isinstance(value, str) and len(value) > self.max_chars:
            raise RenderLimitExceeded(f"{what} would be larger than {self.max_chars} characters")

    def check_count(self, count: int, what: str) -> None:
        if count > self.max_chars:
            raise RenderLimitExceeded(f"{what} would be larger than {self.max_chars} characters")


_active: ContextVar[_Budget | None] = ContextVar("gpt2lab_render_budget", default=None)


def written() -> int:
    """Characters the running render has output so far (0 outside a render)."""
    budget = _active.get()
    return 0 if budget is None else budget.written


def size_of(value: Any, limit: int, budget: _Budget | None = None) -> int:
    """About how many characters ``value`` holds (``str(value)`` has at least this many), counted until
    past ``limit``: strings their length, containers one per item plus their items, numbers their digits.

    Shared items count each time they appear (``[s] * 1000`` is a thousand times ``s``): that is what
    printing or joining them costs. The work is at most about ``limit`` steps, with ``budget``'s deadline
    checked along the way.
    """
    total, stack, steps = 0, [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, Mapping):
            total += 1 + 2 * len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        elif isinstance(v, int) and not isinstance(v, bool):
            total += 1 + v.bit_length() // 3
        else:
            total += 1
        if total > limit:
            break
        steps += 1
        if budget is not None and steps % 4096 == 0:
            budget.tick()
    return total


# -- checks of the operations that can build a large value in one step ---------------------------------
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """``fmt % args``: no width or precision larger than the budget (``'%999999999d' % 1``)."""
    for match in _PRINTF_SPEC.finditer(fmt):
        for part in match.groups():
            if part == "*":
                for arg in args if isinstance(args, tuple) else (args,):
                    if isinstance(arg, int):
                        budget.check_count(abs(arg), "a '*' width of a % format")
            elif part:
                budget.check_count(int(part) if len(part) < 20 else budget.max_chars + 1, "a % format width")


def _check_str_format(budget: _Budget, fmt: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """``fmt.format(...)``: no width or precision larger than the budget (``'{:>999999999}'.format(1)``)."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in fields:
        if not spec:
            continue
        for digits in _DIGITS.findall(spec):
            budget.check_count(int(digits) if len(digits) < 20 else budget.max_chars + 1, "a format width")
        if "{" in spec:  # a width taken from the arguments
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int):
                    budget.check_count(abs(arg), "a format width")


def _check_replace(budget: _Budget, text: str, old: Any, new: Any, count: Any = -1) -> None:
    if not (isinstance(old, str) and isinstance(new, str)):
        return
    times = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    budget.check_count(len(text) + times * len(new), "the result of replace()")


def _check_join(budget: _Budget, separator: Any, items: Any) -> None:
    if isinstance(items, (list, tuple)):
        budget.check_size(items, "the result of join()")
        budget.check_count(len(separator) * max(len(items) - 1, 0) if isinstance(separator, str) else 0,
                           "the result of join()")


def _check_width(budget: _Budget, width: Any, what: str) -> None:
    if isinstance(width, int):
        budget.check_count(width, what)
    elif isinstance(width, str):
        budget.check_count(len(width), what)


def _check_str_method(budget: _Budget, method: Any, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """The checks of a call of a bound ``str`` method that can grow its string."""
    text, name = method.__self__, method.__name__
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _check_width(budget, args[0], f"the result of {name}()")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            budget.check_count(len(text) + text.count("\t") * max(size, 0), "the result of expandtabs()")
    elif name == "replace" and len(args) >= 2:
        _check_replace(budget, text, *args[:3])
    elif name == "join" and args:
        _check_join(budget, text, args[0])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.check_count(len(text) * longest, "the result of translate()")
    elif name in ("format", "format_map"):
        mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else kwargs
        _check_str_format(budget, text, args if name == "format" else (), mapping)


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    if operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.check_count(len(left) + len(right), "the result of '+'")
    elif operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(times, int) and isinstance(seq, (str, list, tuple)) and times > 0:
                budget.check_count(times * size_of(seq, budget.max_chars // times + 1), "the result of '*'")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise RenderLimitExceeded(f"a product of integers larger than {MAX_INT_BITS} bits")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * max(abs(left).bit_length() - 1, 1) > MAX_INT_BITS:
            raise RenderLimitExceeded(f"a power of integers larger than {MAX_INT_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left, right)


# checks run before the filters that can grow their input; each takes the filter's own arguments (without
# the context or environment a Jinja filter may receive first)
def _before_center(b: _Budget, value: Any = "", width: Any = 80, *_: Any, **__: Any) -> None:
    _check_width(b, width, "the result of center")


def _before_indent(b: _Budget, s: Any = "", width: Any = 4, *_: Any, **__: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    lines = s.count("\n") + 1 if isinstance(s, str) else 1
    b.check_count(size_of(s, b.max_chars) + lines * max(per_line, 0), "the result of indent")


def _before_format(b: _Budget, value: Any = "", *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_printf(b, value, tuple(kwargs.values()) or args)


def _before_replace(b: _Budget, s: Any = "", old: Any = None, new: Any = None, count: Any = None, *_: Any,
                    **__: Any) -> None:
    if isinstance(s, str):
        _check_replace(b, s, old, new, -1 if count is None else count)


def _before_join(b: _Budget, value: Any = (), d: Any = "", *_: Any, **__: Any) -> None:
    _check_join(b, d, value)


def _before_tojson(b: _Budget, value: Any = None, *args: Any, **kwargs: Any) -> None:
    indent = kwargs.get("indent", args[1] if len(args) > 1 else None)
    per_line = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    b.check_count(size_of(value, b.max_chars) * (1 + max(per_line, 0)), "the result of tojson")


def _before_slice(b: _Budget, value: Any = (), slices: Any = 1, *_: Any, **__: Any) -> None:
    if isinstance(slices, int) and slices > b.max_range:
        raise RenderLimitExceeded(f"slice({slices}) makes more than {b.max_range} slices")


_BEFORE_FILTER: dict[str, Callable[..., None]] = {
    "center": _before_center, "indent": _before_indent, "format": _before_format, "replace": _before_replace,
    "join": _before_join, "tojson": _before_tojson, "slice": _before_slice,
}


def _bounded_filter(name: str, function: Callable) -> Callable:
    """``function`` (a filter) with a deadline check, the checks it needs before it runs, and a size check
    of what it returns. Jinja's ``pass_context``/``pass_environment`` marks are kept (copied by
    ``update_wrapper``), so the first argument is then the context or environment."""
    before = _BEFORE_FILTER.get(name)
    skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _active.get()
        if budget is None:
            return function(*args, **kwargs)
        budget.tick()
        if before is not None:
            before(budget, *args[skip:], **kwargs)
        result = function(*args, **kwargs)
        budget.check_size(result, f"the result of the {name} filter")
        if isinstance(result, (str, list, tuple)):
            budget.built += len(result)
        return result

    return update_wrapper(bounded, function)


def _bounded_sum(environment: BoundedSandbox, iterable: Iterable, attribute: Any = None, start: Any = 0) -> Any:
    """Jinja's ``sum`` filter with each addition checked: ``sum`` of lists or strings adds up to the square
    of their number in copying, which Python's ``sum`` does in one uninterruptible call."""
    if attribute is not None:
        iterable = map(jinja2.filters.make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(None, "+", total, item)  # type: ignore[arg-type]
    return total


_bounded_sum = jinja2.pass_environment(_bounded_sum)


def _bounded_range(*args: int) -> range:
    """``range()`` of at most ``max_range`` items (Jinja's sandbox raises a bare ``OverflowError``)."""
    items = range(*args)
    budget = _active.get()
    limit = budget.max_range if budget is not None else jinja2.sandbox.MAX_RANGE
    if len(items) > limit:
        raise RenderLimitExceeded(f"range({', '.join(map(str, args))}) has {len(items)} items, more than {limit}")
    return items


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's
    if not all(isinstance(v, int) for v in (n, min, max)) or n > 100 or max > 1000:
        raise RenderLimitExceeded(f"lipsum({n}, min={min}, max={max}): at most 100 paragraphs of 1,000 words")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


class TemplateDict:
    """``dict(...)`` in a template: builds a plain dict (the class itself would hand out ``dict``'s methods)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(Namespace):
    """``namespace(...)``: no underscore-prefixed names (they reach Python internals), and every value
    stored checked against the size bound (a namespace is how a value survives from one loop iteration
    to the next, so it is how a template could double a value again and again)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            TemplateNamespace._check(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check(name, value)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_', got {name!r}")
        budget = _active.get()
        if budget is not None:
            budget.tick()
            budget.check_size(value, f"namespace value {name!r}")


class _Ticking:
    """A ``{% for %}`` loop's iterable that checks the deadline at each item (and keeps its length, so
    ``loop.length`` does not have to read it all first)."""

    __slots__ = ("_items", "_budget")

    def __init__(self, items: Iterable, budget: _Budget) -> None:
        self._items, self._budget = items, budget

    def __len__(self) -> int:
        return len(self._items)  # type: ignore[arg-type] - a TypeError tells LoopContext to count itself

    def __iter__(self) -> Iterator:
        tick = self._budget.tick
        for item in self._items:
            tick()
            yield item


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every ``{% for %}`` iterating through ``environment.bounded_iter``
    and every ``~`` concatenation through ``environment.bounded_concat``: both are Python-level loops and
    joins the sandbox has no hook in."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:  # noqa: N802 - Jinja's visitor naming
        checked = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None,
                             lineno=node.lineno)
        super().visit_For(nodes.For(node.target, checked, node.body, node.else_, node.test, node.recursive,
                                    lineno=node.lineno), frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:  # noqa: N802
        self.write("environment.bounded_concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the bounds of this module (see its docstring). Templates compiled
    here check a render's :class:`RenderLimits` when rendered by :func:`render`; rendered any other way
    only the static bounds apply (``range``, ``lipsum``)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        # no files: {% include %}, {% import %} and {% extends %} find nothing (TemplateNotFound)
        super().__init__(finalize=self._finalize, loader=jinja2.DictLoader({}), **options)
        self.globals.update(range=_bounded_range, lipsum=_bounded_lipsum, dict=TemplateDict(),
                            namespace=TemplateNamespace)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["sum"] = _bounded_filter("sum", _bounded_sum)

    def add_filter(self, name: str, function: Callable) -> None:
        """Install a filter, bounded like the built-in ones."""
        self.filters[name] = _bounded_filter(name, function)

    # -- the sandbox's hooks, each a deadline check -------------------------------------------------
    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _active.get()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _active.get()
        if budget is not None:
            budget.tick()
        return super().getitem(obj, argument)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        budget = _active.get()
        if budget is None:
            return super().call(context, obj, *args, **kwargs)
        budget.tick()
        target = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
        if isinstance(getattr(target, "__self__", None), str) and isinstance(getattr(target, "__name__", None), str):
            _check_str_method(budget, target, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        budget.check_size(result, "a value returned by a call")
        if isinstance(result, (str, list, tuple)):
            budget.built += len(result)
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _active.get()
        if budget is None:
            return super().call_binop(context, operator, left, right)
        budget.tick()
        _check_binop(budget, operator, left, right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, (str, list, tuple)):
            budget.built += len(result)
        return result

    def bounded_iter(self, items: Any) -> Any:
        budget = _active.get()
        return items if budget is None else _Ticking(items, budget)

    def bounded_concat(self, parts: tuple) -> str:
        budget = _active.get()
        if budget is not None:
            budget.tick()
            size = sum(size_of(p, budget.max_chars, budget) for p in parts)
            budget.check_count(size, "the result of '~'")
            budget.built += size
        return "".join(map(str, parts))

    def _finalize(self, value: Any) -> Any:
        """Every ``{{ ... }}`` value before it is turned into text."""
        budget = _active.get()
        if budget is not None and not isinstance(value, str):
            budget.check_size(value, "a value written out")
        return value


def compile_source(environment: BoundedSandbox, source: str, limits: RenderLimits | None = None) -> jinja2.Template:
    """``source`` compiled by ``environment``. Jinja folds constant expressions while compiling
    (``'%999999999d' | format(1)`` would run then): the compilation runs under ``limits`` too, and an
    expression that crosses them is left to the render, which then fails on it. Raises Jinja's
    ``TemplateSyntaxError`` for a source that does not compile."""
    limits = limits or RenderLimits()
    token = _active.set(_Budget(limits, len(source)))
    try:
        with deadline(limits.timeout_s + _BACKSTOP_S):
            return environment.from_string(source)
    except Interrupted:
        raise RenderLimitExceeded(f"compiling it took more than {limits.timeout_s:g} s") from None
    finally:
        _active.reset(token)


def render(template: jinja2.Template, context: Mapping[str, Any], limits: RenderLimits, *,
           stats: dict[str, int] | None = None) -> str:
    """``template`` (compiled by a :class:`BoundedSandbox`) rendered with ``context`` under ``limits``.

    Raises :class:`RenderLimitExceeded` past a bound; whatever else the template raises (Jinja's
    ``TemplateError``, ``TypeError`` ...) passes through. ``stats``, when given, receives the render's
    work: ``steps`` (operations through the sandbox's hooks), ``built`` (characters and items of the
    values they built) and ``written`` (characters output) -- how a test tells linear from quadratic.
    """
    budget = _Budget(limits, size_of(list(context.values()), 1 << 62))
    token = _active.set(budget)
    chunks: list[str] = []
    try:
        with deadline(limits.timeout_s + _BACKSTOP_S):  # stops a long filter between two hooks
            for chunk in template.generate(**context):
                budget.written += len(chunk)
                if budget.written > budget.max_chars:
                    raise RenderLimitExceeded(f"the output would be longer than {budget.max_chars} characters")
                chunks.append(chunk)
                budget.tick()
    except Interrupted:
        raise RenderLimitExceeded(f"rendering took more than {limits.timeout_s:g} s (a filter over a very "
                                  "large value?)") from None
    except RecursionError:
        raise RenderLimitExceeded("it calls itself too deeply (a recursion that does not end?)") from None
    except MemoryError:
        raise RenderLimitExceeded("it ran out of memory") from None
    finally:
        _active.reset(token)
        if stats is not None:
            stats.update(steps=budget.steps, built=budget.built, written=budget.written)
    return "".join(chunks)
