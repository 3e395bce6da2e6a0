"""Reading request bodies: ``load_json`` reads every body as ``json`` reads it (the fast parser
is only a fast path) and refuses the same ones with the same messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfserve import errors
from hfserve.validation import MAX_JSON_DEPTH, load_json

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # any size: beyond 64 bits too
    st.floats(),  # NaN and the infinities as json writes them
    st.text(),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30
)


def same(a, b) -> bool:
    # NaN != NaN: compare the values as json writes them (floats by repr, exact)
    return json.dumps(a) == json.dumps(b) and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(values, st.booleans())
def test_reads_what_json_reads(value, indent):
    body = json.dumps(value, indent=2 if indent else None, ensure_ascii=not indent).encode()
    assert same(load_json(body), json.loads(body))


def test_large_integers_stay_exact_integers():
    value = load_json(b'{"seed": 123456789012345678901234567890, "n": -18446744073709551617}')
    assert value == {"seed": 123456789012345678901234567890, "n": -18446744073709551617}
    assert all(type(v) is int for v in value.values())


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "h\u00e9"}'.encode("utf-16"),  # json detects UTF-16 and UTF-32 by their bytes
        '{"prompt": "hi"}'.encode("utf-8-sig"),
        b'{"prompt": "\\ud800"}',  # a lone surrogate escape
        b'{"t": NaN, "u": -Infinity}',
    ],
)
def test_bodies_only_json_reads_are_read_as_json_reads_them(body):
    assert same(load_json(body), json.loads(body))


@pytest.mark.parametrize("body", [b"", b" \n "])
def test_an_empty_body_is_refused(body):
    with pytest.raises(errors.InvalidRequest, match="The request body is empty; send a JSON object"):
        load_json(body)


@pytest.mark.parametrize("body", [b'{"model": "m", "prompt": ', b'{"a": 1,}', b"{'a': 1}", b'{"a": 1} x', b'{"p": "\xff"}'])
def test_a_malformed_body_is_refused_with_what_json_says(body):
    try:
        json.loads(body)
    except json.JSONDecodeError as exc:
        expected = f"The request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except UnicodeDecodeError:
        expected = "The request body is not valid JSON"
    with pytest.raises(errors.InvalidRequest) as caught:
        load_json(body)
    assert caught.value.message == expected


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 250, 5000])
def test_nesting_beyond_the_limit_is_refused(depth):
    with pytest.raises(errors.InvalidRequest, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        load_json(b"[" * depth + b"]" * depth)


def test_nesting_at_the_limit_is_read():
    body = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert load_json(body) == json.loads(body)
