"""The peer API listener (peers.listen) against clients that never handshake.

A TCP connection that never starts its TLS handshake is cut after the
handshake deadline (30 s); at the cap of 64 connections the oldest one still
in its handshake is evicted for the newest, so silent sockets cannot lock
peers out. Authenticated connections are never evicted.
"""
import http.client
import json
import socket
import ssl
import time

import pytest

import tls_pki
from conftest import require
from rpointd_harness import start_on_free_port

SILENT = 100


@pytest.fixture
def peer_daemon(make_daemon, tmp_path):
    require("certtool")
    ca, pki = tmp_path / "ca", tmp_path / "pki"
    tls_pki.make_ca(ca, "rpointd peer listener test CA")
    pki.mkdir()
    tls_pki.make_cert(ca, pki, "server", "localhost", 'ip_address = "127.0.0.1"\n')
    tls_pki.make_cert(ca, pki, "client", "peer")
    (pki / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    d = make_daemon()
    port = start_on_free_port(d, lambda port: f'tls:\n  dir: {pki}\npeers:\n  listen: "127.0.0.1:{port}"\n')
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki / "client-cert.pem"), str(pki / "client-key.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return d, port, ctx


def hello(conn):
    conn.request("GET", "/peer/v1")
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body
    return json.loads(body)["service"]


def test_silent_connections_do_not_lock_peers_out(peer_daemon):
    d, port, ctx = peer_daemon
    early = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    assert hello(early) == "rpointd-peer"

    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(SILENT)]
    try:
        time.sleep(0.5)  # all accepted
        start = time.monotonic()
        late = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        assert hello(late) == "rpointd-peer"
        late.close()
        assert time.monotonic() - start < 10
        # The authenticated keep-alive connection made before the flood survived it.
        assert hello(early) == "rpointd-peer"
        # The oldest silent socket was evicted (EOF), the newest still waits.
        silent[0].settimeout(5)
        assert silent[0].recv(1) == b""
        silent[-1].settimeout(0.5)
        with pytest.raises(socket.timeout):
            silent[-1].recv(1)
    finally:
        for s in silent:
            s.close()
    early.close()
    assert d.proc.poll() is None


def test_silent_connection_is_cut_at_the_handshake_deadline(peer_daemon):
    d, port, ctx = peer_daemon
    s = socket.create_connection(("127.0.0.1", port), timeout=45)
    start = time.monotonic()
    try:
        assert s.recv(1) == b""
    finally:
        s.close()
    took = time.monotonic() - start
    assert 25 < took < 40, took
    assert "did not finish its TLS handshake" in d.log_all()
