"""The committed protobuf modules must be what `scripts/gen-protos.sh` makes from the .proto files, and
the wire facts of PROTOCOLS.md must hold in them (field numbers, package names, type URLs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ambient.proto import authorization_pb2, ca_pb2, discovery_pb2, workload_pb2, zds_pb2

REPO = Path(__file__).resolve().parents[3]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(["bash", "scripts/gen-protos.sh", str(tmp_path)], cwd=REPO, check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "the generator produced nothing"
    stale = [str(rel) for rel in generated if (REPO / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"regenerate with scripts/gen-protos.sh: {stale}"


def test_full_names_match_istio() -> None:
    assert workload_pb2.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert authorization_pb2.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    assert zds_pb2.WorkloadRequest.DESCRIPTOR.full_name == "istio.workload.zds.WorkloadRequest"
    assert ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].full_name == \
        "istio.v1.auth.IstioCertificateService"
    assert discovery_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name == \
        "envoy.service.discovery.v3.AggregatedDiscoveryService"


def test_field_numbers_are_wire_facts() -> None:
    fields = {f.name: f.number for f in workload_pb2.Workload.DESCRIPTOR.fields}
    assert fields["uid"] == 20 and fields["addresses"] == 3 and fields["services"] == 22
    assert fields["authorization_policies"] == 16 and fields["capacity"] == 27
    request = {f.name: f.number for f in zds_pb2.WorkloadRequest.DESCRIPTOR.fields}
    assert request == {"add": 1, "del": 2, "snapshot_sent": 3, "keep": 5}
    assert {f.name: f.number for f in zds_pb2.DelWorkload.DESCRIPTOR.fields} == {"uid": 2}
    match = {f.name: f.number for f in authorization_pb2.Match.DESCRIPTOR.fields}
    assert match["destination_ports"] == 9 and match["not_service_accounts"] == 12
    ca = {f.name: f.number for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    assert ca == {"csr": 1, "validity_duration": 3, "metadata": 4}
