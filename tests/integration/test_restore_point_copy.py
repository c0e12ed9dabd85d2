"""Copying a restore point to a collection of the same VM in another region.

PUT .../restorePoints/{rp} with properties.sourceRestorePoint answers 201 with
operation headers; while the chunks move the point is Creating, its
instanceView shows replicationStatus InProgress with completionPercent rising,
and it cannot be exported or restored. Only chunks the target region lacks
move: the second copy after a 1 MiB change moves about 1 MiB (the operation's
output.bytesMoved). A byte flipped in a source pack fails the copy loudly.
kill -9 mid-copy (slowed by the copy.chunk fault delay) ends Failed after the
restart, never Succeeded short. With the source collection deleted, the copy
restores byte-identical to the disk at the cut. Copies to the same region, into
the source's own collection or to another VM's collection are refused.
"""
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import require
from rpointd_harness import Daemon, images_equal, nbd_save, nbd_write, operation_path
from test_restore_points import find_in_packs

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
DISK_SIZE = 64 * MiB


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img", "nbdinfo")


class FaultDaemon(Daemon):
    """A daemon with a fault rules file, armed through SIGHUP."""

    def arm(self, rules):
        path = self.env["RPOINTD_FAULTS_FILE"]
        with open(path + ".tmp", "w") as f:
            f.write(rules + "\n")
        os.rename(path + ".tmp", path)
        want = "fault injection: rules now " + (rules or "none")
        before = self.log_all().count(want)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log_all().count(want) <= before:
            assert time.monotonic() < deadline, f"rules {rules!r} not armed:\n{self.log()}"
            time.sleep(0.02)

    def log_all(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")


@pytest.fixture
def rig(tmp_path):
    state = tmp_path / "state"
    os.makedirs(state)
    cfg = ("regions:\n"
           f"  - {{name: east, path: {tmp_path}/east, default: true}}\n"
           f"  - {{name: west, path: {tmp_path}/west}}\n")
    d = FaultDaemon(state, config_text=cfg, env={"RPOINTD_FAULTS_FILE": str(state / "faults")})
    d.start()
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("ce", "vm", location="east")
    d.create_collection("cw", "vm", location="west")
    yield d
    if d.proc is not None:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log()
        else:
            pytest.fail(f"rpointd died:\n{d.log()}")


def start_copy(d, src_c, src_rp, dst_c, dst_rp, expect=201):
    r = d.api("PUT", f"/restorePointCollections/{dst_c}/restorePoints/{dst_rp}",
              {"properties": {"sourceRestorePoint":
                              {"id": f"/restorePointCollections/{src_c}/restorePoints/{src_rp}"}}})
    assert r.status == expect, r
    return r


def copy(d, src_c, src_rp, dst_c, dst_rp):
    r = start_copy(d, src_c, src_rp, dst_c, dst_rp)
    assert r.json["properties"]["provisioningState"] == "Creating", r
    op = d.wait_operation(operation_path(r))
    assert op["status"] == "Succeeded", f"{op}\n{d.log()}"
    return op["properties"]["output"]


def write_random(d, rng, slots):
    nbd_write(d.nbd_uri("a"), [(s * G, rng.randbytes(G)) for s in slots])


def test_copy_full_then_incremental_progress_and_restore_after_source_deleted(rig, tmp_path):
    d = rig
    rng = random.Random(3)
    first = rng.sample(range(DISK_SIZE // G), 400)  # 25 MiB of data
    write_random(d, rng, first)
    img1 = nbd_save(d.nbd_uri("a"), tmp_path / "p1.img")
    d.create_restore_point("ce", "p1")

    # Slowed (each chunk waits 5 ms) so the copy can be watched.
    d.arm("copy.chunk=delay5")
    r = start_copy(d, "ce", "p1", "cw", "p1")
    op_path = operation_path(r)
    seen = []
    refused_restore = refused_export = False
    while True:
        rp = d.get_restore_point("cw", "p1", expand="instanceView")["properties"]
        st = rp["instanceView"]["diskRestorePoints"][0]["replicationStatus"]
        if rp["provisioningState"] != "Creating":
            break
        assert st["completionPercent"] < 100, st
        seen.append(st["completionPercent"])
        if st["completionPercent"] > 10 and not refused_restore:
            # Not usable until complete: restore and export are refused.
            rr = d.api("PUT", "/disks/early", {"properties": {"creationData": {
                "createOption": "Restore",
                "sourceResourceId": "/restorePointCollections/cw/restorePoints/p1"
                                    "/diskRestorePoints/a"}}})
            assert rr.status == 409 and "not Succeeded" in rr.json["error"]["message"], rr
            refused_restore = True
            e = subprocess.run(["nbdinfo", d.rp_uri("cw", "p1", "a")], capture_output=True,
                               text=True, timeout=30)
            assert e.returncode != 0, e.stdout
            refused_export = True
        time.sleep(0.05)
    d.arm("")
    assert rp["provisioningState"] == "Succeeded", rp
    assert st == {"status": "Succeeded", "completionPercent": 100}, st
    assert refused_restore and refused_export, seen
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen
    assert rp["sourceRestorePoint"] == {"id": "/restorePointCollections/ce/restorePoints/p1"}
    op = d.wait_operation(op_path)
    out = op["properties"]["output"]
    assert out["bytesMoved"] == 400 * G and out["chunksMoved"] == 400, out
    assert f"copied from /restorePointCollections/ce/restorePoints/p1: {400 * G} bytes moved" \
        in d.log_all()

    # 1 MiB changes; the second copy moves about that.
    write_random(d, rng, rng.sample(first, 8) + rng.sample(
        [s for s in range(DISK_SIZE // G) if s not in first], 8))
    img2 = nbd_save(d.nbd_uri("a"), tmp_path / "p2.img")
    d.create_restore_point("ce", "p2")
    out = copy(d, "ce", "p2", "cw", "p2")
    assert 1 * MiB <= out["bytesMoved"] < 2 * MiB, out
    assert out["chunksReused"] == 392, out

    # Idempotent repeat: 200, no new job.
    r = start_copy(d, "ce", "p2", "cw", "p2", expect=200)
    assert r.json["properties"]["provisioningState"] == "Succeeded"

    # The source may go: the copies stand alone.
    r = d.api("DELETE", "/restorePointCollections/ce")
    assert r.status in (200, 204), r
    for name, img in (("p1", img1), ("p2", img2)):
        got = nbd_save(d.rp_uri("cw", name, "a"), tmp_path / f"got-{name}.img")
        eq, msg = images_equal(img, got)
        assert eq, f"copy {name}: {msg}"
    d.restore_disk("back", "cw", "p2", "a")
    got = nbd_save(d.nbd_uri("back"), tmp_path / "back.img")
    eq, msg = images_equal(img2, got)
    assert eq, msg
    op = d.verify_restore_point("cw", "p2")
    assert op["properties"]["output"]["ok"] is True, op


def test_damaged_source_chunk_fails_the_copy_loudly(rig, tmp_path):
    d = rig
    rng = random.Random(4)
    data = {s: rng.randbytes(G) for s in range(0, 64, 2)}
    nbd_write(d.nbd_uri("a"), list((s * G, b) for s, b in data.items()))
    d.create_restore_point("ce", "p1")
    pack, off = find_in_packs(os.path.join(str(tmp_path), "east"), data[10])
    with open(pack, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0x01]))
    r = start_copy(d, "ce", "p1", "cw", "p1")
    op = d.wait_operation(operation_path(r))
    assert op["status"] == "Failed", op
    assert op["error"]["code"] == "CopyFailed", op
    rng_txt = f"{10 * G}"
    assert "disk 'a'" in op["error"]["message"] and rng_txt in op["error"]["message"], op
    rp = d.get_restore_point("cw", "p1")["properties"]
    assert rp["provisioningState"] == "Failed", rp
    e = subprocess.run(["nbdinfo", d.rp_uri("cw", "p1", "a")], capture_output=True, text=True,
                       timeout=30)
    assert e.returncode != 0


def test_kill9_mid_copy_never_succeeds_short(rig, tmp_path):
    d = rig
    rng = random.Random(5)
    write_random(d, rng, rng.sample(range(DISK_SIZE // G), 300))
    img = nbd_save(d.nbd_uri("a"), tmp_path / "p1.img")
    d.create_restore_point("ce", "p1")
    d.arm("copy.chunk=delay10")
    start_copy(d, "ce", "p1", "cw", "p1")
    deadline = time.monotonic() + 60
    while True:
        st = d.get_restore_point("cw", "p1", expand="instanceView")["properties"][
            "instanceView"]["diskRestorePoints"][0]["replicationStatus"]
        if st["completionPercent"] >= 20:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    d.kill9()
    os.unlink(d.env["RPOINTD_FAULTS_FILE"])
    d.start()
    rp = d.get_restore_point("cw", "p1", expand="instanceView")["properties"]
    assert rp["provisioningState"] == "Failed", rp
    e = subprocess.run(["nbdinfo", d.rp_uri("cw", "p1", "a")], capture_output=True, text=True,
                       timeout=30)
    assert e.returncode != 0
    # Copied again (under another name), it is complete and exact; the
    # chunks the killed copy had already stored may be reused.
    copy(d, "ce", "p1", "cw", "p1b")
    got = nbd_save(d.rp_uri("cw", "p1b", "a"), tmp_path / "got.img")
    eq, msg = images_equal(img, got)
    assert eq, msg


def test_copy_refusals(rig, tmp_path):
    d = rig
    nbd_write(d.nbd_uri("a"), [(0, b"x" * G)])
    d.create_restore_point("ce", "p1")
    d.create_collection("ce2", "vm", location="east")
    r = start_copy(d, "ce", "p1", "ce2", "p1", expect=400)
    assert "a copy goes to another region" in r.json["error"]["message"], r
    r = start_copy(d, "ce", "p1", "ce", "p1c", expect=400)
    assert "already in collection 'ce'" in r.json["error"]["message"], r
    d.create_disk("b", 4 * MiB)
    d.create_vm("other", ["b"])
    d.create_collection("ow", "other", location="west")
    r = start_copy(d, "ce", "p1", "ow", "p1", expect=409)
    assert "a copy goes to a collection of the same VM" in r.json["error"]["message"], r
    r = start_copy(d, "ce", "nope", "cw", "p1", expect=404)
    r = d.api("PUT", "/restorePointCollections/cw/restorePoints/x",
              {"properties": {"sourceRestorePoint": {"id": "/restorePointCollections/ce"}}})
    assert r.status == 400 and "must look like" in r.json["error"]["message"], r
    r = d.api("PUT", "/restorePointCollections/cw/restorePoints/x",
              {"properties": {"sourceRestorePoint": {"id": "/restorePointCollections/ce/"
                                                           "restorePoints/p1"},
                              "consistencyMode": "CrashConsistent"}})
    assert r.status == 400 and "cannot be set on a copy" in r.json["error"]["message"], r


def test_cli_copy_waits_with_progress(rig, tmp_path):
    d = rig
    rng = random.Random(6)
    write_random(d, rng, range(0, 32))
    d.create_restore_point("ce", "p1")
    r = d.cli("restore-point", "copy", "ce/p1", "cw", "--wait")
    assert "moved 2.0 MiB" in r.stdout or "moved 2 MiB" in r.stdout, r.stdout
    assert "copying ce/p1 to cw/p1" in r.stderr, r.stderr
    assert "Succeeded" in r.stdout, r.stdout
    r = d.cli("restore-point", "copy", "ce/p1", "cw/again", "--wait")
    assert "moved 0" in r.stdout, r.stdout
    r = d.cli("restore-point", "copy", "ce/p1", "ce/x", check=False)
    assert r.returncode != 0 and "another region" in r.stderr, r
