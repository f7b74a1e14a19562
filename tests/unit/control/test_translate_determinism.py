"""translate() as a whole (ambient/control/translate/__init__.py): same inputs, in any order, give
byte-identical resources, so unchanged objects cause no xDS push; inputs are never mutated."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ambient.control.translate import Translation

from .translate_cases import all_case_names, load_case


def _serialized(translation: Translation) -> dict[str, bytes]:
    resources = {name: a.SerializeToString(deterministic=True) for name, a in translation.addresses.items()}
    resources.update({name: a.SerializeToString(deterministic=True) for name, a in translation.authorizations.items()})
    return resources


@pytest.mark.parametrize("name", all_case_names())
def test_shuffled_inputs_give_identical_bytes(name: str) -> None:
    case = load_case(name)
    baseline = case.translate()
    for seed in range(5):
        shuffled = list(case.objects)
        random.Random(seed).shuffle(shuffled)
        again = case.translate(shuffled)
        assert _serialized(again) == _serialized(baseline)
        assert list(again.addresses) == list(baseline.addresses)
        assert again.statuses == baseline.statuses


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_input_order_gives_identical_bytes(data: st.DataObject) -> None:
    case = load_case(data.draw(st.sampled_from(all_case_names())))
    permuted = data.draw(st.permutations(case.objects))
    assert _serialized(case.translate(permuted)) == _serialized(case.translate())


@pytest.mark.parametrize("name", all_case_names())
def test_translate_does_not_mutate_inputs(name: str) -> None:
    case = load_case(name)
    before = copy.deepcopy(case.objects)
    case.translate()
    assert case.objects == before


def _replace(objects: list[dict[str, Any]], kind: str, namespace: str, name: str,
             change: dict[str, Any]) -> list[dict[str, Any]]:
    result = copy.deepcopy(objects)
    for obj in result:
        if (obj.get("kind"), obj["metadata"].get("namespace"), obj["metadata"]["name"]) == (kind, namespace, name):
            obj.update(change)
    return result


def test_a_pod_change_touches_only_that_workload() -> None:
    case = load_case("services")
    before = _serialized(case.translate())
    changed = _replace(case.objects, "Pod", "shop", "web-2",
                       {"status": {"phase": "Running", "podIP": "10.244.2.30",
                                   "conditions": [{"type": "Ready", "status": "False"}]}})
    after = _serialized(case.translate(changed))
    assert {n for n in before if before[n] != after[n]} == {"Kubernetes//Pod/shop/web-2"}


def test_a_service_change_touches_the_service_and_its_workloads() -> None:
    case = load_case("services")
    before = _serialized(case.translate())
    changed = _replace(case.objects, "Service", "shop", "edge",
                       {"spec": {"clusterIP": "10.96.0.30", "selector": {"app": "edge"},
                                 "ports": [{"port": 8081, "targetPort": 8080}]}})
    after = _serialized(case.translate(changed))
    assert {n for n in before if before[n] != after[n]} == {"shop/edge.shop.svc.cluster.local",
                                                            "Kubernetes//Pod/shop/edge-1"}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    result = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            result += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            result += _paths(v, (*prefix, i))
    return result


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_malformed_objects_never_crash_translation(data: st.DataObject) -> None:
    """Objects come from users: any field of any kind may hold any JSON value."""
    case = load_case(data.draw(st.sampled_from(all_case_names())))
    objects = copy.deepcopy(case.objects)
    for _ in range(data.draw(st.integers(1, 4))):
        obj = data.draw(st.sampled_from(objects))
        path = data.draw(st.sampled_from(_paths(obj)))
        if path[:1] in (("kind",), ("apiVersion",)):
            continue
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = data.draw(_JSON)
    case.translate(objects)
