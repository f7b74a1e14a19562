"""The pure parts of `ztunnel.workers`: merging the workers' metrics pages and config dumps into the main's,
and the config handed to a worker on its command line."""

from __future__ import annotations

from typing import Any

from ztunnel.config import ZtunnelConfig
from ztunnel.workers import config_from_json, config_json, merge_config_dumps, merge_metrics

OPENED = "istio_tcp_connections_opened_total"
ODD_SERIES = OPENED + '{reporter="source",destination_workload="a b} c",source_principal="x\\"y"}'


def page(opened: int, odd: int, *, start: float, cpu: float, proxies: int) -> str:
    return (f"# HELP {OPENED} The total number of TCP connections opened\n"
            f"# TYPE {OPENED} counter\n"
            f'{OPENED}{{reporter="destination"}} {opened}\n'
            f"{ODD_SERIES} {odd}\n"
            "# HELP workload_manager_active_proxy_count The total number current workloads with active proxies\n"
            "# TYPE workload_manager_active_proxy_count gauge\n"
            f"workload_manager_active_proxy_count {proxies}\n"
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
            "# TYPE process_cpu_seconds_total counter\n"
            f"process_cpu_seconds_total {cpu}\n"
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n"
            "# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {start}\n"
            "# HELP process_max_fds Maximum number of open file descriptors.\n"
            "# TYPE process_max_fds gauge\n"
            "process_max_fds 1048576.0\n")


def test_counters_sum_across_workers_and_pod_counts_do_not() -> None:
    merged = merge_metrics([page(3, 1, start=1700000100.5, cpu=0.25, proxies=4),
                            page(4, 2, start=1700000000.25, cpu=1.5, proxies=4)])
    lines = merged.splitlines()
    assert f'{OPENED}{{reporter="destination"}} 7' in lines
    assert f"{ODD_SERIES} 3" in lines  # label values with spaces, braces and quotes keep their series apart
    assert "workload_manager_active_proxy_count 4" in lines  # each worker proxies the same 4 pods
    assert "process_cpu_seconds_total 1.75" in lines
    assert "process_start_time_seconds 1700000000.25" in lines  # the oldest process
    assert "process_max_fds 1048576" in lines
    assert merged.count(f"# TYPE {OPENED} counter") == 1 and merged.count(f"# HELP {OPENED} ") == 1
    # each family's samples follow its own HELP/TYPE header
    assert lines.index(f"# TYPE {OPENED} counter") < lines.index(f'{OPENED}{{reporter="destination"}} 7') < \
        lines.index("# TYPE workload_manager_active_proxy_count gauge")


def test_a_family_only_one_page_has_keeps_its_header_and_an_empty_family_is_kept() -> None:
    main = f"# HELP {OPENED} opened\n# TYPE {OPENED} counter\n"
    worker = f'# HELP {OPENED} opened\n# TYPE {OPENED} counter\n{OPENED}{{reporter="source"}} 2\n' \
             "# HELP up_total x\n# TYPE up_total counter\nup_total 1\n"
    merged = merge_metrics([main, worker])
    assert merged == (f'# HELP {OPENED} opened\n# TYPE {OPENED} counter\n{OPENED}{{reporter="source"}} 2\n'
                      "# HELP up_total x\n# TYPE up_total counter\nup_total 1\n")


def dump(src: str, state: str = "Up", cert_state: str = "Available") -> dict[str, Any]:
    return {"workloads": [{"uid": "w1"}], "services": [], "policies": [], "config": {"workers": 2},
            "certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "state": cert_state}],
            "workloadState": {"uid-1": {"state": state, "info": {"name": "p"},
                                        "connections": {"inbound": [{"src": src}], "outbound": []}}}}


def test_config_dumps_merge_connections_per_pod_and_keep_the_worst_pod_state() -> None:
    merged = merge_config_dumps([dump("10.0.0.1:1", cert_state="Initializing"), dump("10.0.0.2:2", state="Pending")])
    pod = merged["workloadState"]["uid-1"]
    assert [c["src"] for c in pod["connections"]["inbound"]] == ["10.0.0.1:1", "10.0.0.2:2"]
    assert pod["state"] == "Pending"
    assert merged["certificates"] == [{"identity": "spiffe://cluster.local/ns/a/sa/b", "state": "Available"}]
    assert merged["workloads"] == [{"uid": "w1"}]


def test_config_dump_merge_leaves_the_workers_documents_alone() -> None:
    first = dump("10.0.0.1:1")
    merge_config_dumps([first, dump("10.0.0.2:2")])
    assert first["workloadState"]["uid-1"]["connections"]["inbound"] == [{"src": "10.0.0.1:1"}]


def test_the_config_a_worker_gets_is_the_mains() -> None:
    config = ZtunnelConfig(node_name="node-1", node_ip="172.30.0.11", admin_address=("172.30.0.11", 15000),
                           dns_upstreams=("172.30.0.1:53",), workers=4)
    assert config_from_json(config_json(config)) == config
