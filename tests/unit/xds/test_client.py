from __future__ import annotations

import random
from pathlib import Path

import pytest

from ambient.xds.client import Backoff, ClientConfig, XdsClient
from ambient.xds.errors import XdsConnectionError
from ambient.xds.store import WorkloadStore


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.1, 15.0, rng=random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    nominal = [min(0.1 * 2**i, 15.0) for i in range(12)]
    for delay, cap in zip(delays, nominal, strict=True):
        assert cap / 2 <= delay <= cap
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_auth_metadata_is_bearer_token_and_cluster_id(tmp_path: Path) -> None:
    client = XdsClient(ClientConfig("cp:15012", "node", cluster_id="east", token="t0k"), WorkloadStore())
    assert client._metadata() == (("clusterid", "east"), ("authorization", "Bearer t0k"))
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    client = XdsClient(ClientConfig("cp:15012", "node", token="ignored", token_file=token_file), WorkloadStore())
    assert client._metadata() == (("clusterid", "Kubernetes"), ("authorization", "Bearer from-file"))


def test_missing_token_file_is_an_actionable_connection_error(tmp_path: Path) -> None:
    client = XdsClient(ClientConfig("cp:15012", "node", token_file=tmp_path / "nope"), WorkloadStore())
    with pytest.raises(XdsConnectionError, match=r"cannot read the xDS token file .*nope: No such file") as caught:
        client._metadata()
    assert caught.value.reason == "token"
