"""JSON merge patch (RFC 7386): the RFC's own examples as a table, and its properties under Hypothesis."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ambient.kube.merge import merge_patch

# RFC 7386 Appendix A, verbatim.
RFC_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_EXAMPLES)
def test_rfc7386_examples(target: Any, patch: Any, expected: Any) -> None:
    assert merge_patch(target, patch) == expected


def test_label_patch_as_a_controller_sends_it() -> None:
    obj = {"metadata": {"name": "p", "labels": {"app": "web", "old": "x"}}, "spec": {"containers": [{"name": "c"}]}}
    patched = merge_patch(obj, {"metadata": {"labels": {"old": None, "new": "y"}}})
    assert patched == {"metadata": {"name": "p", "labels": {"app": "web", "new": "y"}},
                       "spec": {"containers": [{"name": "c"}]}}


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
KEYS = st.sampled_from(["a", "b", "c", "metadata", "labels", "spec"])
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=12)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=5)


def _has_null_member(value: Any) -> bool:
    """Whether an object (at any depth through objects, not arrays) has a null member."""
    return isinstance(value, dict) and any(v is None or _has_null_member(v) for v in value.values())


@given(JSON, JSON)
def test_inputs_are_not_mutated(target: Any, patch: Any) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    result = merge_patch(target, patch)
    assert target == target_before
    assert patch == patch_before
    if isinstance(result, dict) and isinstance(target, dict):
        # The result shares no mutable state with the target: editing it leaves the target alone.
        result["__probe__"] = 1
        assert target == target_before


@given(JSON, JSON)
def test_applying_the_same_patch_twice_is_idempotent(target: Any, patch: Any) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(OBJECTS, OBJECTS)
def test_null_in_patch_removes_the_key(target: dict[str, Any], patch: dict[str, Any]) -> None:
    result = merge_patch(target, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in result
        else:
            assert key in result
    for key, value in target.items():
        if key not in patch:
            assert result[key] == value


@given(OBJECTS, OBJECTS)
def test_result_holds_no_nulls_the_patch_introduced(target: dict[str, Any], patch: dict[str, Any]) -> None:
    # Nulls mean "remove", so a patch applied to an object without nulls never leaves one behind.
    clean_target = merge_patch({}, target)
    assert not _has_null_member(merge_patch(clean_target, patch))


@given(JSON)
def test_empty_object_patch_keeps_objects(target: Any) -> None:
    result = merge_patch(target, {})
    assert result == (target if isinstance(target, dict) else {})


@given(OBJECTS)
def test_patch_that_is_the_target_is_a_no_op_for_objects_without_nulls(target: dict[str, Any]) -> None:
    clean = merge_patch({}, target)
    assert merge_patch(clean, clean) == clean
