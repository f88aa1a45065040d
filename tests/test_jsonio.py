"""Strict JSON: edgeft never writes NaN or Infinity, and refuses them (and deep nesting) on reading."""

from __future__ import annotations

import json
import math

import pytest

from edgeft import jsonio


def _strict(text: str):
    """Parse as a strict JSON parser would (no NaN, Infinity or -Infinity)."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in edgeft's JSON"))


def test_non_finite_numbers_are_written_as_null_at_every_depth():
    value = {"a": math.nan, "b": [math.inf, {"c": -math.inf, "d": (1.5, math.nan)}], "e": 2}
    assert _strict(jsonio.dumps(value, indent=2)) == {"a": None, "b": [None, {"c": None, "d": [1.5, None]}], "e": 2}


@pytest.mark.parametrize("text", ['{"a": NaN}', "[Infinity]", '{"x": [-Infinity]}'])
def test_non_finite_constants_are_refused_on_reading(text):
    with pytest.raises(ValueError, match="not a JSON number"):
        jsonio.loads(text)


@pytest.mark.parametrize("depth", [jsonio.MAX_DEPTH + 1, 100_000])
def test_nesting_deeper_than_the_limit_is_refused_without_recursion_errors(depth):
    with pytest.raises(ValueError, match="nested more than"):
        jsonio.loads("[" * depth + "]" * depth)


def test_documents_within_the_limit_round_trip():
    value = {"k": [[[{"v": 1.25}]]], "s": "text"}
    assert jsonio.loads(jsonio.dumps(value)) == value
    nested = "[" * jsonio.MAX_DEPTH + "]" * jsonio.MAX_DEPTH
    assert jsonio.loads(nested) is not None
