"""Template rendering and the shared-prefix split used for KV reuse."""

from __future__ import annotations

import pytest

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.template import render, score_request, split_shared

TEMPLATE = "{{ prompt }}\n\nReview: {{ input }}\nSentiment:"


def test_shared_prefix_is_everything_before_the_first_example_variable() -> None:
    shared, rest = split_shared(TEMPLATE, "Positive or negative?", {"input": "Great."})
    assert shared == "Positive or negative?\n\nReview: "
    assert rest == "Great.\nSentiment:"
    other, _ = split_shared(TEMPLATE, "Positive or negative?", {"input": "Bad."})
    assert other == shared


def test_hidden_or_transformed_variables_share_nothing() -> None:
    upper = "{{ prompt }} {{ input | upper }}"
    assert split_shared(upper, "P", {"input": "x"}) == ("P ", "X")
    conditional = "{% if input == 'a' %}A{% endif %}{{ prompt }}: {{ input }}"
    assert split_shared(conditional, "P", {"input": "a"}) == ("", "AP: a")
    assert split_shared("{{ prompt }} only", "P", {}) == ("", "P only")


def test_score_request_adds_a_space_unless_the_text_ends_in_whitespace() -> None:
    request = score_request(TEMPLATE, "Q?", {"input": "Fine."}, "positive")
    assert (request.prefix, request.prompt, request.continuation) == ("Q?\n\nReview: ", "Fine.\nSentiment:", " positive")
    assert score_request("{{ input }}\n", "", {"input": "x"}, "y").continuation == "y"


def test_undefined_variable_and_sandbox_are_errors_naming_the_node() -> None:
    with pytest.raises(RuntimeFailure, match="node 'n'.*'missing' is undefined"):
        render("{{ missing }}", "", {}, node="n")
    with pytest.raises(RuntimeFailure, match="node 'n'"):
        render("{{ input.__class__.__mro__ }}", "", {"input": "x"}, node="n")


# Each of these ran for minutes or took gigabytes before the sandbox's bounds;
# each must now fail fast, as a RuntimeFailure naming the node.
BOMBS = {
    "repeat": ("{{ 'a' * 100000000 }}", "a repeated value would be 100,000,000 characters long"),
    "nested-loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "the template ran for more than",
    ),
    "loop-output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "the text written"),
    "macro-output": (
        "{% set s = 'a' * 1000000 %}{% macro m() %}{% for i in range(100) %}{{ s }}{% endfor %}{% endmacro %}{{ m()|length }}",
        "the text written",
    ),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses too deeply"),
    "doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "a `~` concatenation would be",
    ),
    "list-literal": ("{% set s = 'a' * 1000000 %}{{ [s, s, s] }}", "a literal would be"),
    "replace": ("{{ ('a' * 1000000) | replace('a', 'aaaa') }}", "the result of `replace` would be 4,000,000"),
    "join": ("{% set s = 'a' * 600000 %}{{ [s] * 1 + [s] | join }}", "a joined value"),
    "method-width": ("{{ 'a'.ljust(1000000000) }}", "the result of `ljust`"),
    "filter-width": ("{{ 'a' | center(1000000000) }}", "the result of `center`"),
    "printf-width": ("{{ '%999999999d' % 1 }}", "width of a million or more"),
    "format-width": ("{{ '{:>999999999}'.format(1) }}", "width of a million or more"),
    "format-filter-width": ("{{ '%*d' | format(999999999, 1) }}", "width of a million or more"),
    "big-range": ("{{ range(10 ** 9) | list }}", "`safe_range`"),
    "own-error": ("{{ 1 / 0 }}", "ZeroDivisionError"),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_template_cannot_exhaust_time_or_memory(name: str) -> None:
    import time

    from dlngraph.sandbox import MAX_RENDER_SECONDS

    template, message = BOMBS[name]
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match="node 'n'") as info:
        render(template, "P", {"input": "x"}, node="n")
    assert message in str(info.value)
    assert time.monotonic() - started < MAX_RENDER_SECONDS + 1


def test_bounded_rendering_keeps_what_templates_legitimately_do() -> None:
    template = (
        "{{ prompt }} {% for w in input.split() %}[{{ w | upper }}{{ loop.index }}/{{ loop.length }}]{% endfor %}"
        "{{ input ~ '!' }} {{ [1, 2] | join(',') }} {{ '%s-%d' | format('a', 3) }} {{ '-' * 3 }} {{ 2 ** 10 }}"
        "{% set t = 'x' %}{{ t.replace('x', 'y') }}{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}\n"
    )
    assert render(template, "P", {"input": "big world"}) == "P [BIG1/2][WORLD2/2]big world! 1,2 a-3 --- 1024ya=1\n"
    assert render("{{ '%d' | format(10 ** 12) }} {{ '{:>5}'.format(7) }}", "", {}) == "1000000000000     7"
    near = "{{ 'a' * 1000000 }}"  # under the limit
    assert len(render(near, "", {})) == 1_000_000


def test_the_compiler_refuses_attribute_escapes_the_sandbox_would_stop() -> None:
    import jinja2

    from dlngraph.compiler.templates import variables

    escapes = (
        "{{ ''.__class__ }}", "{{ input['__class__'] }}", "{{ x.gi_frame }}", "{{ x.mro() }}",
        "{{ input | attr('__class__') }}", "{{ [input] | map(attribute='upper.__self__') | list }}",
    )  # fmt: skip
    for escape in escapes:
        with pytest.raises(jinja2.TemplateSyntaxError, match="is not allowed"):
            variables(escape)
    assert variables("{{ input.upper() }} {{ input['field'] }}") == {"input"}


def test_the_compiler_refuses_templates_that_exceed_a_bound_whatever_the_data() -> None:
    from dlngraph.compiler.templates import RenderLimit, variables

    with pytest.raises(RenderLimit, match="a repeated value would be 100,000,000"):
        variables("{{ input }} {{ 'a' * 100000000 }}")
    with pytest.raises(RenderLimit, match="recurses too deeply"):
        variables("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(input) }}")
    # failures that depend on the data are the runtime's to report, with the example
    assert variables("{{ 1 / (input | length - 1) }}") == {"input"}
    assert variables("{{ 'a' * ((input | length - 1) * 100000000) }}") == {"input"}


def test_meta_prompts_and_node_templates_share_one_cached_environment() -> None:
    from dlngraph import sandbox
    from dlngraph.compiler import templates
    from dlngraph.runtime import backward

    assert templates.ENV is sandbox.ENV
    before = sandbox.compiled.cache_info()
    variables = {"prompt": "p", "successes": [], "failures": [], "directive": "d"}
    backward.render_meta("proposal.jinja", **variables)
    backward.render_meta("proposal.jinja", **variables)
    after = sandbox.compiled.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 1
