"""Renders a message template in a Jinja2 sandbox, within size and work budgets.

The sender renders with it (services/sender/compose.py, in a content process
under a hard deadline); the ingest API compiles a stored template with it
(`check`) before storing it, so a template that does not compile in this
sandbox is refused when it is written, not when a message uses it.

Templates and variables come from API clients and are treated as hostile. The
ImmutableSandboxedEnvironment refuses internals, mutation and unsafe callables;
StrictUndefined fails a missing variable; autoescape is on for html only.
Memory: the output of all parts is counted chunk by chunk as generate() streams
it, so a huge loop stops at `max_output` instead of filling memory; operators,
`~`, filters and str methods estimate their result first and refuse values over
`max_output`; filters and methods that multiply their input by an argument
(indent, wordwrap, urlize, expandtabs, str.replace/join/translate) are removed.
Work: the parsed template is rewritten so each for-loop iterates through a
counting guard and each `~` is a guarded call; iterations and calls spend one
budget, and a wall-clock deadline is checked as steps and output go by. That
deadline is cooperative (one long filter call runs between two checks): the
hard one is the sender's content process, killed when it runs over (sandbox.py).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, nodes, pass_eval_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from mailbus.errors import MailbusError

MAX_SOURCE = 512 * 1024  # characters per template part, as the API allows in all
MAX_VARIABLES = 64 * 1024  # bytes of variables JSON, as the API allows
MAX_SUBJECT = 998  # RFC 5322 line limit
MAX_STEPS = 100_000  # loop iterations + calls per render
MAX_INT_ARG = 100_000  # widths and counts handed to str methods and sizing filters
DEADLINE_SECONDS = 2.0
_ITER, _CONCAT = "_mailbus_iter", "_mailbus_concat"
_DROPPED_FILTERS = {"indent", "wordwrap", "urlize"}
_UNSAFE_STR_METHODS = {"expandtabs", "translate", "replace", "join"}
_INT_CAPPED_FILTERS = {"center", "slice", "batch"}
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


class TemplateFailed(MailbusError):
    """The template could not be rendered; str(exc) is a short reason naming the part."""


@dataclass(frozen=True)
class Rendered:
    """The rendered parts; None where the template had no such part."""

    subject: str | None
    text: str | None
    html: str | None


class _Budget:
    """Size and work allowance of one render()."""

    def __init__(self, max_output: int):
        self.cap, self.output, self.steps = max_output, 0, 0
        self.deadline = time.monotonic() + DEADLINE_SECONDS

    def tick(self, steps: int = 1) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise TemplateFailed(f"more than {MAX_STEPS} loop iterations and calls")
        if (steps == 0 or self.steps % 512 == 0) and time.monotonic() > self.deadline:
            raise TemplateFailed(f"deadline exceeded: rendering took longer than"
                                 f" {DEADLINE_SECONDS} s")

    def check_size(self, size: int, what: str) -> None:
        if size > self.cap:
            raise TemplateFailed(f"{what} would produce more than {self.cap} characters")

    def check_value(self, value: Any, what: str) -> None:
        self.check_size(_weight(value, self.cap), what)  # after the fact: bounds what follows

    def emit(self, chunk: str) -> None:
        self.output += len(chunk)
        if self.output > self.cap:
            raise TemplateFailed(f"output is longer than {self.cap} characters")
        self.tick(0)


_CURRENT: ContextVar[_Budget | None] = ContextVar("mailbus_template_budget", default=None)


def _budget() -> _Budget:
    return _CURRENT.get() or _Budget(512 * 1024)  # outside render(): still limited


def _weight(value: Any, cap: int) -> int:
    """Rough length of a value as text; stops counting soon after `cap`."""
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list | tuple | set | frozenset | dict):
            total += 2 + 4 * len(item)  # brackets, quotes, separators of repr()
            if total <= cap:
                stack.extend(item.items() if isinstance(item, dict) else item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 16
    return total


def _widest(spec: str) -> int:
    # A width or precision in a format spec pads the output that far.
    widths = [int(n) if len(n) < 10 else 10**10 for n in re.findall(r"\d+", spec)]
    return max(widths, default=0) + (MAX_INT_ARG if "{" in spec else 0)


def _format_size(fmt: str, args_weight: int, *, percent: bool) -> int:
    """Upper bound of a %-format or str.format result: each field may print all args."""
    if percent:
        specs = [m.group(0) for m in _PERCENT.finditer(fmt)]
        if any("*" in spec for spec in specs):
            raise TemplateFailed("'*' widths are not allowed in % formats")
    else:
        specs = [spec or "" for _, field, spec, _ in string.Formatter().parse(fmt)
                 if field is not None]
    return len(fmt) + sum(args_weight + _widest(spec) for spec in specs)


def _binop_size(operator: str, left: Any, right: Any, cap: int) -> int:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints:
        return left.bit_length() * max(right, 0) // 3 if right <= 10_000 else cap + 1
    if operator == "*" and ints:
        return (left.bit_length() + right.bit_length()) // 3
    seq, times = (right, left) if isinstance(left, int) else (left, right)
    if operator == "*" and isinstance(times, int) and isinstance(seq, str | list | tuple):
        return _weight(seq, cap) * max(times, 0)
    if operator == "+" and not ints:
        return _weight(left, cap) + _weight(right, cap)
    if operator == "%" and isinstance(left, str):
        return _format_size(left, _weight(right, cap), percent=True)
    return 0


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Filters marked pass_context/pass_eval_context get that object first.
    lead = 1 if getattr(func, "jinja_pass_arg", None) else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        value, rest = args[lead] if len(args) > lead else None, args[lead + 1:]
        if name in _INT_CAPPED_FILTERS:
            _cap_ints((*rest, *kwargs.values()))
        if name == "join":
            value = value if isinstance(value, list | tuple | str) else list(value or ())
            args = (*args[:lead], value, *rest)
            sep = rest[0] if rest else kwargs.get("d", "")
            budget.check_size(_weight(value, budget.cap) + len(str(sep)) * len(value), name)
        elif name == "replace" and len(rest) >= 2:
            text, old, new = str(value), str(rest[0]), str(rest[1])
            hits = text.count(old) if old else len(text) + 1
            budget.check_size(len(text) + hits * len(new), name)
        elif name == "format":
            weight = _weight((rest, kwargs), budget.cap)
            budget.check_size(_format_size(str(value), weight, percent=True), name)
        result = func(*args, **kwargs)
        budget.check_value(result, name)
        return result

    return guarded


def _cap_ints(values: Iterable[Any]) -> None:
    if big := [v for v in values if isinstance(v, int) and abs(v) > MAX_INT_ARG]:
        raise TemplateFailed(f"number {big[0]} is larger than {MAX_INT_ARG}")


def _guarded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


@pass_eval_context
def _guarded_concat(eval_ctx: Any, *parts: Any) -> str:
    budget = _budget()
    budget.check_size(_weight(parts, budget.cap), "'~'")
    return markup_join(parts) if eval_ctx.autoescape else str_join(parts)


def _finalize(value: Any) -> Any:
    _budget().check_value(value, "an expression")
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with size checks on operators, calls and filters."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *, autoescape: bool):
        super().__init__(autoescape=autoescape, undefined=StrictUndefined, finalize=_finalize,
                         keep_trailing_newline=True, cache_size=0, auto_reload=False)
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()
                        if name not in _DROPPED_FILTERS}
        self.globals.pop("lipsum", None)
        self.globals.update({_ITER: _guarded_iter, _CONCAT: _guarded_concat})

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """Also refuse str methods whose output grows with an argument."""
        if isinstance(obj, str) and attr in _UNSAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Estimate the result size of + * ** % before computing it."""
        budget = _budget()
        budget.check_size(_binop_size(operator, left, right, budget.cap), repr(operator))
        result = self.binop_table[operator](left, right)
        budget.check_value(result, repr(operator))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Spend a step; bound the arguments of str methods, including format."""
        budget = _budget()
        budget.tick()
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            _cap_ints((*args, *kwargs.values()))
            if getattr(method, "__name__", "") in ("format", "format_map"):
                weight = _weight((args, kwargs), budget.cap)
                budget.check_size(_format_size(owner, weight, percent=False), "format")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_value(result, "a call")
        return result


class _Meter(NodeTransformer):
    """Routes every for-loop and `~` of a parsed template through the guards."""

    def visit_Name(self, node: nodes.Name) -> nodes.Name:
        if node.name in (_ITER, _CONCAT):
            raise TemplateFailed(f"the name {node.name!r} is reserved")
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _guard_call(_ITER, [node.iter], node.lineno)  # type: ignore[list-item]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return _guard_call(_CONCAT, node.nodes, node.lineno)


def _guard_call(name: str, args: list[nodes.Expr], line: int) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load", lineno=line), args, [], None, None, lineno=line)


_TEXT, _HTML = _Sandbox(autoescape=False), _Sandbox(autoescape=True)


def _render_part(env: _Sandbox, source: str, variables: dict[str, Any], budget: _Budget) -> str:
    if len(source) > MAX_SOURCE:
        raise TemplateFailed(f"template is longer than {MAX_SOURCE} characters")
    tree = _Meter().visit(env.parse(source))
    tree.set_environment(env)
    template = env.template_class.from_code(env, env.compile(tree), env.make_globals(None))
    chunks = []
    for chunk in template.generate(variables):
        budget.emit(chunk)
        chunks.append(chunk)
    return "".join(chunks)


def _reason(exc: BaseException) -> str:
    reason = (str(exc) if isinstance(exc, TemplateFailed)
              else f"syntax error on line {exc.lineno}: {exc.message}"
              if isinstance(exc, TemplateSyntaxError)
              else f"refused by the sandbox: {exc}" if isinstance(exc, SecurityError)
              else f"{type(exc).__name__}: {exc}")
    return " ".join(reason.split())[:300]  # one line, bounded: it ends up in email.failed


def _variables(variables_json: str) -> dict[str, Any]:
    if len(variables_json.encode("utf-8")) > MAX_VARIABLES:
        raise TemplateFailed(f"variables: longer than {MAX_VARIABLES} bytes")
    try:
        variables = json.loads(variables_json)
    except (ValueError, RecursionError) as exc:
        raise TemplateFailed("variables: not valid JSON") from exc
    if not isinstance(variables, dict) or {_ITER, _CONCAT} & variables.keys():
        raise TemplateFailed("variables: not a JSON object, or one using a reserved name")
    return variables


def one_line_subject(subject: str) -> str:
    """Refuse line breaks and controls in a subject; fold whitespace runs into one space."""
    # As compose's header rule: U+0085, U+2028 and U+2029 fold, every other control
    # character (CR, LF, NUL, VT, FF, FS... and C1) is refused.
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f-\x84\x86-\x9f]", subject):
        raise TemplateFailed("subject: contains a line break or control character")
    if len(subject := " ".join(subject.split())) > MAX_SUBJECT:
        raise TemplateFailed(f"subject: longer than {MAX_SUBJECT} characters")
    return subject


def check(template: dict[str, Any]) -> None:
    """Parse, meter and compile each part as render() would; TemplateFailed naming the part.

    Nothing is rendered: no variables are given and no template code runs, so
    the cost is the parser's and the compiler's, linear in the source.
    """
    for part, env in (("subject", _TEXT), ("text", _TEXT), ("html", _HTML)):
        source = template.get(part)
        if source is None:
            continue
        try:
            if len(source) > MAX_SOURCE:
                raise TemplateFailed(f"template is longer than {MAX_SOURCE} characters")
            tree = _Meter().visit(env.parse(source))
            tree.set_environment(env)
            env.compile(tree)
        except Exception as exc:  # the parser and compiler can raise anything on hostile input
            raise TemplateFailed(f"{part}: {_reason(exc)}") from exc


def check_job(template: dict[str, Any]) -> str | None:
    """check() as a job of a deadline process: None when it compiles, else the reason."""
    try:
        check(template)
    except TemplateFailed as exc:
        return str(exc)
    return None


def render(template: dict[str, Any], variables_json: str, *,
           max_output: int = 512 * 1024) -> Rendered:
    """Render a template's subject, text and html parts with its JSON variables."""
    variables = _variables(variables_json or "{}")
    parts: dict[str, str | None] = {}
    reset = _CURRENT.set(budget := _Budget(max_output))
    try:
        for part, env in (("subject", _TEXT), ("text", _TEXT), ("html", _HTML)):
            source = template.get(part)
            try:
                parts[part] = None if source is None else _render_part(
                    env, source, variables, budget)
            except Exception as exc:  # template code can raise anything at all
                raise TemplateFailed(f"{part}: {_reason(exc)}") from exc
    finally:
        _CURRENT.reset(reset)
    subject = parts["subject"]
    return Rendered(None if subject is None else one_line_subject(subject),
                    parts["text"], parts["html"])
