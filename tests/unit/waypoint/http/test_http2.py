"""HTTP/2 header mapping without sockets: pseudo-headers apart, cookies joined, hop-by-hop dropped (te:
trailers kept), framing headers left to the writer."""

from __future__ import annotations

from waypoint.http.http2 import decode_fields, encode_fields
from waypoint.http.message import Headers


def test_decode_separates_pseudo_headers_and_joins_cookies() -> None:
    pseudo, fields = decode_fields([(b":method", b"POST"), (b":path", b"/svc.Greeter/Hello"),
                                    (b":authority", b"g:50051"), (b":scheme", b"http"), (b"cookie", b"a=1"),
                                    (b"content-type", b"application/grpc"), (b"cookie", b"b=2"), (b"te", b"trailers"),
                                    (b"x-bin", b"\xff\x00")])
    assert pseudo == {":method": "POST", ":path": "/svc.Greeter/Hello", ":authority": "g:50051", ":scheme": "http"}
    assert fields == [("content-type", "application/grpc"), ("te", "trailers"), ("x-bin", "\xff\x00"),
                      ("cookie", "a=1; b=2")]


def test_encode_drops_hop_by_hop_host_and_length_unless_asked() -> None:
    headers = Headers([("connection", "close"), ("te", "trailers"), ("te", "gzip"), ("host", "h"),
                       ("content-length", "5"), ("x-a", "é"), ("x-u", "\u2713")])
    out: list[tuple[bytes, bytes]] = []
    encode_fields(headers, out, keep_length=False)
    assert out == [(b"te", b"trailers"), (b"x-a", b"\xe9"), (b"x-u", "\u2713".encode())]
    kept: list[tuple[bytes, bytes]] = []
    encode_fields(Headers([("content-length", "5")]), kept, keep_length=True)
    assert kept == [(b"content-length", b"5")]
