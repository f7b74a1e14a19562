"""SPIFFE ids: the exact text form Istio uses, and a precise refusal of anything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.identity.errors import InvalidSpiffeId
from ambient.identity.spiffe import SpiffeId

SEGMENT = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}", fullmatch=True)
TRUST_DOMAIN = st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True)


def test_format_and_parse_round_trip() -> None:
    ident = SpiffeId("cluster.local", "bookinfo", "bookinfo-reviews")
    assert str(ident) == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    assert SpiffeId.parse(str(ident)) == ident


@given(TRUST_DOMAIN, SEGMENT, SEGMENT)
def test_round_trip_for_any_valid_id(td: str, ns: str, sa: str) -> None:
    ident = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(ident)) == ident


@pytest.mark.parametrize(("text", "why"), [
    ("spiffe://cluster.local/ns/default", "expected spiffe://"),
    ("spiffe://cluster.local/ns/default/sa/app/extra", "expected spiffe://"),
    ("spiffe://cluster.local/sa/app/ns/default", "expected spiffe://"),
    ("http://cluster.local/ns/default/sa/app", "must start with 'spiffe://'"),
    ("spiffe:///ns/default/sa/app", "trust domain ''"),
    ("spiffe://Cluster.Local/ns/default/sa/app", "lowercase"),
    ("spiffe://cluster.local/ns//sa/app", "namespace ''"),
    ("spiffe://cluster.local/ns/../sa/app", "not '.' or '..'"),
    ("spiffe://cluster.local/ns/default/sa/a%2Fb", "service account 'a%2Fb'"),
    ("spiffe://cluster.local:8080/ns/default/sa/app", "trust domain"),
])
def test_rejects_bad_ids_saying_why(text: str, why: str) -> None:
    with pytest.raises(InvalidSpiffeId, match="invalid SPIFFE id") as caught:
        SpiffeId.parse(text)
    assert why in str(caught.value)


@given(st.text(max_size=80))
def test_parse_never_fails_with_anything_but_invalid_spiffe_id(text: str) -> None:
    try:
        ident = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(ident) == text


def test_ids_sort_and_hash_as_values() -> None:
    a, b = SpiffeId("td", "a", "x"), SpiffeId("td", "b", "x")
    assert sorted([b, a]) == [a, b]
    assert {a, SpiffeId("td", "a", "x")} == {a}
