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
