"""Label and field selectors: the query-string grammar and matching, table-driven, plus Hypothesis
for the parser of untrusted text (it either parses or raises `SelectorError`, never anything else)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.kube.selectors import (
    FieldRequirement,
    Requirement,
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
    selector_from_match_labels,
)

LABELS = {"app": "web", "tier": "front", "example.com/owner": "team-a", "empty": ""}


@pytest.mark.parametrize(("text", "expected"), [
    (None, ()),
    ("", ()),
    ("app=web", (Requirement("app", "=", ("web",)),)),
    ("app==web", (Requirement("app", "=", ("web",)),)),
    ("app != web", (Requirement("app", "!=", ("web",)),)),
    ("app=", (Requirement("app", "=", ("",)),)),
    ("app in (web, api)", (Requirement("app", "in", ("web", "api")),)),
    ("app notin (web)", (Requirement("app", "notin", ("web",)),)),
    ("app", (Requirement("app", "exists"),)),
    ("!app", (Requirement("app", "!"),)),
    ("example.com/owner=team-a", (Requirement("example.com/owner", "=", ("team-a",)),)),
    ("a=b,c in (x,y),!d", (Requirement("a", "=", ("b",)), Requirement("c", "in", ("x", "y")),
                           Requirement("d", "!"))),
])
def test_parse_label_selector(text: str | None, expected: tuple[Requirement, ...]) -> None:
    assert parse_label_selector(text) == expected


@pytest.mark.parametrize("text", [
    "app=web=x",
    "app in web",
    "app in (web",
    "=web",
    "-app=web",
    "app=we b",
    "app notin",
    "app ~ web",
    "!app=web",
])
def test_parse_label_selector_rejects(text: str) -> None:
    with pytest.raises(SelectorError, match="unable to parse label selector requirement"):
        parse_label_selector(text)


@pytest.mark.parametrize(("text", "matches"), [
    ("app=web", True),
    ("app=api", False),
    ("app!=api", True),
    ("app!=web", False),
    ("missing!=x", True),  # != matches objects without the label, as in Kubernetes
    ("app in (api, web)", True),
    ("app in (api)", False),
    ("missing in (x)", False),
    ("app notin (api)", True),
    ("app notin (web)", False),
    ("missing notin (x)", True),
    ("tier", True),
    ("missing", False),
    ("!missing", True),
    ("!tier", False),
    ("empty=", True),
    ("example.com/owner=team-a", True),
    ("app=web,tier=front", True),
    ("app=web,tier=back", False),
    ("", True),
])
def test_labels_match(text: str, matches: bool) -> None:
    assert labels_match(parse_label_selector(text), LABELS) is matches


def test_labels_match_without_labels() -> None:
    assert labels_match(parse_label_selector("!app"), None)
    assert not labels_match(parse_label_selector("app"), None)
    assert labels_match((), None)


@pytest.mark.parametrize(("selector", "expected"), [
    (None, ()),
    ({}, ()),
    ({"app": "web", "a": 1}, (Requirement("a", "=", ("1",)), Requirement("app", "=", ("web",)))),
    ({"matchLabels": {"app": "web"}}, (Requirement("app", "=", ("web",)),)),
    ({"matchExpressions": [
        {"key": "a", "operator": "In", "values": ["x", "y"]},
        {"key": "b", "operator": "NotIn", "values": ["z"]},
        {"key": "c", "operator": "Exists"},
        {"key": "d", "operator": "DoesNotExist"},
    ]}, (Requirement("a", "in", ("x", "y")), Requirement("b", "notin", ("z",)), Requirement("c", "exists"),
         Requirement("d", "!"))),
])
def test_selector_from_match_labels(selector: dict[str, Any] | None, expected: tuple[Requirement, ...]) -> None:
    assert selector_from_match_labels(selector) == expected


@pytest.mark.parametrize("selector", [
    {"matchExpressions": [{"key": "a", "operator": "Like"}]},
    {"matchExpressions": [{"operator": "Exists"}]},
    {"matchExpressions": ["a"]},
])
def test_selector_from_match_labels_rejects(selector: dict[str, Any]) -> None:
    with pytest.raises(SelectorError):
        selector_from_match_labels(selector)


POD = {"metadata": {"name": "web-1", "namespace": "default"},
       "spec": {"nodeName": "node-a", "serviceAccountName": "web"}, "status": {"phase": "Running"}}


@pytest.mark.parametrize(("text", "matches"), [
    ("spec.nodeName=node-a", True),
    ("spec.nodeName==node-a", True),
    ("spec.nodeName=node-b", False),
    ("spec.nodeName!=node-b", True),
    ("spec.nodeName!=node-a", False),
    ("metadata.name=web-1,metadata.namespace=default", True),
    ("status.phase=Running,spec.serviceAccountName=other", False),
    (" spec.nodeName = node-a ", True),
    ("", True),
])
def test_fields_match(text: str, matches: bool) -> None:
    assert fields_match(parse_field_selector(text), POD) is matches


def test_field_selector_on_missing_field_compares_empty() -> None:
    unbound = {"metadata": {"name": "p"}, "spec": {}}
    assert fields_match(parse_field_selector("spec.nodeName="), unbound)
    assert not fields_match(parse_field_selector("spec.nodeName!="), unbound)
    assert parse_field_selector("spec.nodeName=") == (FieldRequirement(("spec", "nodeName"), False, ""),)


@pytest.mark.parametrize(("text", "message"), [
    ("spec.hostNetwork=true", "field label not supported: spec.hostNetwork"),
    ("spec.nodeName", "unable to parse field selector requirement"),
    ("spec.node_name=x", "unable to parse field selector requirement"),
])
def test_parse_field_selector_rejects(text: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        parse_field_selector(text)


@given(st.text())
def test_label_selector_parses_or_raises_selector_error(text: str) -> None:
    try:
        requirements = parse_label_selector(text)
    except SelectorError:
        return
    assert all(isinstance(r, Requirement) for r in requirements)
    labels_match(requirements, LABELS)


@given(st.text(alphabet=st.sampled_from("ab=!,() in notin\t.-/_x1")))
def test_label_selector_grammar_fragments_parse_or_raise_selector_error(text: str) -> None:
    # Text drawn from the grammar's own characters reaches far more branches than arbitrary unicode.
    try:
        parse_label_selector(text)
    except SelectorError:
        pass


@given(st.text())
def test_field_selector_parses_or_raises_selector_error(text: str) -> None:
    try:
        requirements = parse_field_selector(text)
    except SelectorError:
        return
    fields_match(requirements, POD)


KEYS = st.from_regex(r"\A[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?(/[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?)?\Z")
VALUES = st.from_regex(r"\A([A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?)?\Z")


@given(KEYS, VALUES, st.dictionaries(KEYS, VALUES))
def test_equality_and_inequality_are_complements(key: str, value: str, labels: dict[str, str]) -> None:
    equal = labels_match(parse_label_selector(f"{key}={value}"), labels)
    assert equal == (labels.get(key) == value)
    assert labels_match(parse_label_selector(f"{key}!={value}"), labels) is not equal


@given(KEYS, st.lists(VALUES.filter(bool), min_size=1, max_size=4), st.dictionaries(KEYS, VALUES))
def test_in_and_notin_are_complements(key: str, values: list[str], labels: dict[str, str]) -> None:
    listed = ", ".join(values)
    inside = labels_match(parse_label_selector(f"{key} in ({listed})"), labels)
    assert inside == (key in labels and labels[key] in values)
    assert labels_match(parse_label_selector(f"{key} notin ({listed})"), labels) is not inside
    assert labels_match(parse_label_selector(key), labels) == (key in labels)
    assert labels_match(parse_label_selector(f"!{key}"), labels) == (key not in labels)
