"""Template rendering: the sandbox holds, escaping is per part, budgets stop runaway templates."""

from __future__ import annotations

import json
import time

import pytest

from mailbus.errors import MailbusError
from mailbus.sender.templates import MAX_SOURCE, Rendered, TemplateFailed, render


def _vars(**values: object) -> str:
    return json.dumps(values)


def _fails(template: dict, variables: str = "{}", **kw: object) -> str:
    with pytest.raises(TemplateFailed) as caught:
        render(template, variables, **kw)
    assert isinstance(caught.value, MailbusError)
    return str(caught.value)


def test_renders_all_parts() -> None:
    out = render({"subject": "Order {{ order }}", "text": "Total {{ total }}\n",
                  "html": "<p>{{ total }}</p>"}, _vars(order=4711, total="12.50 EUR"))
    assert out == Rendered("Order 4711", "Total 12.50 EUR\n", "<p>12.50 EUR</p>")


def test_missing_parts_stay_none() -> None:
    assert render({"text": "hi"}, "{}") == Rendered(None, "hi", None)
    assert render({"subject": None, "text": None, "html": "<b>x</b>"}, "") == Rendered(
        None, None, "<b>x</b>")


def test_autoescape_in_html_only() -> None:
    evil = "<script>alert('x')</script>"
    out = render({"subject": "{{ v }}", "text": "{{ v }}", "html": "<p>{{ v }}</p>"}, _vars(v=evil))
    assert out.html == "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</p>"
    assert out.text == evil and out.subject == evil
    assert render({"html": "{{ a ~ b }}"}, _vars(a="<b>", b="&")).html == "&lt;b&gt;&amp;"


def test_missing_variable_fails_naming_part_and_variable() -> None:
    reason = _fails({"subject": "ok", "html": "<p>{{ nobody }}</p>"})
    assert reason.startswith("html:") and "nobody" in reason
    assert _fails({"text": "{{ user.name }}"}, _vars(user={})).startswith("text:")


def test_syntax_error_names_the_part() -> None:
    assert _fails({"text": "fine", "subject": "{% if %}"}).startswith("subject: syntax error")
    assert _fails({"html": "{% for x in y %}"}).startswith("html: syntax error")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ x.__class__.__base__ }}",
    "{{ x|attr('__class__') }}",
    "{{ ''['__class__'] }}",
    "{{ (1).__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ 'x'.format.__globals__ }}",
    "{{ d.update({'a': 1}) }}",
    "{{ l.append(1) }}",
    "{{ l.pop() }}",
    "{{ lipsum() }}",
    "{{ config }}",
    "{% include 'etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% set _mailbus_iter = 1 %}",
    "{% for _mailbus_concat in l %}{% endfor %}",
])
def test_sandbox_escapes_are_refused(source: str) -> None:
    reason = _fails({"text": source}, _vars(x=1, d={}, l=[1]))
    assert reason.startswith("text:")
    assert not any(leak in reason for leak in ("<class", "<function", "<module", "<built-in"))


def test_security_refusals_say_so() -> None:
    assert "sandbox" in _fails({"text": "{{ ''.__class__ }}"})


def test_reserved_variable_names_are_refused() -> None:
    assert _fails({"text": "x"}, _vars(_mailbus_iter=1)).startswith("variables:")


@pytest.mark.parametrize("variables", ["[1, 2]", "not json", '"text"', "{" * 5000])
def test_variables_must_be_a_json_object(variables: str) -> None:
    assert _fails({"text": "x"}, variables).startswith("variables:")


def test_oversized_variables_and_sources_are_refused() -> None:
    assert "variables" in _fails({"text": "x"}, _vars(v="a" * 70_000))
    assert "longer than" in _fails({"html": "a" * (MAX_SOURCE + 1)})


def test_huge_loop_hits_the_output_cap_quickly() -> None:
    started = time.monotonic()
    reason = _fails({"text": "{% for i in range(100000) %}{% for j in range(100000) %}"
                             "xxxxxxxxxx{% endfor %}{% endfor %}"})
    assert "output is longer than" in reason
    assert time.monotonic() - started < 2


def test_output_cap_counts_all_parts_together() -> None:
    template = {"subject": "{{ v }}", "text": "{{ v }}", "html": "{{ v }}"}
    assert render(template, _vars(v="a" * 40), max_output=120).text == "a" * 40
    assert "output" in _fails(template, _vars(v="a" * 41), max_output=120)


def test_silent_loops_hit_the_step_budget() -> None:
    reason = _fails({"text": "{% for i in range(100000) %}{% for j in range(100000) %}"
                             "{% endfor %}{% endfor %}"})
    assert "loop iterations" in reason


def test_exponential_macro_recursion_is_stopped() -> None:
    source = ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
              "{{ f(40) }}")
    assert _fails({"text": source}).startswith("text:")


@pytest.mark.parametrize("source", [
    "{{ 'x' * 10**9 }}",
    "{{ [1] * 10**9 }}",
    "{{ 10**100000 }}",
    "{{ 10 ** (9 ** 9) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set s = 'xxxxxxxxxx' %}{% set s = s~s~s~s~s~s~s~s~s~s %}{% set s = s~s~s~s~s~s~s~s~s~s %}"
    "{% set s = s~s~s~s~s~s~s~s~s~s %}{% set s = s~s~s~s~s~s~s~s~s~s %}"
    "{% set s = s~s~s~s~s~s~s~s~s~s %}{{ s|length }}",
    "{% set s = 'a' * 100000 %}{% set t = s + s + s + s + s + s %}{{ t|length }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '%099999999d'|format(1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{0:{1}}'.format(1, 999999999) }}",
    "{{ 'x'.ljust(10**8) }}",
    "{{ 'x'|center(10**8) }}",
    "{{ 'x\tx'.expandtabs(100000) }}",
    "{% set s = 'a' * 1000 %}{{ s|replace('a', s) }}",
    "{% set s = 'a' * 1000 %}{{ s.replace('a', s) }}",
    "{% set s = 'a' * 1000 %}{{ [s, s]|join(s * 500) }}",
    "{% set s = 'a' * 100000 %}{{ [s, s, s, s, s, s] }}",
    "{{ ('\n' * 100000)|indent(1000) }}",
    "{{ 'x'|wordwrap(1) }}",
    "{{ range(10)|batch(10**9, 'x')|list }}",
])
def test_memory_bombs_are_refused(source: str) -> None:
    started = time.monotonic()
    assert _fails({"text": source}).startswith("text:")
    assert time.monotonic() - started < 2


def test_ordinary_templates_keep_working() -> None:
    source = (
        "{% macro money(v) %}{{ '%.2f'|format(v) }} EUR{% endmacro %}"
        "{% for item in items %}{{ loop.index }}/{{ loop.length }} {{ item.name|title }}: "
        "{{ money(item.price) }}{% if not loop.last %}, {% endif %}{% endfor %}\n"
        "{{ items|map(attribute='name')|map('upper')|join(', ') }}\n"
        "{{ '{:.1f}'.format(total) }} {{ '%d%%' % 50 }} {{ total|round(1) }}"
        " {{ nothing|default('-') }}\n"
        "{% for k, v in flags|dictsort %}{{ k }}={{ v }};{% endfor %} {{ 'a,b'.split(',')|length }}"
        " {{ 'ab'|replace('a', 'c') }} {{ 'x' ~ 1 ~ 'y' }} {{ price * qty }} {{ 'ab' * 2 }}"
    )
    variables = _vars(items=[{"name": "tea", "price": 3.5}, {"name": "cake", "price": 2}],
                      total=5.55, flags={"b": 2, "a": 1}, price=2.5, qty=1_000_000)
    assert render({"text": source}, variables).text == (
        "1/2 Tea: 3.50 EUR, 2/2 Cake: 2.00 EUR\nTEA, CAKE\n"
        "5.5 50% 5.5 -\na=1;b=2; 2 cb x1y 2500000.0 abab"
    )


def test_subject_line_breaks_are_refused_and_whitespace_folded() -> None:
    assert _fails({"subject": "{{ s }}"}, _vars(s="hi\r\nBcc: victim@evil")).startswith(
        "subject:")
    assert _fails({"subject": "{{ s }}"}, _vars(s="hi\nthere")).startswith("subject:")
    assert _fails({"subject": "{{ s }}"}, _vars(s="a\0b")).startswith("subject:")
    assert _fails({"subject": "{{ s }}"}, _vars(s="a\x0bb")).startswith("subject:")
    assert _fails({"subject": "{{ s }}"}, _vars(s="a\x9bb")).startswith("subject:")
    folded = render({"subject": "  {{ s }}  "}, _vars(s="a \t b\u2028c\u2029d\x85e"))
    assert folded.subject == "a b c d e"
    assert "longer than" in _fails({"subject": "{{ 'x' * 999 }}"})


def test_subject_and_text_are_not_escaped() -> None:
    out = render({"subject": "{{ s }}", "text": "{{ s }}"}, _vars(s="Tom & Jerry <3"))
    assert out.subject == out.text == "Tom & Jerry <3"


def test_arbitrary_runtime_errors_become_template_failed() -> None:
    assert _fails({"text": "{{ 1 / 0 }}"}).startswith("text: ZeroDivisionError")
    assert _fails({"text": "{{ 'a' + 1 }}"}).startswith("text: TypeError")


def test_loop_features_survive_the_metering() -> None:
    source = ("{% for x in tree recursive %}{{ x.n }}({{ loop(x.c) }}){% endfor %}|"
              "{% for i in items if i > 1 %}{{ i }}{{ loop.cycle('a', 'b') }}{% endfor %}|"
              "{% for e in empty %}x{% else %}none{% endfor %}|"
              "{% set ns = namespace(t=0) %}{% for i in items %}{% set ns.t = ns.t + i %}"
              "{% endfor %}{{ ns.t }}")
    variables = _vars(tree=[{"n": "a", "c": [{"n": "b", "c": []}]}], items=[1, 2, 3], empty=[])
    assert render({"text": source}, variables).text == "a(b())|2a3b|none|6"


# A template that prints nothing and spends its steps on long filter calls: the
# cooperative deadline only looks at the clock every 512 steps, so unchecked it
# holds a CPU for tens of seconds (27 s measured) before noticing.
UNCOOPERATIVE = ("{% set words = (range(50000)|list|string)[1:-1].split(', ') %}"
                 "{% for i in range(500) %}{% set s = words|sort|unique|list|sort(reverse=true) %}"
                 "{% endfor %}x")


def _templated(text: str, subject: str | None = "s") -> dict:
    return {"subject": subject, "text": None, "html": None,
            "template": {"subject": None, "text": text, "html": None, "variables_json": "{}"}}


def test_the_sandbox_kills_a_render_at_its_deadline_while_others_go_on() -> None:
    import asyncio

    from mailbus.sender.sandbox import ContentSandbox

    async def main() -> tuple[str, list[str]]:
        sandbox = ContentSandbox(deadline=1.0, processes=2)
        try:
            hostile = asyncio.create_task(sandbox.content(_templated(UNCOOPERATIVE)))
            done: list[str] = []
            while not hostile.done():  # the other process keeps rendering meanwhile
                done.append((await sandbox.content(_templated(f"n{len(done)}"))).text or "")
            with pytest.raises(TemplateFailed) as exc:
                await hostile
            # The killed process is replaced: the next render still works.
            done.append((await sandbox.content(_templated("after"))).text or "")
            return str(exc.value), done
        finally:
            sandbox.close()

    reason, done = asyncio.run(main())
    assert reason == "deadline exceeded: stopped after 1 s"
    assert done[-1] == "after" and done[:-1] == [f"n{i}" for i in range(len(done) - 1)]
    assert len(done) >= 2


@pytest.mark.parametrize("text, kind, reason", [
    ("{{ 1 // 0 }}", TemplateFailed, "text: ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", TemplateFailed, "text: "),
    ("{{ '%d' % 'x' }}", TemplateFailed, "text: TypeError"),
])
def test_a_template_raising_something_odd_fails_in_the_sandbox(text: str, kind: type,
                                                                reason: str) -> None:
    import asyncio

    from mailbus.sender.compose import ComposeFailed
    from mailbus.sender.sandbox import ContentSandbox

    async def main() -> None:
        sandbox = ContentSandbox(deadline=30.0, processes=1)
        try:
            with pytest.raises(kind, match=reason):
                await sandbox.content(_templated(text))
            with pytest.raises(ComposeFailed, match=r"^html: .*AssertionError"):
                await sandbox.content({"html": "<![foo[ x ]]>", "text": None})
            ok = await sandbox.content({"html": "<p>fine</p>", "text": None, "subject": "s"})
            assert (ok.subject, ok.text) == ("s", "fine\n")
        finally:
            sandbox.close()

    asyncio.run(main())


def test_html_that_makes_the_parser_quadratic_is_stopped_at_the_deadline() -> None:
    import asyncio

    from mailbus.sender.compose import ComposeFailed
    from mailbus.sender.sandbox import ContentSandbox

    async def main() -> str:
        sandbox = ContentSandbox(deadline=1.0, processes=1)
        try:
            # HTMLParser rescans the rest of the input at every "<a" (hours for 400 KB).
            with pytest.raises(ComposeFailed) as exc:
                await sandbox.content({"html": "<a" * 200_000, "text": None})
            fine = await sandbox.content({"html": "<p>next</p>", "text": None})
            assert fine.text == "next\n"
            return str(exc.value)
        finally:
            sandbox.close()

    assert asyncio.run(main()) == "html: deadline exceeded: stopped after 1 s"
