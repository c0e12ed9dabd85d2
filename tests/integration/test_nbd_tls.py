"""NBD over TLS (NBD_OPT_STARTTLS) against the real daemon, with real clients.

The PKI is made here with certtool and psktool: a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a second CA with a client
certificate of its own (the "wrong certificate"). The daemon listens on TCP
(nbd.tls defaults to require once `tls` is configured) and on its Unix socket
with nbd.unix_tls: allow, so one daemon shows both modes.

nbd-tester-client is not packaged in Debian; its modes are covered here by
tests named after them: test_tls (tls), test_tlshuge (tlshuge),
test_tlswrongcert (tlswrongcert), test_integrityhuge (integrityhuge).
"""
import os
import socket
import ssl
import struct
import subprocess

import pytest

from conftest import require
from nbd_targets import (CMD_READ, CMD_WRITE, IHAVEOPT, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
                         OPT_INFO, OPT_LIST, OPT_SET_META_CONTEXT, OPT_STARTTLS,
                         OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_UNSUP,
                         SIMPLE_REPLY_MAGIC, RawClient, free_tcp_port)
from rpointd_harness import Daemon
from tls_pki import make_ca, make_cert

REP_ERR_TLS_REQD = 2**31 + 5
INFO_BLOCK_SIZE = 3
MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require("certtool", "psktool")
    root = tmp_path_factory.mktemp("pki")
    good = root / "pki"  # the server's tls.dir and the good client's directory alike
    make_ca(good, "rpointd test CA")
    make_cert(good, good, "server", "localhost",
              'dns_name = "localhost"\nip_address = "127.0.0.1"\n')
    make_cert(good, good, "client", "good-client")
    # tlswrongcert: trusts the right CA (so it accepts the server) but presents
    # a certificate signed by another one.
    other_ca = root / "other-ca"
    make_ca(other_ca, "some other CA")
    wrong = root / "wrong"
    wrong.mkdir()
    make_cert(other_ca, wrong, "client", "intruder")
    (wrong / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
    # A client with the CA but no certificate at all.
    nocert = root / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((good / "ca-cert.pem").read_bytes())
    psk = root / "keys.psk"
    subprocess.run(["psktool", "-u", "alice", "-p", str(psk)], check=True, capture_output=True)
    wrong_psk = root / "wrong.psk"
    subprocess.run(["psktool", "-u", "alice", "-p", str(wrong_psk)], check=True,
                   capture_output=True)
    mallory = root / "mallory.psk"  # an identity the server does not know
    subprocess.run(["psktool", "-u", "mallory", "-p", str(mallory)], check=True,
                   capture_output=True)
    return {"mallory": mallory, "dir": good, "wrong": wrong, "nocert": nocert, "psk": psk, "wrong_psk": wrong_psk}


@pytest.fixture
def tls_daemon(tmp_path, pki):
    port = free_tcp_port()
    cfg = (f'nbd:\n  tcp: "127.0.0.1:{port}"\n  unix_tls: allow\n'
           f'tls:\n  dir: {pki["dir"]}\n  psk_file: {pki["psk"]}\n')
    d = Daemon(tmp_path / "state", config_text=cfg).start()
    d.port = port
    d.create_disk("d", 64 * MiB)
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0, d.log()
    elif d.proc is not None:
        pytest.fail(f"rpointd died (rc={d.proc.returncode}):\n{d.log()}")


def x509_uri(d, pki_dir, export="d"):
    return f"nbds://127.0.0.1:{d.port}/{export}?tls-certificates={pki_dir}"


def psk_uri(d, psk_file, export="d"):
    return f"nbds://alice@127.0.0.1:{d.port}/{export}?tls-psk-file={psk_file}"


def tcp_raw(port):
    c = RawClient.__new__(RawClient)
    c.s = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.structured = False
    c.size = c.tx_flags = None
    return c


def client_context(pki):
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki["dir"] / "client-cert.pem"), str(pki["dir"] / "client-key.pem"))
    return ctx


def starttls(c, pki):
    c.option(OPT_STARTTLS)
    assert c.opt_reply()[1] == REP_ACK
    c.s = client_context(pki).wrap_socket(c.s, server_hostname="localhost")


def go_with(c, name, infos=()):
    n = name.encode()
    c.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) +
             b"".join(struct.pack(">H", i) for i in infos))
    while True:
        _, rtype, _ = c.opt_reply()
        if rtype != 3:  # NBD_REP_INFO
            return rtype


def nbdcopy(*args):
    subprocess.run(["nbdcopy", *args], check=True, capture_output=True, timeout=60)


def test_tls(tls_daemon, pki, tmp_path):
    """X.509 with nbdinfo and nbdcopy: data written over TLS reads back."""
    require("nbdinfo", "nbdcopy")
    uri = x509_uri(tls_daemon, pki["dir"])
    out = subprocess.run(["nbdinfo", "--json", uri], check=True, capture_output=True, text=True)
    assert '"export-size": 67108864' in out.stdout
    src, back = tmp_path / "src", tmp_path / "back"
    data = os.urandom(8 * MiB)
    src.write_bytes(data)
    nbdcopy(str(src), uri)
    nbdcopy(uri, str(back))
    assert back.read_bytes()[:len(data)] == data
    assert "TLS established" in tls_daemon.log()


def test_tls_psk_libnbd(tls_daemon, pki):
    """PSK (psktool file) with python3-libnbd and nbdinfo."""
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(pki["psk"]))
    h.set_tls_username("alice")
    h.set_export_name("d")
    h.connect_tcp("127.0.0.1", str(tls_daemon.port))
    data = os.urandom(1 * MiB)
    h.pwrite(data, 4096)
    h.flush()
    assert h.pread(len(data), 4096) == data
    h.shutdown()
    require("nbdinfo")
    subprocess.run(["nbdinfo", psk_uri(tls_daemon, pki["psk"])], check=True, capture_output=True)
    assert "psk 'alice'" in tls_daemon.log()


def test_tls_wrong_psk_refused(tls_daemon, pki):
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(pki["wrong_psk"]))
    h.set_tls_username("alice")
    h.set_export_name("d")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(tls_daemon.port))
        h.pread(512, 0)  # TLS 1.3: a refusal may surface on the first read
    assert "TLS handshake failed" in tls_daemon.log()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(pki["mallory"]))
    h.set_tls_username("mallory")  # not in the server's file
    h.set_export_name("d")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(tls_daemon.port))
        h.pread(512, 0)
    assert tls_daemon.log().count("TLS handshake failed") >= 2


def test_tls_qemu(tls_daemon, pki):
    """qemu-io and qemu-img with tls-creds-x509: write, read back, info."""
    require("qemu-io", "qemu-img")
    obj = f"tls-creds-x509,id=tls0,dir={pki['dir']},endpoint=client"
    opts = f"driver=nbd,host=127.0.0.1,port={tls_daemon.port},export=d,tls-creds=tls0"
    w = subprocess.run(["qemu-io", "--object", obj, "--image-opts", opts, "-c",
                        "write -P 0xa5 1M 2M"], capture_output=True, text=True, timeout=60)
    assert w.returncode == 0 and "wrote" in w.stdout, w.stdout + w.stderr
    r = subprocess.run(["qemu-io", "--object", obj, "--image-opts", opts, "-c",
                        "read -P 0xa5 1M 2M"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    info = subprocess.run(["qemu-img", "info", "--object", obj, "--image-opts", opts],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "64 MiB" in info.stdout, info.stdout + info.stderr


def test_plaintext_client_refused_with_tls_reqd(tls_daemon):
    """Every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD; EXPORT_NAME closes."""
    c = tcp_raw(tls_daemon.port)
    c.greeting()
    for opt, data in ((OPT_GO, struct.pack(">I", 1) + b"d" + b"\0\0"),
                      (OPT_INFO, struct.pack(">I", 1) + b"d" + b"\0\0"), (OPT_LIST, b""),
                      (OPT_STRUCTURED_REPLY, b""), (0x7777, b"")):
        c.option(opt, data)
        got_opt, rtype, msg = c.opt_reply()
        assert (got_opt, rtype) == (opt, REP_ERR_TLS_REQD), (opt, rtype)
        assert b"TLS" in msg
    c.option(OPT_ABORT)
    assert c.opt_reply()[1] == REP_ACK
    c.close()
    c = tcp_raw(tls_daemon.port)
    c.greeting()
    c.option(OPT_EXPORT_NAME, b"d")
    assert c.closed_by_server()
    c.close()
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_export_name("d")
    with pytest.raises(nbd.Error):
        h.connect_tcp("127.0.0.1", str(tls_daemon.port))


def test_tlswrongcert(tls_daemon, pki):
    """A client certificate from another CA, or none, is refused; no data flows."""
    require("nbdinfo")
    for d in (pki["wrong"], pki["nocert"]):
        r = subprocess.run(["nbdinfo", x509_uri(tls_daemon, d)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0, r.stdout
        assert "export-size" not in r.stdout
    assert "TLS handshake failed" in tls_daemon.log()
    # And the raw view: the handshake itself fails.
    c = tcp_raw(tls_daemon.port)
    c.greeting()
    c.option(OPT_STARTTLS)
    assert c.opt_reply()[1] == REP_ACK
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki["wrong"] / "client-cert.pem"), str(pki["wrong"] / "client-key.pem"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s = ctx.wrap_socket(c.s, server_hostname="localhost")
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
        if not s.recv(20):
            raise ConnectionError("closed")
    c.s.close()


def test_starttls_resets_structured_reply(tls_daemon, pki):
    """CVE-2021-3716: STRUCTURED_REPLY and a meta context chosen in plaintext do not
    survive STARTTLS (allow mode, on the Unix socket)."""
    c = RawClient(tls_daemon.nbd_sock)
    c.greeting()
    c.option(OPT_STRUCTURED_REPLY)
    assert c.opt_reply()[1] == REP_ACK
    q = b"base:allocation"
    c.option(OPT_SET_META_CONTEXT, struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, len(q)) + q)
    while c.opt_reply()[1] != REP_ACK:
        pass
    starttls(c, pki)
    # Structured replies are off again: SET_META_CONTEXT needs them first.
    c.option(OPT_SET_META_CONTEXT, struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, len(q)) + q)
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.option(OPT_STARTTLS)  # once is enough
    assert c.opt_reply()[1] == REP_ERR_INVALID
    assert go_with(c, "d") == REP_ACK
    c.request(CMD_READ, 0, 4096, cookie=9)
    magic = struct.unpack(">I", c.recv_exact(4))[0]
    assert magic == SIMPLE_REPLY_MAGIC  # not a structured chunk
    err, cookie = struct.unpack(">IQ", c.recv_exact(12))
    assert (err, cookie) == (0, 9)
    assert len(c.recv_exact(4096)) == 4096
    c.close()


def test_allow_mode_serves_plaintext(tls_daemon):
    """allow: a client that never sends STARTTLS is served as before."""
    c = RawClient(tls_daemon.nbd_sock).connect("d")
    c.request(CMD_READ, 0, 512, cookie=3)
    assert c.reply(512)[:2] == (0, 3)
    c.close()


def huge_write_read(c, size=48 * MiB):
    data = os.urandom(size)
    c.request(CMD_WRITE, 0, size, cookie=1, payload=data)
    assert c.reply()[:2] == (0, 1)
    c.request(CMD_READ, 0, size, cookie=2)
    err, cookie, got = c.reply(size)
    assert (err, cookie) == (0, 2)
    assert got == data


def test_integrityhuge(tls_daemon):
    """A client that did not ask for block sizes sends 48 MiB requests: accepted
    (up to 64 MiB, as nbdkit does)."""
    c = RawClient(tls_daemon.nbd_sock)
    c.greeting()
    assert go_with(c, "d") == REP_ACK
    huge_write_read(c)
    c.close()
    # EXPORT_NAME clients never see block sizes either.
    c = RawClient(tls_daemon.nbd_sock)
    c.greeting()
    c.option(OPT_EXPORT_NAME, b"d")
    c.recv_exact(10)  # size, flags (NO_ZEROES)
    huge_write_read(c, 40 * MiB)
    c.close()
    # A client that asked for them is held to the advertised 32 MiB.
    c = RawClient(tls_daemon.nbd_sock)
    c.greeting()
    assert go_with(c, "d", infos=(INFO_BLOCK_SIZE,)) == REP_ACK
    c.request(CMD_READ, 0, 48 * MiB, cookie=5)
    assert c.reply()[:2] == (22, 5)  # EINVAL
    c.close()


def test_tlshuge(tls_daemon, pki):
    """integrityhuge over TLS (TCP, require mode): 48 MiB requests cross intact."""
    c = tcp_raw(tls_daemon.port)
    c.greeting()
    starttls(c, pki)
    assert go_with(c, "d") == REP_ACK
    huge_write_read(c)
    # Many small pipelined requests over TLS too.
    for i in range(64):
        c.request(CMD_WRITE, i * 4096, 4096, cookie=100 + i, payload=bytes([i]) * 4096)
    for _ in range(64):
        assert c.reply()[0] == 0
    c.request(CMD_READ, 63 * 4096, 4096, cookie=7)
    assert c.reply(4096) == (0, 7, bytes([63]) * 4096)
    c.close()


def test_starttls_refused_without_tls(daemon):
    """No `tls` configured: STARTTLS is NBD_REP_ERR_UNSUP and haggling goes on."""
    c = RawClient(daemon.nbd_sock)
    c.greeting()
    c.option(OPT_STARTTLS)
    assert c.opt_reply()[1] == REP_ERR_UNSUP
    c.option(OPT_ABORT)
    assert c.opt_reply()[1] == REP_ACK
    c.close()


def test_starttls_ignores_plaintext_sent_after_it(tls_daemon):
    """Bytes a client (or a man in the middle) sends in plaintext right after
    STARTTLS are TLS input, never options: the handshake fails, nothing is
    answered in plaintext."""
    c = tcp_raw(tls_daemon.port)
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
    assert c.opt_reply()[1] == REP_ACK
    rest = b""
    c.s.settimeout(10)
    try:
        while True:
            chunk = c.s.recv(65536)
            if not chunk:
                break
            rest += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    assert struct.pack(">Q", 0x3E889045565A9) not in rest  # no option reply in the clear
    c.close()


def test_tls_syscalls_stay_inside_the_units_filter(tmp_path, pki):
    """The TLS paths (GnuTLS start-up, handshake, encrypted transfer) make no
    system call outside rpointd.service's SystemCallFilter= (see
    test_daemon.test_syscalls_stay_inside_the_units_filter)."""
    import signal
    from test_daemon import assert_trace_inside_unit_filter, get_root, wait_for
    from rpointd_harness import RPOINTD, UnixHTTPConnection
    require("strace", "systemd-analyze", "nbdcopy")
    trace, state, cfg = tmp_path / "trace", tmp_path / "state", tmp_path / "r.yaml"
    port = free_tcp_port()
    cfg.write_text(f'nbd:\n  tcp: "127.0.0.1:{port}"\ntls:\n  dir: {pki["dir"]}\n'
                   f'  psk_file: {pki["psk"]}\n')
    with open(tmp_path / "strace.log", "wb") as log:
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), RPOINTD, "--state-dir",
                                 str(state), "--config", str(cfg)], stdout=log, stderr=log)
    try:
        wait_for(lambda: get_root(str(state / "control.sock")) == 200, what="rpointd under strace")
        conn = UnixHTTPConnection(str(state / "control.sock"))
        conn.request("PUT", "/disks/sc", body='{"properties": {"sizeBytes": 4194304}}',
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status in (200, 201)
        conn.close()
        data = tmp_path / "data"
        data.write_bytes(os.urandom(4 << 20))
        uri = f"nbds://127.0.0.1:{port}/sc?tls-certificates={pki['dir']}"
        subprocess.run(["nbdcopy", str(data), uri], check=True, timeout=60)
        subprocess.run(["nbdcopy", uri, str(tmp_path / "back")], check=True, timeout=60)
        assert (tmp_path / "back").read_bytes() == data.read_bytes()
        os.kill(int((state / "rpointd.lock").read_text()), signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_trace_inside_unit_filter(trace)
