"""A client counts as attached from the moment it sees the export open, and
stops counting promptly once it leaves (issue #8: the control plane must
answer what a script just did, not a moment later).

Before: the NBD server took its device Use only after the GO reply, so a
`GET /disks/d` right after `connect_uri()` could read attachedClients 0; and a
`DELETE /disks/d` right after the client closed got 409 "1 attached
client(s)" until the reactor noticed the hang-up. Each is checked 40 times in
a row, and again with two CPU-bound loops beside the daemon (on 2 CPUs the
daemon's threads then wait for a CPU, which widens both windows).
"""
import subprocess

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (run with /usr/bin/python3)")

MiB = 1 << 20
ROUNDS = 150


@pytest.fixture(params=["idle", "busy"])
def load(request):
    procs = []
    if request.param == "busy":
        procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(4)]
    yield request.param
    for p in procs:
        p.kill()
        p.wait()


def test_attached_at_connect_and_gone_at_close(daemon, load):
    for i in range(ROUNDS):
        name = f"a{i}"
        daemon.create_disk(name, MiB)
        h = nbd.NBD()
        h.connect_uri(daemon.nbd_uri(name))
        r = daemon.api("GET", f"/disks/{name}")
        assert r.json["properties"]["attachedClients"] == 1, (i, r)
        h.pwrite(b"x" * 4096, 0)
        h.shutdown()  # NBD_CMD_DISC; the handle (and its socket) lives on
        r = daemon.api("DELETE", f"/disks/{name}")
        assert r.status == 204, (i, r)


def test_delete_right_after_a_tool_exits(daemon, load, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * MiB)
    for i in range(ROUNDS // 4):
        name = f"q{i}"
        daemon.create_disk(name, MiB)
        subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                        daemon.nbd_uri(name)], check=True, timeout=60)
        r = daemon.api("DELETE", f"/disks/{name}")
        assert r.status == 204, (i, r)


def test_delete_of_a_disk_in_use_still_conflicts(daemon):
    daemon.create_disk("busy", MiB)
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("busy"))
    r = daemon.api("DELETE", "/disks/busy")
    assert r.status == 409 and r.json["error"]["code"] == "Conflict", r
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
