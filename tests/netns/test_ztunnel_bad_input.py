"""ztunnel's HBONE port under bad input (issue 5, "Bad input"): garbage, half-open TLS handshakes, HTTP/1.1,
huge header blocks and a client that never reads, each sent from the host straight at a meshed pod's
`podIP:15008`. None of them may disturb other connections (a meshed connection held open across the
attack, a new HBONE tunnel to the same port, a new meshed connection between pods) or make ztunnel's
memory or file descriptors grow beyond a fixed slack.

The target pod runs on node-1 with two containers: tcp-echo (9000, PREFIX=hello) and a firehose (9001)
that writes to every connection as fast as it can. The client certificate comes from the mesh CA with
node-1's ztunnel token, impersonating the target's own service account (the CA only signs identities of
pods on the caller's node), so the attacks with a valid certificate get past TLS and reach HTTP/2.

A dropped HBONE connection must be freed by reference counting alone (no full GC): ztunnel holds many
long-lived objects, so Python collects cycles rarely. The connection drops its transport in
`connection_lost`, and streams raise a fresh copy of their stored error, so no cycle pins them."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events
import h2.exceptions
import psutil
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes
from hpack.hpack import encode_integer
from hyperframe.frame import ContinuationFrame, HeadersFrame

from ambient.hbone.connection import HboneConfig
from ambient.hbone.tls import client_context
from ambient.identity.ca_client import CaClient, CaClientConfig
from ambient.identity.certs import WorkloadCertificate
from ambient.identity.spiffe import SpiffeId
from tests.netns.conftest import AMBIENTCTL, REPO, Cluster, eventually, skip_unless_root

NAMESPACE = "bookinfo"
TARGET = "bad-input-target"
TARGET_NODE = "node-1"
OTHER_NODE = "node-2"
ECHO_PORT = 9000
FIREHOSE_PORT = 9001
HBONE_PORT = 15008
CONTROL = "172.30.0.1"
MiB = 1 << 20
# ztunnel's memory may move by this much between samples whatever we do (allocator, pooled connections,
# metrics); every attack below would need several times as much if ztunnel buffered what it is sent.
RSS_SLACK = 32 * MiB
# What ztunnel may hold for one tunnel whose client does not read: the TLS transport's high-water mark
# (HboneConfig.write_buffer_high, 4 MiB) and the copies on the way to it (h2 output, TLS records, the relay's
# read from the app). Measured: 10-18 MiB. A reader ignoring backpressure would cost gigabytes.
STALLED_READER_BOUND = 32 * MiB
FD_SLACK = 8  # descriptors ztunnel may hold beyond its baseline (pooled HBONE connections, DNS)
SERVER = HboneConfig()  # ztunnel's HBONE settings: the limits the attacks below push against
SETTLE_TIMEOUT = SERVER.handshake_timeout + 5  # a stalled handshake is dropped after handshake_timeout

# In the target pod: write 64 KiB chunks to every connection until it breaks.
FIREHOSE = """
import socket, threading
srv = socket.create_server(("0.0.0.0", int(__import__("sys").argv[1])), backlog=64)
chunk = b"x" * 65536
def serve(conn):
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# In a meshed pod: one line to tcp-echo, print the answer.
ONE_SHOT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"ping\\n")
print(s.makefile().readline().strip(), flush=True)
"""

# In a meshed pod: one connection to tcp-echo kept busy with a numbered line every 0.1 s; each answer is
# printed. A stall of 5 s or a close ends it with a traceback or "closed".
HOLDER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
lines = s.makefile("rb")
deadline = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < deadline:
    n += 1
    s.sendall(b"%d\\n" % n)
    answer = lines.readline()
    if not answer:
        print("closed", flush=True)
        sys.exit(1)
    print(answer.decode().strip(), flush=True)
    time.sleep(0.1)
print("done", flush=True)
"""
HOLDER_LIFETIME = 600.0  # seconds: longer than this module ever runs


def manifest() -> dict[str, Any]:
    container = {"image": "ambient-py/samples"}
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": TARGET, "namespace": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": TARGET, "namespace": NAMESPACE},
         "spec": {"selector": {"app": TARGET}, "ports": [{"name": "tcp", "port": ECHO_PORT}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": TARGET, "namespace": NAMESPACE},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": TARGET}}, "template": {
             "metadata": {"labels": {"app": TARGET}},
             "spec": {"serviceAccountName": TARGET, "terminationGracePeriodSeconds": 0,
                      "nodeSelector": {"kubernetes.io/hostname": TARGET_NODE},
                      "containers": [
                          {**container, "name": "echo", "command": ["python3", "-m", "samples.tcp_echo.server"],
                           "env": [{"name": "PORT", "value": str(ECHO_PORT)}, {"name": "PREFIX", "value": "hello"}],
                           "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1}},
                          {**container, "name": "firehose",
                           "command": ["python3", "-c", FIREHOSE, str(FIREHOSE_PORT)]}]}}}}]}


# -- the meshed side --------------------------------------------------------------------------------------
@dataclass
class Holder:
    """HOLDER running in a pod, as a process this test owns (its own process group)."""

    process: subprocess.Popen[str]
    output: Path

    def answers(self) -> int:
        return sum(1 for line in self.output.read_text().splitlines() if line.startswith("hello "))

    def tail(self) -> str:
        return self.output.read_text()[-300:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def meshed_echo(cluster: Cluster, client_pod: str) -> str:
    """ONE_SHOT from a meshed pod to the target's Service: through both ztunnels and the target's 15008."""
    result = cluster.exec(client_pod, "python3", "-c", ONE_SHOT, f"{TARGET}.{NAMESPACE}", str(ECHO_PORT),
                          namespace=NAMESPACE, check=False)
    return result.stdout.strip() or result.stderr.strip()[-300:]


@dataclass
class Target:
    cluster: Cluster
    ip: str
    client_pod: str  # a meshed pod on the other node: its connections cross both ztunnels
    cert: WorkloadCertificate
    ztunnel: psutil.Process
    holder: Holder
    fd_baseline: int

    @property
    def authority(self) -> str:
        return f"{self.ip}:{ECHO_PORT}"

    def rss(self) -> int:
        return int(self.ztunnel.memory_info().rss)

    def others_unaffected(self, what: str) -> None:
        """Every other kind of connection still works."""
        before = self.holder.answers()
        with Http2(self.cert, self.ip) as fresh:
            assert fresh.echo(fresh.open(self.authority), "fresh") == b"hello fresh\n", f"new tunnel after {what}"
        assert meshed_echo(self.cluster, self.client_pod) == "hello ping", f"a new meshed connection after {what}"
        eventually(lambda: self.holder.answers() > before + 3, timeout=5,
                   what=f"the held meshed connection to keep echoing after {what}: {self.holder.tail()}")
        assert self.holder.process.poll() is None, self.holder.tail()

    def assert_memory_within(self, before: int, slack: int, what: str) -> int:
        rss = self.rss()
        assert rss <= before + slack, \
            f"ztunnel RSS {rss / MiB:.0f} MiB with {what}, {before / MiB:.0f} MiB before (slack {slack / MiB:.0f} MiB)"
        return rss

    def assert_descriptors_released(self, what: str) -> None:
        eventually(lambda: self.ztunnel.num_fds() <= self.fd_baseline + FD_SLACK, timeout=SETTLE_TIMEOUT,
                   what=f"ztunnel to close what {what} opened (baseline {self.fd_baseline} fds, "
                        f"now {self.ztunnel.num_fds()})")


def ready_pod(cluster: Cluster) -> dict[str, Any]:
    pods = cluster.pods(NAMESPACE, f"app={TARGET}")
    return pods[0] if pods and pods[0].get("status", {}).get("podIP") else {}


def enrolled(pod: dict[str, Any]) -> bool:
    return (pod["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"


def client_certificate(state: Path) -> WorkloadCertificate:
    """A certificate for the target's identity, as node-1's ztunnel would get it (test_cluster_control)."""
    token = (state / "nodes" / TARGET_NODE / "ztunnel" / "token").read_text().strip()
    root = (state / "pki" / "mesh-root.pem").read_text()

    async def fetch() -> WorkloadCertificate:
        ca = CaClient(CaClientConfig(address=f"{CONTROL}:15012", root_pem=root, impersonate=True), token)
        try:
            return await ca.fetch_certificate(SpiffeId("cluster.local", NAMESPACE, TARGET))
        finally:
            await ca.close()

    return asyncio.run(fetch())


def start_holder(cluster: Cluster, pod: str, output: Path) -> Holder:
    env = {**os.environ, "AMBIENT_STATE_DIR": str(cluster.state_dir)}
    env.pop("KUBECONFIG", None)
    with output.open("w") as out:
        process = subprocess.Popen(
            [*AMBIENTCTL, "exec", "-n", NAMESPACE, pod, "--", "python3", "-c", HOLDER, f"{TARGET}.{NAMESPACE}",
             str(ECHO_PORT), str(HOLDER_LIFETIME)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True)
    return Holder(process, output)


@pytest.fixture(scope="module")
def target(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    skip_unless_root()
    cluster.ctl("apply", "-f", "-", stdin=json.dumps(manifest()))
    cluster.ctl("label", "namespace", NAMESPACE, "istio.io/dataplane-mode=ambient")
    cluster.ctl("wait", "--for=condition=ready", "pod", "-l", f"app={TARGET}", "-n", NAMESPACE, "--timeout=60s")
    pod = eventually(lambda: (p := ready_pod(cluster)) and enrolled(p) and p, timeout=30, what="the target enrolled")
    client = eventually(lambda: next((p["metadata"]["name"] for p in cluster.pods(NAMESPACE)
                                      if p["spec"].get("nodeName") == OTHER_NODE and enrolled(p)), None),
                        timeout=30, what=f"a meshed bookinfo pod on {OTHER_NODE}")
    eventually(lambda: meshed_echo(cluster, client) == "hello ping", timeout=30, what="tcp-echo through the mesh")
    cert = client_certificate(cluster.state_dir)
    with Http2(cert, pod["status"]["podIP"]) as warmup:  # the target's certificate and TLS context exist now
        assert warmup.echo(warmup.open(f"{pod['status']['podIP']}:{ECHO_PORT}"), "warm") == b"hello warm\n"
    holder = start_holder(cluster, client, tmp_path_factory.mktemp("holder") / "out")
    try:
        eventually(lambda: holder.answers() >= 3, timeout=15, what=f"the held connection to echo: {holder.tail()}")
        ztunnel_pid = json.loads((cluster.state_dir / "pids" / f"ztunnel-{TARGET_NODE}.json").read_text())["pid"]
        ztunnel = psutil.Process(ztunnel_pid)
        yield Target(cluster, pod["status"]["podIP"], client, cert, ztunnel, holder, fd_baseline=ztunnel.num_fds())
    finally:
        holder.stop()


# -- the attacking side ----------------------------------------------------------------------------------
class Closed(Exception):
    """The server ended the connection."""


@dataclass
class Http2:
    """HTTP/2 over mTLS to a pod's 15008, driven by hand so that a test can misbehave on purpose."""

    cert: WorkloadCertificate
    ip: str
    stream_window: int | None = None  # advertise this window (stream and connection) instead of 64 KiB
    alpn: str = "h2"
    events: list[h2.events.Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        ctx = client_context(self.cert)
        ctx.set_alpn_protocols([self.alpn])
        self.sock = ctx.wrap_socket(socket.create_connection((self.ip, HBONE_PORT), timeout=5), server_hostname=None)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.closed = False
        if self.alpn == "h2":
            self.h2.initiate_connection()
            if self.stream_window:
                self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.stream_window})
                self.h2.increment_flow_control_window(self.stream_window - 65535)
            self.flush()

    def __enter__(self) -> Http2:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def flush(self) -> None:
        if data := self.h2.data_to_send():
            self.sock.sendall(data)

    def pump(self, timeout: float) -> list[h2.events.Event]:
        """One read; the events it produced. Raises `Closed` once the server has ended the connection."""
        if self.closed:
            raise Closed
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(MiB)
        except TimeoutError:
            return []
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            raise Closed
        events = self.h2.receive_data(data)
        self.events += events
        try:
            self.flush()
        except OSError:
            pass
        return events

    def wait_for(self, match: Callable[[h2.events.Event], bool], timeout: float = 5) -> h2.events.Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.pump(deadline - time.monotonic()):
                if match(event):
                    return event
        raise AssertionError(f"no matching HTTP/2 event within {timeout}s; got {self.events}")

    def wait_closed(self, timeout: float) -> None:
        """Read (and answer PINGs) until the server ends the connection; fail if it does not in time."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.pump(deadline - time.monotonic())
        except (Closed, h2.exceptions.ProtocolError):
            return
        raise AssertionError(f"the server kept the connection open for {timeout}s; events {self.events}")

    def open(self, authority: str, extra: list[tuple[bytes, bytes]] | None = None) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", authority.encode()), *(extra or [])])
        self.flush()
        response = self.wait_for(lambda e: isinstance(e, (h2.events.ResponseReceived, h2.events.StreamReset))
                                 and e.stream_id == stream_id)
        assert isinstance(response, h2.events.ResponseReceived), response
        assert dict(response.headers or [])[b":status"] == b"200", response.headers
        return stream_id

    def echo(self, stream_id: int, text: str) -> bytes:
        self.h2.send_data(stream_id, f"{text}\n".encode())
        self.flush()
        received = b""
        while not received.endswith(b"\n"):
            event = self.wait_for(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)
            assert isinstance(event, h2.events.DataReceived) and event.data is not None
            received += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        return received


def raw_connection(ip: str) -> socket.socket:
    return socket.create_connection((ip, HBONE_PORT), timeout=5)


def closed_by_server(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sent before closing; fails if it has not closed within `timeout`."""
    received = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server did not close the connection within {timeout}s (got {received[:80]!r})")


def client_hello(cert: WorkloadCertificate) -> bytes:
    """The first flight a real HBONE client sends: a TLS 1.3 ClientHello with our certificate's context."""
    outgoing = ssl.MemoryBIO()
    tls = client_context(cert).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=None)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def literal_header(name: bytes, value: bytes) -> bytes:
    """An HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2), no Huffman."""
    return b"\x00" + bytes(encode_integer(len(name), 7)) + name + bytes(encode_integer(len(value), 7)) + value


# -- the tests -------------------------------------------------------------------------------------------
def test_garbage_is_dropped_without_disturbing_other_connections(target: Target) -> None:
    random_bytes = [os.urandom(64 * 1024) for _ in range(20)]
    # A TLS handshake record header announcing 16 KiB, then junk: OpenSSL must give up, not wait for more.
    record_like = [b"\x16\x03\x01\x40\x00" + os.urandom(16 * 1024) for _ in range(20)]
    before = target.rss()
    socks = [raw_connection(target.ip) for _ in random_bytes + record_like]
    try:
        for sock, junk in zip(socks, random_bytes + record_like, strict=True):
            try:
                sock.sendall(junk)
            except ConnectionError:
                pass  # already refused
        for sock in socks:
            closed_by_server(sock, timeout=SETTLE_TIMEOUT)
    finally:
        for sock in socks:
            sock.close()
    target.others_unaffected("garbage")
    target.assert_memory_within(before, RSS_SLACK, "garbage sent")
    target.assert_descriptors_released("garbage")


def test_half_open_tls_handshakes_are_dropped_after_the_handshake_timeout(target: Target) -> None:
    hello = client_hello(target.cert)
    before = target.rss()
    silent = [raw_connection(target.ip) for _ in range(20)]  # TCP only, not a byte
    partial = [raw_connection(target.ip) for _ in range(20)]  # half a ClientHello, then nothing
    started = time.monotonic()
    try:
        for sock in partial:
            sock.sendall(hello[: len(hello) // 2])
        target.others_unaffected("40 stalled TLS handshakes")  # while they stall
        target.assert_memory_within(before, RSS_SLACK, "40 stalled TLS handshakes")
        for sock in silent + partial:
            closed_by_server(sock, timeout=max(0.0, started + SETTLE_TIMEOUT - time.monotonic()))
    finally:
        for sock in silent + partial:
            sock.close()
    target.assert_descriptors_released("half-open handshakes")


def test_http1_requests_get_no_answer_and_are_closed(target: Target) -> None:
    before = target.rss()
    # In plaintext: not TLS, so the handshake fails.
    for request in (f"GET / HTTP/1.1\r\nHost: {target.authority}\r\n\r\n",
                    f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n"):
        with raw_connection(target.ip) as sock:
            sock.sendall(request.encode())
            assert b"HTTP/1" not in closed_by_server(sock, timeout=5)
    # Over mutual TLS, offering only http/1.1: the HTTP/2 server sees no preface and closes.
    with Http2(target.cert, target.ip, alpn="http/1.1") as tls:
        assert tls.sock.selected_alpn_protocol() in (None, "http/1.1")
        tls.sock.sendall(f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}\r\n\r\n".encode())
        answer = closed_by_server(tls.sock, timeout=5)
        assert b"HTTP/1" not in answer and b"hello" not in answer, answer
    target.others_unaffected("HTTP/1.1 requests")
    target.assert_memory_within(before, RSS_SLACK, "HTTP/1.1 requests sent")
    target.assert_descriptors_released("HTTP/1.1 requests")


def test_huge_header_blocks_are_refused_without_buffering_them(target: Target) -> None:
    before = target.rss()
    # 1 MiB of ordinary headers on a CONNECT: refused (no 200), the connection ended.
    with Http2(target.cert, target.ip) as big:
        big.wait_for(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
        headers = [(f"x-filler-{i}".encode(), os.urandom(512).hex().encode()) for i in range(1024)]
        stream_id = big.h2.get_next_available_stream_id()
        big.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", target.authority.encode()), *headers])
        try:
            big.flush()
        except OSError:
            pass  # refused while we were still sending
        big.wait_closed(timeout=5)
        assert not any(isinstance(e, h2.events.ResponseReceived) for e in big.events), big.events
        assert any(isinstance(e, h2.events.ConnectionTerminated) for e in big.events), big.events
    # Header blocks that never end: HEADERS without END_HEADERS, then CONTINUATIONs of the largest frame
    # the server allows. Each must be refused long before it is buffered whole.
    block_mib, connections = 8, 8
    attackers = [Http2(target.cert, target.ip) for _ in range(connections)]
    try:
        for attacker in attackers:
            attacker.wait_for(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
            frame = attacker.h2.remote_settings.max_frame_size
            start = attacker.h2.encoder.encode([(b":method", b"CONNECT"), (b":authority", target.authority.encode())])
            filler = literal_header(b"x-filler", b"a" * (frame - 64))
            frames = [HeadersFrame(1, data=start + filler)] + [ContinuationFrame(1, data=filler)
                                                                for _ in range(block_mib * MiB // frame - 1)]
            try:
                for f in frames:
                    attacker.sock.sendall(f.serialize())
            except OSError:
                pass  # refused while we were still sending
        target.assert_memory_within(before, RSS_SLACK, f"{connections} unfinished {block_mib} MiB header blocks")
        for attacker in attackers:
            closed_by_server(attacker.sock, timeout=5)
    finally:
        for attacker in attackers:
            attacker.sock.close()
    target.others_unaffected("huge header blocks")
    target.assert_descriptors_released("huge header blocks")


def stall_readers(target: Target, readers: int) -> list[Http2]:
    """Tunnels to the firehose whose clients advertise a 2 GiB window and then never read: only the
    backpressure of each full socket may stop ztunnel from reading the firehose, which writes as fast as
    the loopback goes (gigabytes in the seconds a test takes)."""
    tunnels = [Http2(target.cert, target.ip, stream_window=2**31 - 1) for _ in range(readers)]
    firehose = f"{target.ip}:{FIREHOSE_PORT}"
    try:
        for tunnel in tunnels:
            eventually(functools.partial(_opened, tunnel, firehose), timeout=10, what="a tunnel to the firehose")
    except BaseException:
        for tunnel in tunnels:
            tunnel.sock.close()
        raise
    time.sleep(0.5)  # the measurement: let the buffers on the way fill up
    return tunnels


def test_a_client_that_never_reads_is_held_back_by_flow_control(target: Target) -> None:
    readers, stalled_for = 4, 2.0
    before = target.rss()
    tunnels = stall_readers(target, readers)
    try:
        settled = target.assert_memory_within(before, readers * STALLED_READER_BOUND,
                                              f"{readers} clients that never read")
        time.sleep(stalled_for)  # the measurement: does it keep growing while the firehose keeps writing?
        target.assert_memory_within(settled, 4 * MiB, f"{readers} readers stalled for {stalled_for:g}s more")
        target.others_unaffected(f"{readers} clients that never read")
    finally:
        for tunnel in tunnels:
            tunnel.sock.close()
    target.assert_descriptors_released("clients that never read")


def test_memory_of_dropped_tunnels_is_reused_by_the_next_ones(target: Target) -> None:
    # Each round stalls readers and then drops them (the client resets). What the first round made ztunnel
    # hold must be freed when its connections go, and so be enough for the next rounds.
    # A round's peak varies by what the stalled readers had buffered when sampled (10-18 MiB each); the
    # leak this guards against added ~60 MiB per round, so a 32 MiB bound over four rounds tells them apart.
    readers, rounds = 4, 4
    peaks = []
    for _ in range(rounds):
        tunnels = stall_readers(target, readers)
        peaks.append(target.rss())
        for tunnel in tunnels:
            tunnel.sock.close()
        target.assert_descriptors_released("clients that never read")
    assert max(peaks[1:]) <= peaks[0] + 32 * MiB, \
        f"each round of dropped readers kept memory: peaks {[round(p / MiB) for p in peaks]} MiB"


def _opened(tunnel: Http2, authority: str) -> bool:
    try:
        tunnel.open(authority)
    except AssertionError:
        return False  # 503 while the firehose container is still starting
    return True
