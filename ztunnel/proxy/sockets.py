"""Sockets ztunnel creates inside a pod's network namespace, with the options PROTOCOLS §2 requires.

Every socket ztunnel makes in a pod netns carries `SO_MARK` 1337, so the pod's redirection rules let it
through; listeners also get `SO_REUSEPORT` (an old and a new ztunnel, or several workers, overlap) and
`IP_TRANSPARENT`. Sockets to the pod's own app bind to the original client's address (`IP_TRANSPARENT`)
so the app sees the real caller; the connmark rules route the replies back.
These functions must run on the pod's `NetnsExecutor` thread.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ZTUNNEL_MARK = 1337  # 0x539, PROTOCOLS §2
SO_MARK = 36
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
LISTEN_BACKLOG = 1024


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listener(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(_family(host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, ZTUNNEL_MARK)
        if _family(host) == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


def outbound(host: str, bind_ip: str | None = None, transparent: bool = False) -> socket.socket:
    """An unconnected, marked TCP socket for connecting to `host` (optionally from `bind_ip`)."""
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, ZTUNNEL_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if transparent:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        if bind_ip:
            sock.bind((bind_ip, 0))
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


def udp(family: socket.AddressFamily) -> socket.socket:
    """A marked UDP socket (DNS forwarding from inside a pod)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, ZTUNNEL_MARK)
    sock.setblocking(False)
    return sock


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed connection was going (PROTOCOLS §1: SO_ORIGINAL_DST)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port
