"""Access grants (beginGetAccess / endGetAccess, docs/api.md "Access grants")
against the real daemon with real clients: the URI a grant hands out works in
nbdinfo, nbdcopy, qemu-img and libnbd on the TCP and the Unix listener; a
repeat returns the same URI with a later expiry; expiry, endGetAccess and
deleting the point cut readers off (an error, never more data); wrong tokens
are refused at the handshake with a clear message, each slower than the last;
the token is in no NBD_OPT_LIST, log line, GET listing or database file; and
grants survive a restart.
"""
import hashlib
import os
import secrets
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import require
from rpointd_harness import images_equal, nbd_save, nbd_write, operation_path

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
REFUSED = "unknown, expired or revoked access token"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def drp_path(c="c", rp="rp1", disk="a"):
    return f"/restorePointCollections/{c}/restorePoints/{rp}/diskRestorePoints/{disk}"


def begin(d, duration=60, listener=None, c="c", rp="rp1", disk="a", expect=202):
    body = {"access": "Read", "durationInSeconds": duration}
    if listener is not None:
        body["listener"] = listener
    r = d.api("POST", drp_path(c, rp, disk) + "/beginGetAccess", body)
    assert r.status == expect, r
    return r


def grant(d, duration=60, listener=None, **kw):
    """beginGetAccess: (uri, expiryTime, operation path)."""
    r = begin(d, duration, listener, **kw)
    op = operation_path(r)
    assert r.json["status"] == "Succeeded", r
    out = r.json["properties"]["output"]
    assert r.json["properties"]["kind"] == "BeginGetAccess"
    return out["accessSAS"], out["expiryTime"], op


def end(d, c="c", rp="rp1", disk="a"):
    r = d.api("POST", drp_path(c, rp, disk) + "/endGetAccess")
    assert r.status == 200, r
    return r.json["revoked"]


def token_of(uri):
    return uri.split("/")[3].split("?")[0]


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def refused(uri):
    """Connects with libnbd (asserting it fails), then asks again with a raw
    NBD_OPT_GO; returns the message the server's refusal carried (libnbd does
    not show it)."""
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        pass
    else:
        raise AssertionError(f"{uri} was accepted")
    finally:
        del h
    return raw_go(uri)


def raw_go(uri):
    """A fixed newstyle handshake by hand: NBD_OPT_GO for the URI's export;
    returns the error reply's message (asserts NBD_REP_ERR_UNKNOWN)."""
    if uri.startswith("nbd+unix:///"):
        name, sock_path = uri[len("nbd+unix:///"):].split("?socket=")
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
    else:
        hostport, name = uri[len("nbd://"):].split("/", 1)
        host, port = hostport.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    s.settimeout(30)

    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return buf

    try:
        assert read(16) == b"NBDMAGICIHAVEOPT"
        read(2)
        s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
        magic, opt, typ, length = struct.unpack(">QIII", read(20))
        assert magic == 0x3E889045565A9 and opt == 7, (magic, opt)
        assert typ == (1 << 31) + 6, f"reply type {typ:#x}, not NBD_REP_ERR_UNKNOWN"
        return read(length).decode()
    finally:
        s.close()


@pytest.fixture
def point(make_daemon):
    """A daemon with a TCP listener and a point c/rp1 of disk 'a' (8 MiB, data)."""
    port = free_port()
    d = make_daemon(config_text=f"nbd: {{tcp: '127.0.0.1:{port}'}}\n").start()
    d.port = port
    d.create_disk("a", 8 * MiB)
    data = [(i * MiB, secrets.token_bytes(64 << 10)) for i in range(8)]
    nbd_write(d.nbd_uri("a"), data)
    d.create_vm("web", ["a"])
    d.create_collection("c", "web")
    d.create_restore_point("c", "rp1")
    yield d
    if d.proc is not None:
        assert d.stop() == 0, d.log()


def test_grant_uris_work_in_every_client(point, tmp_path):
    require("nbdinfo", "nbdcopy", "qemu-img")
    d = point
    want = nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "want.raw")
    tcp, _, _ = grant(d)  # the default listener: tcp when nbd.tcp is set
    assert tcp.startswith(f"nbd://127.0.0.1:{d.port}/"), tcp
    unix, _, _ = grant(d, listener="unix")
    assert unix == f"nbd+unix:///{token_of(tcp)}?socket={d.nbd_sock}"
    tok = token_of(tcp)
    assert len(tok) == 64 and int(tok, 16) >= 0  # 256 bits, hex
    for i, uri in enumerate([tcp, unix]):
        r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert '"export-size": 8388608' in r.stdout and '"is_read_only": true' in r.stdout
        got = nbd_save(uri, tmp_path / f"nbdcopy{i}.raw")
        assert images_equal(want, got)[0]
        out = tmp_path / f"qemu{i}.raw"
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert images_equal(want, out)[0]
        h = connect(uri)
        assert h.is_read_only() and h.get_size() == 8 * MiB
        with open(want, "rb") as f:
            assert h.pread(MiB, 3 * MiB) == f.read(4 * MiB)[3 * MiB:]
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.shutdown()


def test_repeat_returns_the_same_uri_extended(point):
    d = point
    uri1, exp1, op1 = grant(d, 30)
    uri2, exp2, op2 = grant(d, 3600)
    assert uri2 == uri1 and exp2 > exp1 and op2 != op1
    # A shorter repeat never shortens it.
    uri3, exp3, _ = grant(d, 5)
    assert uri3 == uri1 and exp3 == exp2
    # The operation (Azure-AsyncOperation / Location) carries the URI too.
    r = d.api("GET", op1)
    assert r.status == 200 and r.json["status"] == "Succeeded", r
    assert r.json["properties"]["output"] == {"accessSAS": uri1, "expiryTime": exp2}
    assert r.json["properties"]["resourceId"] == drp_path()


def test_bad_requests(point, make_daemon):
    d = point
    path = drp_path() + "/beginGetAccess"
    for body, code in [({"access": "Write", "durationInSeconds": 5}, 400),
                       ({"access": "Read", "durationInSeconds": 0}, 400),
                       ({"access": "Read", "durationInSeconds": 10 ** 9}, 400),
                       ({"access": "Read"}, 400),
                       ({"access": "Read", "durationInSeconds": 5, "fileFormat": "VHD"}, 400),
                       ({"access": "Read", "durationInSeconds": 5, "listener": "udp"}, 400)]:
        r = d.api("POST", path, body)
        assert r.status == code and r.json["error"]["code"] == "InvalidArgument", (body, r)
    r = d.api("POST", drp_path(disk="nope") + "/beginGetAccess",
              {"access": "Read", "durationInSeconds": 5})
    assert r.status == 404, r
    r = d.api("POST", drp_path(rp="nope") + "/endGetAccess")
    assert r.status == 404, r
    assert end(d) is False  # nothing to revoke is not an error
    # A daemon with no TCP listener hands out Unix URIs and refuses 'tcp'.
    u = make_daemon("unix-only").start()
    u.create_disk("a", MiB)
    u.create_vm("web", ["a"])
    u.create_collection("c", "web")
    u.create_restore_point("c", "rp1")
    uri, _, _ = grant(u)
    assert uri.startswith("nbd+unix:///"), uri
    r = begin(u, listener="tcp", expect=400)
    assert "nbd.tcp" in r.json["error"]["message"]
    assert u.stop() == 0


def test_expiry_refuses_new_clients_and_cuts_open_ones(point):
    require("nbdinfo")
    d = point
    uri, _, op = grant(d, 2)
    h = connect(uri)
    assert len(h.pread(4096, 0)) == 4096
    time.sleep(2.6)
    with pytest.raises(nbd.Error):
        for _ in range(50):
            h.pread(4096, 0)
            time.sleep(0.02)
    r = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    assert REFUSED in refused(uri)
    assert d.api("GET", op).status == 404  # the operation went with the grant
    # A new grant after expiry is a new token.
    uri2, _, _ = grant(d, 60)
    assert uri2 != uri


def reader(uri, log, stop):
    """Reads 64 KiB blocks in a loop; logs (start, end, ok) per read."""
    h = connect(uri)
    off = 0
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                h.pread(64 << 10, off)
                log.append((t0, time.monotonic(), True))
            except nbd.Error:
                log.append((t0, time.monotonic(), False))
                return
            off = (off + (64 << 10)) % (8 * MiB)
    finally:
        del h


def assert_cut_off(log, t_cut):
    """Some reads succeeded before t_cut, an error came within 1 s of it, and no
    read started after t_cut returned data."""
    assert any(ok for _, _, ok in log), "no read succeeded before the cut"
    late = [(s, e) for s, e, ok in log if ok and s > t_cut]
    assert not late, f"{len(late)} read(s) started after the cut returned data"
    errors = [e for _, e, ok in log if not ok]
    assert errors and errors[0] - t_cut < 1.0, (errors, t_cut)


@pytest.mark.parametrize("listener", ["tcp", "unix"])
def test_revoke_mid_read_cuts_the_reader(point, listener):
    d = point
    uri, _, _ = grant(d, 600, listener=listener)
    # Another client of the same point by its name is not affected.
    other = connect(d.rp_uri("c", "rp1", "a"))
    log, stop = [], threading.Event()
    t = threading.Thread(target=reader, args=(uri, log, stop))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while sum(ok for _, _, ok in log) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert end(d) is True
        t_cut = time.monotonic()
        t.join(5)
        assert not t.is_alive(), "the reader was never cut off"
    finally:
        stop.set()
        t.join()
    assert_cut_off(log, t_cut)
    assert REFUSED in refused(uri)
    assert len(other.pread(4096, 0)) == 4096
    other.shutdown()


def test_deleting_the_point_revokes_its_grant(point):
    d = point
    uri, _, _ = grant(d, 600)
    log, stop = [], threading.Event()
    t = threading.Thread(target=reader, args=(uri, log, stop))
    t.start()
    try:
        while sum(ok for _, _, ok in log) < 20:
            time.sleep(0.01)
        d.delete_restore_point("c", "rp1")
        t_cut = time.monotonic()
        t.join(5)
        assert not t.is_alive()
    finally:
        stop.set()
        t.join()
    assert_cut_off(log, t_cut)
    # A new point of the same name is not covered by the old token.
    d.create_restore_point("c", "rp1")
    assert REFUSED in refused(uri)
    uri2, _, _ = grant(d)
    assert uri2 != uri


def test_unknown_and_guessed_tokens_are_refused_and_slowed(point):
    require("nbdinfo")
    d = point
    good, _, _ = grant(d, 600, listener="unix")
    # A token-shaped guess: a clear refusal that does not echo it, and no data.
    guess = secrets.token_hex(32)
    bad = f"nbd+unix:///{guess}?socket={d.nbd_sock}"
    r = subprocess.run(["nbdinfo", bad], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    assert raw_go(bad) == REFUSED  # the message does not echo the guess
    # The real token with one character changed, on TCP too.
    tok = token_of(good)
    near = tok[:-1] + ("0" if tok[-1] != "0" else "1")
    assert REFUSED in refused(f"nbd://127.0.0.1:{d.port}/{near}")
    # Each failure waits longer than the one before (100 ms doubling).
    times = []
    for _ in range(4):
        t0 = time.monotonic()
        assert REFUSED in refused(f"nbd+unix:///{secrets.token_hex(32)}?socket={d.nbd_sock}")
        times.append(time.monotonic() - t0)
    # At least two failures came before (nbdinfo's, the near miss): these are
    # the third to sixth, so each waited at least 0.4, 0.8, 1.6, 3.2 s.
    assert times[0] >= 0.4 and times[1] >= 0.8 and times[2] >= 1.6 and times[3] >= 3.2, times
    assert times[3] > times[0], times
    # The right token is never slowed.
    t0 = time.monotonic()
    h = connect(good)
    assert time.monotonic() - t0 < 1.5
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()
    # A name of another shape is just an unknown export, answered at once.
    t0 = time.monotonic()
    assert "unknown export" in refused(f"nbd+unix:///deadbeef?socket={d.nbd_sock}")
    assert time.monotonic() - t0 < 1.0
    assert guess not in d.log()


def test_token_is_never_listed_logged_or_stored(point, tmp_path):
    require("nbdinfo")
    d = point
    uri, _, op = grant(d, 600)
    tok = token_of(uri)
    # Used: connected, read, listed, revoked (the daemon logs at debug level).
    nbd_save(uri, tmp_path / "x.raw")
    for lst in [d.nbd_uri(""), f"nbd://127.0.0.1:{d.port}/"]:
        r = subprocess.run(["nbdinfo", "--list", lst], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "c/rp1/a" in r.stdout and tok not in r.stdout
    for path in ["/restorePointCollections", "/restorePointCollections/c?$expand=restorePoints",
                 "/restorePointCollections/c/restorePoints",
                 "/restorePointCollections/c/restorePoints/rp1?$expand=instanceView",
                 "/restorePointCollections/c/restorePoints/rp1/diskRestorePoints",
                 drp_path(), "/disks", "/vms", "/health"]:
        r = d.api("GET", path)
        assert r.status == 200 and tok not in r.raw.decode(), path
    # metadata.db (and its WAL) holds the token's SHA-256, never the token.
    digest = hashlib.sha256(tok.encode()).hexdigest()
    blobs = b""
    for name in os.listdir(d.state_dir):
        if name.startswith("metadata.db"):
            with open(os.path.join(d.state_dir, name), "rb") as f:
                blobs += f.read()
    assert tok.encode() not in blobs and digest.encode() in blobs
    assert end(d) is True
    assert d.api("GET", op).status == 404
    assert d.stop() == 0
    assert tok not in d.log()
    with open(d.log_path) as f:
        assert tok not in f.read()


def test_grants_survive_a_restart(point):
    require("nbdinfo")
    d = point
    uri, exp, _ = grant(d, 600)
    d.restart()
    r = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + d.log()
    # The daemon cannot show the token again: a repeat says why.
    r = begin(d, 60, expect=409)
    assert "restarted" in r.json["error"]["message"] and token_of(uri) not in r.raw.decode()
    assert end(d) is True
    assert REFUSED in refused(uri)
    # kill -9 right after the grant: it was durable before the answer.
    uri2, _, _ = grant(d, 600)
    d.kill9()
    d.start()
    h = connect(uri2)
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()
    assert end(d) is True
    # Expiring while the daemon is down ends it.
    uri3, _, _ = grant(d, 2)
    assert d.stop() == 0
    time.sleep(2.2)
    d.start()
    assert REFUSED in refused(uri3)
    grant(d, 60)  # a fresh grant, not a 409: the expired one is gone


def test_tcp_listener_serving_only_grants(make_daemon):
    require("nbdinfo")
    port = free_port()
    d = make_daemon(config_text=f"nbd: {{tcp: '127.0.0.1:{port}'}}\n"
                                "access: {tcp_grants_only: true}\n").start()
    d.create_disk("a", MiB)
    d.create_vm("web", ["a"])
    d.create_collection("c", "web")
    d.create_restore_point("c", "rp1")
    tcp = f"nbd://127.0.0.1:{port}"
    # Nothing listed, no disk and no point by its name on TCP...
    r = subprocess.run(["nbdinfo", "--list", tcp + "/"], capture_output=True, text=True,
                       timeout=60)
    assert "c/rp1/a" not in r.stdout and '"a"' not in r.stdout, r.stdout
    for name in ["a", "c/rp1/a"]:
        assert "serves only access grant tokens" in refused(f"{tcp}/{name}")
    # ...but a grant's URI works there, and the Unix socket serves everything.
    uri, _, _ = grant(d, 60)
    assert uri.startswith(tcp + "/")
    h = connect(uri)
    assert h.get_size() == MiB
    h.shutdown()
    for name in ["a", "c/rp1/a"]:
        h = connect(d.nbd_uri(name))
        h.shutdown()
    assert d.stop() == 0
