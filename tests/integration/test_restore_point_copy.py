"""Copying a restore point to a collection of the same VM in another region.

PUT .../restorePoints/{rp} with properties.sourceRestorePoint answers 201 with
operation headers; while the chunks move the point is Creating, its
instanceView shows replicationStatus InProgress with completionPercent rising,
and it cannot be exported or restored. Only chunks the target region lacks
move: the second copy after a 1 MiB change moves about 1 MiB (the operation's
output.bytesMoved). A byte flipped in a source pack fails the copy loudly.
kill -9 mid-copy (slowed by the copy.chunk fault delay) ends Failed after the
restart, never Succeeded short. A copy killed with kill -9 resumes on restart
(its source still there): the chunks it had checkpointed (every 16 MiB) are not
moved again and its completionPercent goes on from what it had recorded; with
its source's region gone meanwhile it ends Failed, saying so. A copy compares the
source tree with the previous copy's tree: a 1 MiB change of a 64 GiB sparse disk
looks up 16 chunks, not every data slot. With the source collection deleted, the
copy restores byte-identical to the disk at the cut. Copies to the same region, into
the source's own collection or to another VM's collection are refused.
"""
import json
import os
import random
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
        self.arm_faults(rules)


def two_regions(tmp_path, disks, size):
    """A daemon with regions east (default) and west, a fault rules file,
    disks `disks` of `size` bytes in VM vm, and its collections ce (east) and
    cw (west). A generator for fixtures: yields the daemon, then checks it
    stops cleanly (or fails the test if it died)."""
    state = tmp_path / "state"
    os.makedirs(state)
    cfg = ("regions:\n"
           f"  - {{name: east, path: {tmp_path}/east, default: true}}\n"
           f"  - {{name: west, path: {tmp_path}/west}}\n")
    d = FaultDaemon(state, config_text=cfg, env={"RPOINTD_FAULTS_FILE": str(state / "faults")})
    d.start()
    for disk in disks:
        d.create_disk(disk, size)
    d.create_vm("vm", list(disks))
    d.create_collection("ce", "vm", location="east")
    d.create_collection("cw", "vm", location="west")
    yield d
    if d.proc is not None:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log()
        else:
            pytest.fail(f"rpointd died:\n{d.log()}")


@pytest.fixture
def rig(tmp_path):
    yield from two_regions(tmp_path, ["a"], DISK_SIZE)


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
        if st["status"] == "Succeeded":
            # The disk's data is committed; the point is between that and
            # its own commit (manifest, metadata): a real, short window.
            assert st["completionPercent"] == 100, st
            time.sleep(0.01)
            continue
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
    # Compared with the tree of the copy p1: only the 16 changed slots are
    # looked up (not all 408 data slots), and none of them is in the target.
    assert out["chunksLookedUp"] == 16 and out["disksComparedWithBase"] == 1, out
    assert out["chunksMoved"] == 16 and out["chunksReused"] == 0, out

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


def replication(d, c, rp):
    p = d.get_restore_point(c, rp, expand="instanceView")["properties"]
    return p["provisioningState"], p["instanceView"]["diskRestorePoints"][0]["replicationStatus"]


def wait_percent(d, c, rp, pct):
    deadline = time.monotonic() + 60
    while True:
        state, st = replication(d, c, rp)
        assert state == "Creating", (state, st)
        if st["completionPercent"] >= pct:
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def test_kill9_mid_copy_resumes_without_moving_checkpointed_chunks(rig, tmp_path):
    d = rig
    rng = random.Random(5)
    write_random(d, rng, rng.sample(range(DISK_SIZE // G), 600))  # 37.5 MiB
    img = nbd_save(d.nbd_uri("a"), tmp_path / "p1.img")
    d.create_restore_point("ce", "p1")
    # 400 chunks move at once (a checkpoint at 16 MiB = 256 chunks), then the
    # copy holds at the 401st until it is killed.
    d.arm("copy.chunk=delay600000@401")
    r = start_copy(d, "ce", "p1", "cw", "p1")
    op_path = operation_path(r)
    wait_percent(d, "cw", "p1", 400 * 100 // 600)
    d.kill9()
    os.unlink(d.env["RPOINTD_FAULTS_FILE"])
    # Resumed slowly (20 ms a chunk), so its progress can be watched.
    d.env["RPOINTD_FAULTS"] = "copy.chunk=delay20"
    d.start()
    del d.env["RPOINTD_FAULTS"]
    assert "resuming" in d.log(), d.log()
    seen = []
    while True:
        state, st = replication(d, "cw", "p1")
        if state != "Creating":
            break
        seen.append(st["completionPercent"])
        time.sleep(0.05)
    # Never back below what the first run had made durable (256 of 600).
    assert seen and min(seen) >= 256 * 100 // 600, seen
    assert seen == sorted(seen), seen
    assert state == "Succeeded" and st == {"status": "Succeeded", "completionPercent": 100}, st
    op = d.wait_operation(op_path)
    assert op["status"] == "Succeeded", op
    out = op["properties"]["output"]
    # The checkpointed chunks stayed in the target: at most the other 344 move.
    assert out["chunksReused"] >= 256 and out["bytesMoved"] <= (600 - 256) * G, out
    assert out["bytesMoved"] < 600 * G, out
    got = nbd_save(d.rp_uri("cw", "p1", "a"), tmp_path / "got.img")
    eq, msg = images_equal(img, got)
    assert eq, msg
    assert d.verify_restore_point("cw", "p1")["properties"]["output"]["ok"] is True
    # After another restart (and in a region rebuilt from its files) the copy
    # still names its source.
    d.restart()
    rp = d.get_restore_point("cw", "p1")["properties"]
    assert rp["sourceRestorePoint"] == {"id": "/restorePointCollections/ce/restorePoints/p1"}, rp


def test_kill9_mid_copy_with_source_unreadable_ends_failed(rig, tmp_path):
    d = rig
    rng = random.Random(7)
    write_random(d, rng, rng.sample(range(DISK_SIZE // G), 300))
    d.create_restore_point("ce", "p1")
    d.arm("copy.chunk=delay600000@101")
    r = start_copy(d, "ce", "p1", "cw", "p1")
    op_path = operation_path(r)
    wait_percent(d, "cw", "p1", 100 * 100 // 300)
    # The source of a running copy cannot be deleted (test_copy_cancel.py).
    r = d.api("DELETE", "/restorePointCollections/ce/restorePoints/p1")
    assert r.status == 409 and "source of a copy in progress" in r.json["error"]["message"], r
    d.kill9()
    os.unlink(d.env["RPOINTD_FAULTS_FILE"])
    # Its region gone when rpointd starts again: the copy cannot resume.
    os.rename(tmp_path / "east", tmp_path / "east.away")
    d.start()
    rp = d.get_restore_point("cw", "p1", expand="instanceView")["properties"]
    assert rp["provisioningState"] == "Failed", rp
    op = d.wait_operation(op_path)
    assert op["status"] == "Failed", op
    msg = op["error"]["message"]
    assert "cannot resume" in msg and "/restorePointCollections/ce/restorePoints/p1" in msg \
        and "unavailable" in msg, op
    e = subprocess.run(["nbdinfo", d.rp_uri("cw", "p1", "a")], capture_output=True, text=True,
                       timeout=30)
    assert e.returncode != 0


def test_copy_of_a_small_change_to_a_huge_sparse_disk_looks_up_only_the_change(rig, tmp_path):
    d = rig
    big = 64 << 30
    d.create_disk("h", big)
    d.create_vm("hv", ["h"])
    d.create_collection("he", "hv", location="east")
    d.create_collection("hw", "hv", location="west")
    rng = random.Random(8)
    slots = rng.sample(range(big // G), 256)  # 16 MiB spread over 64 GiB
    nbd_write(d.nbd_uri("h"), [(s * G, rng.randbytes(G)) for s in slots])
    d.create_restore_point("he", "p1")
    out = copy(d, "he", "p1", "hw", "p1")
    assert out["chunksLookedUp"] == 256 and out["disksComparedWithBase"] == 0, out
    changed = rng.sample(slots, 8) + rng.sample(range(big // G), 8)  # 1 MiB
    nbd_write(d.nbd_uri("h"), [(s * G, rng.randbytes(G)) for s in changed])
    d.create_restore_point("he", "p2")
    t = time.monotonic()
    out = copy(d, "he", "p2", "hw", "p2")
    took = time.monotonic() - t
    assert out["chunksLookedUp"] == len(set(changed)), out
    assert out["bytesMoved"] == len(set(changed)) * G and out["disksComparedWithBase"] == 1, out
    print(f"copy of 1 MiB changed on a 64 GiB disk: {took:.3f} s, {out}")
    # The copy reads as its source: same allocation, same bytes where written.
    maps = [subprocess.run(["nbdinfo", "--map", "--json", u], capture_output=True, text=True,
                           check=True, timeout=120).stdout
            for u in (d.rp_uri("he", "p2", "h"), d.rp_uri("hw", "p2", "h"))]
    assert maps[0] == maps[1]
    handles = []
    for u in (d.rp_uri("he", "p2", "h"), d.rp_uri("hw", "p2", "h")):
        h = nbd.NBD()
        h.connect_uri(u)
        handles.append(h)
    for s in set(slots) | set(changed):
        assert handles[0].pread(G, s * G) == handles[1].pread(G, s * G), s
    for h in handles:
        h.shutdown()


def test_copy_names_its_source_after_metadata_rebuilt_from_the_region(rig, tmp_path):
    d = rig
    nbd_write(d.nbd_uri("a"), [(0, b"y" * G)])
    d.create_restore_point("ce", "p1")
    copy(d, "ce", "p1", "cw", "p1")
    src = "/restorePointCollections/ce/restorePoints/p1"
    with open(tmp_path / "west" / "manifests" / "cw~p1.json") as f:
        assert json.load(f)["restorePoint"]["sourceRestorePoint"] == src
    with open(tmp_path / "east" / "manifests" / "ce~p1.json") as f:
        assert "sourceRestorePoint" not in json.load(f)["restorePoint"]
    # metadata.db lost: the points come back from the regions' manifests.
    assert d.stop() == 0, d.log()
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(d.state_dir, "metadata.db" + suffix)
        if os.path.exists(path):
            os.unlink(path)
    d.start()
    rp = d.get_restore_point("cw", "p1")["properties"]
    assert rp["provisioningState"] == "Succeeded", rp
    assert rp["sourceRestorePoint"] == {"id": src}, rp
    assert "sourceRestorePoint" not in d.get_restore_point("ce", "p1")["properties"]


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
