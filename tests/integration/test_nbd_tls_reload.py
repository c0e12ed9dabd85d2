"""TLS certificates reloaded on SIGHUP, without a restart (rpointd(8), SIGHUP).

A daemon serves NBD over TLS from its own tls.dir. Its server certificate is
replaced and SIGHUP sent: a new handshake presents the new certificate, a
connection made before goes on reading. Then a broken certificate file and
SIGHUP: the error is logged, and new handshakes still get the good one.
"""
import os
import ssl

import pytest

from conftest import require
from rpointd_harness import Daemon
from test_nbd_tls import OPT_STARTTLS, REP_ACK, make_ca, make_cert, tcp_raw, x509_uri
from nbd_targets import free_tcp_port

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

MiB = 1 << 20
SERVER_EXTRA = 'dns_name = "localhost"\nip_address = "127.0.0.1"\n'


def server_cert_seen(d, client_dir):
    """DER of the certificate a fresh STARTTLS handshake is given."""
    c = tcp_raw(d.port)
    c.greeting()
    c.option(OPT_STARTTLS)
    assert c.opt_reply()[1] == REP_ACK
    ctx = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    ctx.load_cert_chain(str(client_dir / "client-cert.pem"), str(client_dir / "client-key.pem"))
    c.s = ctx.wrap_socket(c.s, server_hostname="localhost")
    der = c.s.getpeercert(binary_form=True)
    c.s.close()
    return der


def der_of(pem_path):
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def test_sighup_reloads_the_server_certificate(tmp_path):
    require("certtool")
    ca, srv, cli = tmp_path / "ca", tmp_path / "srv", tmp_path / "cli"
    make_ca(ca, "reload test CA")
    srv.mkdir()
    cli.mkdir()
    make_cert(ca, srv, "server", "localhost", SERVER_EXTRA)
    make_cert(ca, cli, "client", "client")
    for d in (srv, cli):
        (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    port = free_tcp_port()
    cfg = f'nbd:\n  tcp: "127.0.0.1:{port}"\ntls:\n  dir: {srv}\n'
    d = Daemon(tmp_path / "state", config_text=cfg).start()
    d.port = port
    try:
        d.create_disk("d", 4 * MiB)
        first = der_of(srv / "server-cert.pem")
        assert server_cert_seen(d, cli) == first
        # A connection made with the first certificate.
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(x509_uri(d, cli))
        h.pwrite(b"k" * 4096, 0)

        # Renewed: a new key and certificate, each file replaced atomically.
        new = tmp_path / "new"
        new.mkdir()
        make_cert(ca, new, "server", "localhost", SERVER_EXTRA)
        for name in ("server-key.pem", "server-cert.pem"):
            os.replace(new / name, srv / name)
        second = der_of(srv / "server-cert.pem")
        assert second != first
        d.sighup_and_wait("SIGHUP: TLS credentials reloaded")
        assert server_cert_seen(d, cli) == second
        assert h.pread(4096, 0) == b"k" * 4096  # the old connection goes on
        h2 = nbd.NBD()
        h2.set_uri_allow_local_file(True)
        h2.connect_uri(x509_uri(d, cli))
        assert h2.pread(4096, 0) == b"k" * 4096
        h2.shutdown()

        # A broken certificate: logged, the credentials in use stay.
        (srv / "server-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
        d.sighup_and_wait("SIGHUP: keeping the TLS credentials in use")
        assert server_cert_seen(d, cli) == second
        assert h.pread(4096, 0) == b"k" * 4096
        h.shutdown()
        assert d.proc.poll() is None
    finally:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log()
