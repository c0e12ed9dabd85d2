"""Deleting the source or the target of a running copy between two regions of one host.

A copy (PUT .../restorePoints/{rp} with sourceRestorePoint, slowed by the
copy.chunk fault delay so it can be caught mid-way) is the target; the point it
reads is its source.

- DELETE of the target point, or of its collection, mid-copy cancels the copy:
  204 within seconds, the copy's operation ends Failed with error.code
  Canceled, the point (or collection) is gone, and the target region keeps
  nothing of it: no store point is left unnamed (a GC with orphans deletes
  none), not even that of a disk the copy had already committed, and its
  packs are collected. The same copy made again succeeds, byte-identical.
- DELETE of the source point, or of its collection, mid-copy is refused: 409
  (error.code Conflict) naming the running copy and its operation; the copy
  goes on to Succeeded, byte-identical to the disk at the cut, and the source
  can be deleted once it has.
Never a Succeeded copy whose data is missing.
"""
import random
import time

import pytest

from conftest import require
from rpointd_harness import images_equal, nbd_save, nbd_write, operation_path
from test_restore_point_copy import two_regions

pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
DISK_SIZE = 64 * MiB


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img", "nbdinfo")


@pytest.fixture
def rig(tmp_path):
    yield from two_regions(tmp_path, ["a", "b"], DISK_SIZE)


def point_id(c, rp):
    return f"/restorePointCollections/{c}/restorePoints/{rp}"


def cut(d, tmp_path, seed, chunks=300):
    """A point ce/p1 of both disks, `chunks` random 64 KiB chunks each; the
    images of the disks at the cut."""
    rng = random.Random(seed)
    imgs = {}
    for disk in ("a", "b"):
        slots = rng.sample(range(DISK_SIZE // G), chunks)
        nbd_write(d.nbd_uri(disk), [(s * G, rng.randbytes(G)) for s in slots])
        imgs[disk] = nbd_save(d.nbd_uri(disk), tmp_path / f"{disk}-{seed}.img")
    d.create_restore_point("ce", "p1")
    return imgs


def start_copy(d, name="p1"):
    r = d.api("PUT", point_id("cw", name), {"properties": {"sourceRestorePoint": {
        "id": point_id("ce", "p1")}}})
    assert r.status == 201, r
    return operation_path(r)


def disk_states(d, c, rp):
    p = d.get_restore_point(c, rp, expand="instanceView")["properties"]
    return p["provisioningState"], [x["replicationStatus"]
                                    for x in p["instanceView"]["diskRestorePoints"]]


def wait_until(d, c, rp, ok, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        state, disks = disk_states(d, c, rp)
        assert state == "Creating", (state, disks, d.log()[-3000:])
        if ok(disks):
            return disks
        assert time.monotonic() < deadline, disks
        time.sleep(0.02)


def west_gc(d):
    r = d.api("POST", "/regions/west/gc?orphans=true")
    assert r.status == 200, (r, d.log()[-3000:])
    return r.json


def assert_target_clean(d):
    """West keeps nothing of a canceled copy: no unnamed store point, no pack bytes."""
    res = west_gc(d)
    assert res["storePointsDeleted"] == 0, res
    assert res["packBytesAfter"] < 256 * KiB, res


def assert_copy_is_whole(d, tmp_path, imgs, name="p1"):
    for disk, img in imgs.items():
        got = nbd_save(d.rp_uri("cw", name, disk), tmp_path / f"got-{name}-{disk}.img")
        eq, msg = images_equal(img, got)
        assert eq, f"{name}/{disk}: {msg}"


def test_deleting_the_target_mid_copy_cancels_it_and_removes_its_data(rig, tmp_path):
    d = rig
    imgs = cut(d, tmp_path, 11)
    d.arm_faults("copy.chunk=delay15")
    op = start_copy(d)
    # Disk a committed (a store point in west), disk b part-way (past a
    # checkpoint is not needed: what it wrote is in packs all the same).
    wait_until(d, "cw", "p1", lambda s: s[0]["status"] == "Succeeded"
               and s[1]["completionPercent"] >= 20)
    t0 = time.monotonic()
    r = d.api("DELETE", point_id("cw", "p1"))
    took = time.monotonic() - t0
    d.arm_faults("")
    assert r.status == 204, (r, d.log()[-3000:])
    assert took < 10, took
    assert d.api("GET", point_id("cw", "p1")).status == 404
    done = d.wait_operation(op, timeout=30)
    assert done["status"] == "Failed", done
    assert done["error"]["code"] == "Canceled", done
    assert "canceled" in done["error"]["message"] and point_id("cw", "p1") in \
        done["error"]["message"], done
    assert_target_clean(d)
    # The source is untouched; the same copy again succeeds, whole.
    done = d.wait_operation(start_copy(d), timeout=120)
    assert done["status"] == "Succeeded", (done, d.log()[-3000:])
    assert_copy_is_whole(d, tmp_path, imgs)


def test_deleting_the_target_collection_mid_copy_cancels_it(rig, tmp_path):
    d = rig
    cut(d, tmp_path, 12)
    d.arm_faults("copy.chunk=delay15")
    op = start_copy(d)
    wait_until(d, "cw", "p1", lambda s: s[0]["completionPercent"] >= 20)
    r = d.api("DELETE", "/restorePointCollections/cw")
    d.arm_faults("")
    assert r.status == 204, (r, d.log()[-3000:])
    assert d.api("GET", "/restorePointCollections/cw").status == 404
    done = d.wait_operation(op, timeout=30)
    assert done["status"] == "Failed" and done["error"]["code"] == "Canceled", done
    assert_target_clean(d)
    # A new collection in west takes a copy of the same point.
    d.create_collection("cw", "vm", location="west")
    done = d.wait_operation(start_copy(d), timeout=120)
    assert done["status"] == "Succeeded", (done, d.log()[-3000:])


@pytest.mark.parametrize("what", ["point", "collection"])
def test_deleting_the_source_mid_copy_is_refused_naming_the_copy(rig, tmp_path, what):
    d = rig
    imgs = cut(d, tmp_path, 13)
    d.arm_faults("copy.chunk=delay10")
    op = start_copy(d)
    wait_until(d, "cw", "p1", lambda s: s[0]["completionPercent"] >= 20)
    path = point_id("ce", "p1") if what == "point" else "/restorePointCollections/ce"
    r = d.api("DELETE", path)
    d.arm_faults("")
    assert r.status == 409, (r, d.log()[-3000:])
    err = r.json["error"]
    assert err["code"] == "Conflict", err
    assert "source of a copy in progress" in err["message"], err
    assert point_id("cw", "p1") in err["message"] and op in err["message"], (err, op)
    assert d.api("GET", point_id("ce", "p1")).status == 200
    done = d.wait_operation(op, timeout=120)
    assert done["status"] == "Succeeded", (done, d.log()[-3000:])
    assert_copy_is_whole(d, tmp_path, imgs)
    # Once the copy has ended, the source goes; the copy stands alone.
    assert d.api("DELETE", path).status == 204
    assert_copy_is_whole(d, tmp_path, imgs)
    assert d.verify_restore_point("cw", "p1")["properties"]["output"]["ok"] is True
