"""Test helper: a real TLS 1.3 handshake in memory (ssl.MemoryBIO), to prove that certificates issued by the
signer work for HBONE's mTLS (PROTOCOLS.md §6) and for the control plane's serving port."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path
from typing import Any


def _context(side: int, chain_pem: str | None, key_pem: str | None, root_pem: str, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=root_pem)
    if chain_pem and key_pem:
        cert, key = tmp / f"{side}.crt", tmp / f"{side}.key"
        cert.write_text(chain_pem)
        key.write_text(key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


def handshake(server: tuple[str, str], root_pem: str, client: tuple[str, str] | None = None,
              server_hostname: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run a handshake; → (server cert as seen by the client, client cert as seen by the server).
    Raises `ssl.SSLError` when either side refuses the other."""
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sctx = _context(ssl.PROTOCOL_TLS_SERVER, server[0], server[1], root_pem, tmp)
        if client:
            sctx.verify_mode = ssl.CERT_REQUIRED
        cctx = _context(ssl.PROTOCOL_TLS_CLIENT, client[0] if client else None, client[1] if client else None,
                        root_pem, tmp)
        cctx.check_hostname = server_hostname is not None
        s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = sctx.wrap_bio(s_in, s_out, server_side=True)
        cli = cctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
        done = {id(srv): False, id(cli): False}
        for _ in range(20):
            for end in (cli, srv):
                if not done[id(end)]:
                    try:
                        end.do_handshake()
                        done[id(end)] = True
                    except ssl.SSLWantReadError:
                        pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done.values()):
                break
        else:
            raise AssertionError("handshake did not complete")
        # TLS 1.3: the server judges the client certificate after the client has finished; one byte through
        # makes a rejection surface on both ends.
        cli.write(b"x")
        s_in.write(c_out.read())
        assert srv.read(1) == b"x"
        return cli.getpeercert() or {}, srv.getpeercert() if client else None
