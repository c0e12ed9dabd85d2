"""The control API (docs/api.md) against the real daemon: every endpoint, every
error path, persistence across SIGTERM and kill -9, and delete while an NBD
client is attached.
"""
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import require
from rpointd_harness import nbd_write

API = "2026-11-01"
MiB = 1 << 20


def err(r):
    assert r.json is not None, r
    assert set(r.json) == {"error"}, r
    assert set(r.json["error"]) == {"code", "message"}, r
    return r.json["error"]["code"], r.json["error"]["message"]


def put(d, name, props, **kw):
    return d.api("PUT", f"/disks/{name}", {"properties": props}, **kw)


def wait_until(pred, timeout=10, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def raw_http(sock_path, data, timeout=10, half_close=False):
    """Sends raw bytes, returns everything the server sends until it closes.
    half_close: shut down the sending side after `data` (the server then need
    not wait out its lingering close)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


# --- service -----------------------------------------------------------------

def test_root_names_versions(daemon):
    r = daemon.api("GET", "/")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json["name"] == "rpointd"
    assert r.json["apiVersions"] == [API]
    assert r.json["latestApiVersion"] == API
    assert r.json["version"]
    assert daemon.api("GET", f"/?api-version={API}").status == 200

    bad = daemon.api("GET", "/disks?api-version=2020-01-01")
    assert bad.status == 400
    code, msg = err(bad)
    assert code == "InvalidApiVersion"
    assert "2020-01-01" in msg and API in msg


def test_health(daemon):
    r = daemon.api("GET", "/health")
    assert r.status == 200
    assert r.json == {"status": "Healthy", "disks": 0, "unavailableDisks": 0}


def test_curl_over_unix_socket(daemon):
    require("curl")
    base = ["curl", "-sS", "--unix-socket", daemon.control_sock]
    out = subprocess.run(
        base + ["-X", "PUT", "-H", "Content-Type: application/json",
                "-d", json.dumps({"properties": {"sizeBytes": 8 * MiB}}),
                "-w", "\n%{http_code}", f"http://localhost/disks/curl1?api-version={API}"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "201"
    disk = json.loads(body)
    assert disk["id"] == "/disks/curl1"
    assert disk["properties"]["sizeBytes"] == 8 * MiB

    out = subprocess.run(base + ["-w", "\n%{http_code}", "http://localhost/disks"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200"
    assert [d["name"] for d in json.loads(body)["value"]] == ["curl1"]

    # curl -d without a Content-Type labels the body a form; JSON in it is taken as JSON...
    out = subprocess.run(base + ["-X", "PATCH", "-d", '{"properties": {}}', "-w", "\n%{http_code}",
                                 "http://localhost/disks/curl1"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200"
    assert json.loads(body)["name"] == "curl1"
    # ...and a real form body is refused.
    out = subprocess.run(base + ["-X", "PATCH", "-d", "size=1", "-w", "\n%{http_code}",
                                 "http://localhost/disks/curl1"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "415"
    assert json.loads(body)["error"]["code"] == "UnsupportedMediaType"

    out = subprocess.run(base + ["-X", "DELETE", "-w", "%{http_code}",
                                 "http://localhost/disks/curl1"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out == "204"


# --- disks: happy paths ------------------------------------------------------

def test_disk_lifecycle(daemon):
    r = put(daemon, "vm1", {"sizeBytes": 16 * MiB})
    assert r.status == 201, r
    d = r.json
    assert list(d) == ["id", "name", "type", "properties"]
    assert d["id"] == "/disks/vm1" and d["name"] == "vm1" and d["type"] == "rpoint/disks"
    p = d["properties"]
    assert p["sizeBytes"] == 16 * MiB
    assert p["kind"] == "managed"
    assert p["diskState"] == "Unattached"
    assert p["attachedClients"] == 0
    assert p["provisioningState"] == "Succeeded"
    assert p["export"] == {"nbd": {"name": "vm1"}}
    assert p["creationData"] == {"createOption": "Empty"}
    assert p["deviceType"] == "File"
    assert p["timeCreated"].endswith("Z")
    path = p["path"]
    assert path.startswith(os.path.realpath(daemon.state_dir))
    st = os.stat(path)
    assert st.st_size == 16 * MiB
    assert st.st_blocks == 0  # sparse
    assert st.st_mode & 0o777 == 0o600

    # Idempotent repeat: 200 and the same resource.
    again = put(daemon, "vm1", {"sizeBytes": 16 * MiB})
    assert again.status == 200
    assert again.json == d
    # Conflicting repeats: 409.
    for props in ({"sizeBytes": 32 * MiB}, {"sizeBytes": 16 * MiB, "kind": "shared"},
                  {"path": path}):
        c = put(daemon, "vm1", props)
        assert c.status == 409, (props, c)
        assert err(c)[0] == "AlreadyExists"

    assert daemon.api("GET", "/disks/vm1").json == d
    assert put(daemon, "alpha", {"sizeBytes": MiB, "kind": "ephemeral"}).status == 201
    lst = daemon.api("GET", "/disks")
    assert lst.status == 200
    assert [x["name"] for x in lst.json["value"]] == ["alpha", "vm1"]
    assert lst.json["value"][0]["properties"]["kind"] == "ephemeral"

    g = daemon.api("PATCH", "/disks/vm1", {"properties": {"sizeBytes": 64 * MiB}})
    assert g.status == 200
    assert g.json["properties"]["sizeBytes"] == 64 * MiB
    assert os.stat(path).st_size == 64 * MiB
    same = daemon.api("PATCH", "/disks/vm1", {"properties": {"sizeBytes": 64 * MiB}})
    assert same.status == 200
    s = daemon.api("PATCH", "/disks/vm1", {"properties": {"sizeBytes": 32 * MiB}})
    assert s.status == 400
    assert err(s)[0] == "OutOfRange"
    assert daemon.api("PATCH", "/disks/nope", {"properties": {"sizeBytes": MiB}}).status == 404

    dl = daemon.api("DELETE", "/disks/vm1")
    assert dl.status == 204 and dl.raw == b""
    assert not os.path.exists(path)
    nf = daemon.api("GET", "/disks/vm1")
    assert nf.status == 404
    assert err(nf)[0] == "NotFound"
    assert daemon.api("DELETE", "/disks/vm1").status == 404
    assert daemon.api("DELETE", "/disks/alpha?force=false").status == 204
    assert daemon.api("GET", "/disks").json == {"value": []}


def test_a_grow_refused_for_tracking_space_leaves_the_disk_as_it_was(make_daemon, tmp_path):
    """A disk grow refused with 507 because the change tracker's bitmaps
    cannot be allocated (tracking_dir on a 1 MiB tmpfs; 4 TiB needs 8 MiB of
    bitmap) must leave the disk file at its old size: grown, the restart
    found a file larger than its tracking and the disk Unavailable."""
    nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr}")
    try:
        d = make_daemon(config_text=f"tracking_dir: {mnt}/tracking\n").start()
        assert put(d, "g", {"sizeBytes": 8 * MiB}).status == 201
        data = os.urandom(MiB)
        nbd_write(d.nbd_uri("g"), [(MiB, data)])
        path = os.path.join(d.state_dir, "disks", "g.raw")
        g = d.api("PATCH", "/disks/g", {"properties": {"sizeBytes": 4 << 40}})
        assert g.status == 507, g
        assert err(g)[0] == "NoSpace" and "No space left on device" in err(g)[1], g
        assert os.stat(path).st_size == 8 * MiB, "the refused grow left the file grown"
        got = d.api("GET", "/disks/g").json["properties"]
        assert got["sizeBytes"] == 8 * MiB, got
        d.stop()
        d.start()
        got = d.api("GET", "/disks/g").json["properties"]
        assert got["sizeBytes"] == 8 * MiB and "error" not in got, got
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("g"))
        assert h.get_size() == 8 * MiB
        assert h.pread(MiB, MiB) == data
        h.shutdown()
        # A grow that fits still works.
        assert d.api("PATCH", "/disks/g", {"properties": {"sizeBytes": 16 * MiB}}).status == 200
        assert os.stat(path).st_size == 16 * MiB
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_resize_is_seen_by_new_nbd_clients(daemon):
    require("nbdinfo")
    assert put(daemon, "g", {"sizeBytes": MiB}).status == 201
    assert daemon.api("PATCH", "/disks/g", {"properties": {"sizeBytes": 3 * MiB}}).status == 200
    out = subprocess.run(["nbdinfo", "--size", daemon.nbd_uri("g")], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert int(out) == 3 * MiB


def test_adopt_file(daemon, tmp_path):
    img = tmp_path / "image.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"adopted!")
    r = put(daemon, "ad", {"path": str(img), "kind": "shared"})
    assert r.status == 201, r
    p = r.json["properties"]
    assert p["sizeBytes"] == 4 * MiB
    assert p["path"] == os.path.realpath(img)
    assert p["creationData"] == {"createOption": "Attach"}
    assert p["kind"] == "shared"
    assert put(daemon, "ad", {"path": str(img), "kind": "shared"}).status == 200

    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("ad"))
    assert h.pread(8, MiB) == b"adopted!"
    h.shutdown()

    # The same file again, directly or through a symlink: 409 Conflict.
    os.symlink(img, tmp_path / "link.raw")
    for path in (str(img), str(tmp_path / "link.raw")):
        c = put(daemon, "other", {"path": path})
        assert c.status == 409, c
        assert err(c)[0] == "Conflict"
    # Deleting an adopted disk leaves the file.
    assert daemon.api("DELETE", "/disks/ad").status == 204
    assert img.read_bytes()[MiB:MiB + 8] == b"adopted!"


def test_adopt_refusals(daemon, tmp_path):
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 1000)
    cases = [
        ({"path": str(tmp_path / "missing.raw")}, "does not exist"),
        ({"path": str(tmp_path)}, "neither a regular file nor a block device"),
        ({"path": "relative.raw"}, "absolute"),
        ({"path": str(odd)}, "multiple of 512"),
        ({"path": 42}, "string"),
    ]
    for props, needle in cases:
        r = put(daemon, "x", props)
        assert r.status == 400, (props, r)
        assert needle in err(r)[1], (props, r)
    assert daemon.api("GET", "/disks").json == {"value": []}


# --- errors ------------------------------------------------------------------

def test_unknown_route_and_method(daemon):
    for path in ("/nope", "/disks/a/b", "/disks/", "/Disks"):
        r = daemon.api("GET", path)
        assert r.status == 404, (path, r)
        assert err(r)[0] == "RouteNotFound"
    r = daemon.api("POST", "/disks")
    assert r.status == 405
    assert err(r)[0] == "MethodNotAllowed"
    assert r.headers["Allow"] == "GET"
    r = daemon.api("POST", "/disks/a", {"properties": {}})
    assert r.status == 405
    assert r.headers["Allow"] == "GET, PUT, PATCH, DELETE"
    assert daemon.api("DELETE", "/").status == 405


def test_bad_bodies(daemon):
    cases = [
        (b"{not json", "InvalidJson", "not valid JSON"),
        (b"", "InvalidJson", "empty"),
        (b"[1, 2]", "InvalidJson", "object"),
        (b'{"properties": {"sizeBytes": 1048576, "colour": 1, "size": 2}}', "InvalidArgument",
         "'colour', 'size'"),
        (b'{"properties": {"sizeBytes": 1048576, "diskState": "Attached"}}', "InvalidArgument",
         "read-only"),
        (b'{"properties": {"sizeBytes": "1G"}}', "InvalidArgument", "integer"),
        (b'{"properties": {"sizeBytes": 1048576.5}}', "InvalidArgument", "integer"),
        (b'{"properties": {"sizeBytes": -1048576}}', "InvalidArgument", "positive"),
        (b'{"properties": {"sizeBytes": 0}}', "InvalidArgument", "positive"),
        (b'{"properties": {"sizeBytes": 1000}}', "InvalidArgument", "multiple of 512"),
        (b'{"properties": {"sizeBytes": 2251799813685248}}', "OutOfRange", "1 PiB"),
        (b'{"properties": {"sizeBytes": 1048576, "kind": "gold"}}', "InvalidArgument", "kind"),
        (b'{"properties": {"sizeBytes": 1048576, "path": "/x"}}', "InvalidArgument", "exactly one"),
        (b'{"properties": {}}', "InvalidArgument", "exactly one"),
        (b'{"sizeBytes": 1048576}', "InvalidArgument", "'sizeBytes'"),
        (b'{"name": "other", "properties": {"sizeBytes": 1048576}}', "InvalidArgument", "match"),
    ]
    for body, code, needle in cases:
        r = daemon.api("PUT", "/disks/a", body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (body, r)
        c, m = err(r)
        assert c == code, (body, r)
        assert needle in m, (body, r)
    r = daemon.api("PUT", "/disks/a", b'{"properties": {"sizeBytes": 1048576}}',
                   headers={"Content-Type": "text/plain"})
    assert r.status == 415
    assert err(r)[0] == "UnsupportedMediaType"
    p = daemon.api("PATCH", "/disks/a", {"properties": {"kind": "shared"}})
    assert p.status == 400  # checked before the disk is looked up
    assert daemon.api("GET", "/disks").json == {"value": []}


def test_bad_names(daemon):
    for name in ("..", ".hidden", "-x", "a%2Fb", "a%20b", "%2E%2E", "a" * 64, "caf%C3%A9"):
        r = put(daemon, name, {"sizeBytes": MiB})
        assert r.status == 400, (name, r)
        assert err(r)[0] == "InvalidArgument"
        assert daemon.api("GET", f"/disks/{name}").status == 400
    assert put(daemon, "a" * 63, {"sizeBytes": MiB}).status == 201
    assert sorted(os.listdir(os.path.join(daemon.state_dir, "disks"))) == ["a" * 63 + ".raw"]


def test_query_parameters(daemon):
    assert put(daemon, "q", {"sizeBytes": MiB}).status == 201
    r = daemon.api("GET", "/disks/q?force=true")
    assert r.status == 400
    assert err(r)[0] == "InvalidQueryParameter"
    r = daemon.api("DELETE", "/disks/q?force=yes")
    assert r.status == 400
    assert err(r)[0] == "InvalidQueryParameter"
    r = daemon.api("GET", "/disks/q%zz")
    assert r.status == 400
    assert err(r)[0] == "InvalidUrl"
    assert daemon.api("DELETE", f"/disks/q?force=true&api-version={API}").status == 204


def test_body_too_large(daemon):
    big = b'{"properties": {"sizeBytes": 1048576, "pad": "' + b"x" * (2 * MiB) + b'"}}'
    r = daemon.api("PUT", "/disks/big", big)
    assert r.status == 413
    assert err(r)[0] == "PayloadTooLarge"
    assert daemon.api("GET", "/disks/big").status == 404


def test_malformed_http_and_keep_alive(daemon):
    out = raw_http(daemon.control_sock, b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    # Two requests on one connection (keep-alive), the second closing it.
    req = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /disks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = raw_http(daemon.control_sock, req)
    assert out.count(b"HTTP/1.1 200 OK") == 2, out


# --- a hardened edge (issue #8) ----------------------------------------------

def _responses(out):
    return out.count(b"HTTP/1.1 ")


def test_deeply_nested_json_is_refused_and_the_daemon_lives(daemon):
    assert put(daemon, "a", {"sizeBytes": MiB}).status == 201
    # 50,000 '[' (100 KB, under the 1 MiB body limit) overflowed the stack.
    body = (b'{"properties": {"disks": [{"id": "/disks/a"}], "configuration": '
            + b"[" * 50000 + b"]" * 50000 + b"}}")
    r = daemon.api("PUT", "/vms/x", body)
    assert r.status == 400, r
    code, msg = err(r)
    assert code == "InvalidJson" and "nested deeper than 64" in msg
    assert daemon.proc.poll() is None, daemon.log()
    assert daemon.api("GET", "/vms").status == 200
    # 10,000 levels made a 200 MB answer; now refused too, and the deepest
    # accepted configuration comes back as sent.
    cfg = "[" * 62 + "7" + "]" * 62
    r = daemon.api("PUT", "/vms/x", ('{"properties": {"disks": [{"id": "/disks/a"}], '
                                     '"configuration": ' + cfg + "}}").encode())
    assert r.status == 201, r
    listed = daemon.api("GET", "/vms")
    assert listed.status == 200
    assert json.dumps(listed.json["value"][0]["properties"]["configuration"],
                      separators=(",", ":")) == cfg


def test_json_numbers_and_duplicate_keys(daemon):
    r = daemon.api("PUT", "/disks/a", b'{"properties": {"sizeBytes": 1e400}}')
    assert r.status == 400, r
    assert err(r)[0] == "InvalidJson"
    r = daemon.api("PUT", "/disks/a", b'{"properties": {"sizeBytes": 1048576, "sizeBytes": 2}}')
    assert r.status == 400, r
    assert "duplicate key 'sizeBytes'" in err(r)[1]
    assert daemon.api("GET", "/disks/a").status == 404


SMUGGLED = b"DELETE /disks/victim?force=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("headers,status", [
    (b"Transfer-Encoding: gzip\r\n", 400),
    (b"Transfer-Encoding: identity\r\n", 400),
    (b"Transfer-Encoding: foo\r\n", 400),
    (b"Transfer-Encoding: chunked, identity\r\n", 400),
    (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
    (b"Transfer-Encoding: gzip\r\nContent-Length: 0\r\n", 400),
    (b"Content-Length: 0\r\nContent-Length: 5\r\n", 400),
    (b"X-Folded: a\r\n b\r\n", 400),
], ids=["gzip", "identity", "foo", "chunked-identity", "gzip-chunked", "te-then-cl",
        "cl-then-te", "gzip-and-cl", "two-cl", "obs-fold"])
def test_request_smuggling_is_refused(daemon, headers, status):
    assert put(daemon, "victim", {"sizeBytes": MiB}).status == 201
    out = raw_http(daemon.control_sock,
                   b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + SMUGGLED,
                   half_close=True)
    assert out.startswith(b"HTTP/1.1 %d" % status), out
    assert b"Connection: close" in out, out
    assert _responses(out) == 1, out  # the body never ran as a request
    assert daemon.api("GET", "/disks/victim").status == 200


def test_chunked_body_still_works(daemon):
    body = b'{"properties": {"sizeBytes": 1048576}}'
    req = (b"PUT /disks/c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x\r\n" % 10 + body[:10] + b"\r\n"
           + b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
    out = raw_http(daemon.control_sock, req)
    assert out.startswith(b"HTTP/1.1 201"), out


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def test_hundreds_of_idle_and_slow_clients_cost_no_threads(daemon):
    import threading
    threads_before = _threads(daemon.proc.pid)
    idle = []
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.control_sock)
        idle.append(s)
    slow = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.control_sock)
        slow.append(s)
    stop = threading.Event()

    def loris():
        # One byte a second per slow client: a request that never completes.
        msg = b"GET /health HTTP/1.1\r\nHost: x\r\n"
        i = 0
        while not stop.is_set() and i < len(msg):
            for s in slow:
                try:
                    s.send(msg[i:i + 1])
                except OSError:
                    pass
            i += 1
            stop.wait(1)

    t = threading.Thread(target=loris)
    t.start()
    try:
        time.sleep(1.5)  # every connection accepted and waiting
        for _ in range(3):
            t0 = time.monotonic()
            r = daemon.api("GET", "/health", timeout=5)
            took = time.monotonic() - t0
            assert r.status == 200, r
            assert took < 1.0, f"GET /health took {took:.2f}s beside 520 idle/slow clients"
        n = _threads(daemon.proc.pid)
        print(f"520 clients open: GET /health in {took * 1000:.1f} ms, "
              f"{n} daemon threads (was {threads_before})")
        assert n <= threads_before + 2, f"{n} threads (was {threads_before}) with 520 clients open"
    finally:
        stop.set()
        t.join()
        for s in idle + slow:
            s.close()
    assert daemon.api("GET", "/health").status == 200


# --- persistence -------------------------------------------------------------

def _make_disks(d, tmp_path):
    assert put(d, "one", {"sizeBytes": 4 * MiB}).status == 201
    assert put(d, "two", {"sizeBytes": MiB, "kind": "ephemeral"}).status == 201
    assert d.api("PATCH", "/disks/two", {"properties": {"sizeBytes": 2 * MiB}}).status == 200
    img = tmp_path / "adopt.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
    assert put(d, "three", {"path": str(img)}).status == 201
    return {x["name"]: x for x in d.api("GET", "/disks").json["value"]}


def test_disks_survive_restart(daemon, tmp_path):
    before = _make_disks(daemon, tmp_path)
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("one"))
    h.pwrite(b"persist!" * 512, 8192)
    h.flush()
    h.shutdown()
    wait_until(lambda: daemon.api("GET", "/disks/one").json["properties"]["attachedClients"] == 0,
               what="client detach")
    assert daemon.stop() == 0
    daemon.start()
    after = {x["name"]: x for x in daemon.api("GET", "/disks").json["value"]}
    assert after == before
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("one"))
    assert h.pread(4096, 8192) == b"persist!" * 512
    h.shutdown()


def test_disks_survive_kill9(make_daemon, tmp_path):
    d = make_daemon().start()
    before = _make_disks(d, tmp_path)
    d.kill9()
    d.start()
    after = {x["name"]: x for x in d.api("GET", "/disks").json["value"]}
    assert after == before
    # A disk deleted just before the crash stays deleted.
    assert d.api("DELETE", "/disks/one").status == 204
    d.kill9()
    d.start()
    assert sorted(x["name"] for x in d.api("GET", "/disks").json["value"]) == ["three", "two"]
    assert d.stop() == 0


def test_missing_backing_file_is_reported_not_fatal(daemon):
    path = put(daemon, "lost", {"sizeBytes": MiB}).json["properties"]["path"]
    assert put(daemon, "fine", {"sizeBytes": MiB}).status == 201
    assert daemon.stop() == 0
    os.unlink(path)
    daemon.start()
    r = daemon.api("GET", "/disks/lost")
    assert r.status == 200
    p = r.json["properties"]
    assert p["diskState"] == "Unavailable"
    assert p["error"]["code"] == "BackingStoreUnavailable"
    assert path in p["error"]["message"]
    assert daemon.api("GET", "/disks/fine").json["properties"]["diskState"] == "Unattached"
    assert daemon.api("GET", "/health").json == {"status": "Degraded", "disks": 2,
                                                  "unavailableDisks": 1}
    assert "lost" in daemon.log()
    r = daemon.api("PATCH", "/disks/lost", {"properties": {"sizeBytes": 2 * MiB}})
    assert r.status == 409
    assert daemon.api("DELETE", "/disks/lost").status == 204
    assert daemon.api("GET", "/health").json["status"] == "Healthy"


# --- attached clients ----------------------------------------------------------

def test_delete_refused_while_attached_then_forced(daemon):
    nbd = pytest.importorskip("nbd")
    assert put(daemon, "busy", {"sizeBytes": MiB}).status == 201
    path = daemon.api("GET", "/disks/busy").json["properties"]["path"]
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("busy"))
    h.pwrite(b"x" * 512, 0)
    p = daemon.api("GET", "/disks/busy").json["properties"]
    assert p["diskState"] == "Attached"
    assert p["attachedClients"] == 1

    r = daemon.api("DELETE", "/disks/busy")
    assert r.status == 409
    code, msg = err(r)
    assert code == "Conflict" and "1 attached client" in msg
    assert os.path.exists(path)
    assert h.pread(512, 0) == b"x" * 512  # still served

    assert daemon.api("DELETE", "/disks/busy?force=true").status == 204
    assert daemon.api("GET", "/disks/busy").status == 404
    assert not os.path.exists(path)
    # The client is cut off at its next request.
    with pytest.raises(nbd.Error):
        for _ in range(50):
            h.pread(512, 0)
            time.sleep(0.05)
    del h  # libnbd closes the handle when it is collected
    # The name is free again.
    assert put(daemon, "busy", {"sizeBytes": MiB}).status == 201


def test_attached_count_follows_clients(daemon):
    nbd = pytest.importorskip("nbd")
    assert put(daemon, "c", {"sizeBytes": MiB}).status == 201
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(daemon.nbd_uri("c"))
        handles.append(h)
    assert daemon.api("GET", "/disks/c").json["properties"]["attachedClients"] == 2
    for h in handles:
        h.shutdown()
    wait_until(lambda: daemon.api("GET", "/disks/c").json["properties"]["diskState"] ==
               "Unattached", what="clients to detach")
    assert daemon.api("DELETE", "/disks/c").status == 204


# --- block devices -------------------------------------------------------------

@pytest.fixture
def loop_device(tmp_path):
    """A loop device over an 8 MiB file, detached afterwards (root only)."""
    require("losetup")
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("cannot attach a loop device: " + r.stderr.strip())
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=30)


def test_adopt_block_device(daemon, loop_device):
    r = put(daemon, "blk", {"path": loop_device})
    assert r.status == 201, r
    p = r.json["properties"]
    assert p["deviceType"] == "BlockDevice"
    assert p["sizeBytes"] == 8 * MiB
    # Held with O_EXCL while managed: nobody can mount it under us.
    with pytest.raises(OSError) as e:
        os.open(loop_device, os.O_RDONLY | os.O_EXCL)
    assert e.value.errno == 16  # EBUSY
    r = daemon.api("PATCH", "/disks/blk", {"properties": {"sizeBytes": 16 * MiB}})
    assert r.status == 400
    assert err(r)[0] == "Unsupported"
    # Survives a restart (re-claimed), and deleting leaves the device alone.
    daemon.restart()
    assert daemon.api("GET", "/disks/blk").json["properties"]["diskState"] == "Unattached"
    assert daemon.api("DELETE", "/disks/blk").status == 204
    assert os.path.exists(loop_device)
    os.close(os.open(loop_device, os.O_RDONLY | os.O_EXCL))  # released


def test_adopt_busy_block_device_is_refused(daemon, loop_device):
    fd = os.open(loop_device, os.O_RDONLY | os.O_EXCL)  # as a mount would hold it
    try:
        r = put(daemon, "blk", {"path": loop_device})
        assert r.status == 409, r
        assert "in use" in err(r)[1]
    finally:
        os.close(fd)


def test_concurrent_identical_puts_create_once(daemon):
    import threading
    results = []

    def worker():
        results.append(put(daemon, "race", {"sizeBytes": MiB}).status)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 7 + [201]
    assert len(daemon.api("GET", "/disks").json["value"]) == 1


@pytest.mark.parametrize("body", [b'{"properties": {"sizeBytes": 1048576}}\x00',
                                  b'{"properties": {"sizeBytes": 1048576}}\x00{"x": 1}',
                                  b'{"properties": {"sizeBytes": 1048576}\x00}',
                                  b'{"properties": {"sizeBytes": 1048576, "kind": "sha\x00red"}}'])
def test_nul_bytes_in_a_json_body_are_refused(daemon, body):
    # The JSON library takes a NUL for the end of its input: a body with
    # anything after a NUL must not be read as the part before it.
    r = daemon.api("PUT", "/disks/n", body)
    assert r.status == 400, r
    assert r.json["error"]["code"] == "InvalidJson", r
    assert "NUL byte" in r.json["error"]["message"], r
    assert daemon.api("GET", "/disks/n").status == 404
