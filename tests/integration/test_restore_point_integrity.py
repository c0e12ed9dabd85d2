"""Damaged chunks are never served as data, and the next point heals them.

A VM with one disk; rp1 is cut; one byte is flipped inside a pack file, in the
stored copy of one chunk. Reading rp1's export (python3-libnbd, nbdcopy,
qemu-img convert) must fail with EIO on that chunk's range, never return wrong
bytes, while every other range reads back exactly. Restoring a disk from rp1
fails with an error naming the disk range. rp2, with no guest write at all,
re-copies the damaged block from the disk: rp2 equals the disk, and rp1 reads
back exactly again (content addressing: the fresh copy heals every point
naming it). The same holds for damage found by the verify operation: it
quarantines, and the next point heals.
"""
import errno
import os
import random
import subprocess

import pytest

from conftest import require
from rpointd_harness import images_equal, nbd_save, nbd_write, operation_path
from test_restore_points import find_in_packs, region_path

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
DISK_SIZE = 16 * MiB


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


def flip_byte(region, data, at):
    """Flips one byte of the stored copy of chunk `data` (at offset `at` in it)."""
    pack, off = find_in_packs(region, data)
    with open(pack, "r+b") as f:
        f.seek(off + at)
        b = f.read(1)
        f.seek(off + at)
        f.write(bytes([b[0] ^ 0x40]))


def pread_errno(h, length, offset):
    """None when the read succeeds, else the errno libnbd reports."""
    try:
        h.pread(length, offset)
        return None
    except nbd.Error as e:
        # python3-libnbd gives the errno's name ("EIO") or its number.
        return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno)


def test_damaged_chunk_is_eio_and_next_point_heals(daemon, tmp_path):
    d = daemon
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    region = region_path(d, "local")
    rng = random.Random(77)
    slots = list(range(0, 96))
    content = {s: rng.randbytes(G) for s in slots}
    nbd_write(d.nbd_uri("a"), [(s * G, content[s]) for s in slots])
    disk_img = nbd_save(d.nbd_uri("a"), tmp_path / "disk.img")  # the disk never changes again
    d.create_restore_point("c", "rp1")

    victim = 40
    flip_byte(region, content[victim], 777)

    # ---- rp1's export: EIO for the damaged chunk, exact data elsewhere ----
    h = nbd.NBD()
    h.connect_uri(d.rp_uri("c", "rp1", "a"))
    assert pread_errno(h, G, victim * G) == errno.EIO
    assert pread_errno(h, 4 * KiB, victim * G + 8 * KiB) == errno.EIO  # a piece of it
    assert pread_errno(h, 2 * G, victim * G - 4 * KiB) == errno.EIO    # across its borders
    for s in (0, victim - 1, victim + 1, 95):
        assert h.pread(G, s * G) == content[s], f"slot {s}"
    assert h.pread(4 * KiB, (victim + 1) * G + 100) == content[victim + 1][100:100 + 4 * KiB]
    assert h.pread(G, 200 * G) == bytes(G)  # a hole
    # Consistent: still EIO on the same connection once quarantined.
    assert pread_errno(h, G, victim * G) == errno.EIO
    h.shutdown()

    r = subprocess.run(["nbdcopy", d.rp_uri("c", "rp1", "a"), str(tmp_path / "rp1.copy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, "nbdcopy of a damaged point succeeded"
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                        d.rp_uri("c", "rp1", "a"), str(tmp_path / "rp1.qemu")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, "qemu-img convert of a damaged point succeeded"

    # ---- a restore from rp1 fails, naming the disk range ----
    r, _ = d.restore_disk("r1", "c", "rp1", "a", wait=False)
    op = d.wait_operation(operation_path(r), timeout=120)
    assert op["status"] == "Failed", op
    assert f"disk bytes [{victim * G}, {(victim + 1) * G})" in str(op.get("error")), op
    assert d.api("GET", "/disks/r1").status == 404, "a failed restore left its disk"

    # ---- rp2, no guest write: the damaged block is copied again ----
    d.create_restore_point("c", "rp2")
    drp2 = d.disk_restore_point("c", "rp2", "a")["properties"]
    assert drp2["incremental"] is True, drp2
    assert drp2["blocksChanged"] == 1, drp2
    assert G * 0.99 <= drp2["bytesStored"] <= 2 * G, drp2
    for rp in ("rp2", "rp1"):
        got = nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.export")
        same, msg = images_equal(disk_img, got)
        assert same, f"{rp} differs from the disk: {msg}"

    # ---- damage found by verify heals the same way ----
    victim2 = 70
    flip_byte(region, content[victim2], 5)
    out = d.verify_restore_point("c", "rp2")["properties"]["output"]
    assert out["ok"] is False, out
    assert any(x["kind"] == "Chunk" and x["offset"] == victim2 * G for x in out["damage"]), out
    h = nbd.NBD()
    h.connect_uri(d.rp_uri("c", "rp1", "a"))
    assert pread_errno(h, G, victim2 * G) == errno.EIO  # quarantined: not served
    h.shutdown()
    d.create_restore_point("c", "rp3")
    drp3 = d.disk_restore_point("c", "rp3", "a")["properties"]
    assert drp3["blocksChanged"] == 1, drp3
    out = d.verify_restore_point("c", "rp1")["properties"]["output"]
    assert out["ok"] is True, out
    for rp in ("rp1", "rp2", "rp3"):
        same, msg = images_equal(disk_img, nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.2"))
        assert same, f"{rp} differs from the disk after healing: {msg}"


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
@pytest.mark.parametrize("verify_first", [False, True], ids=["no-verify", "verify"])
def test_lost_pack_file_heals_at_the_next_point(daemon, tmp_path, damage, verify_first):
    """A pack file deleted (or cut short) on disk behind the daemon's back.
    rp0 stored data A (pack 1, with rp0's tree pages); rp1 stored data B and
    a whole new tree (pack 2), naming A's chunks in pack 1. With pack 1 gone,
    rp1 must not be taken as a sound base: rp2, with no guest write since,
    copies A's blocks again (found before any read: the point job checks the
    packs the index names; or by verify first), is Succeeded and equals the
    disk, and rp1 reads back exactly again (content addressing). rp0, whose
    tree pages were in the lost pack, fails its reads loudly, never wrong
    bytes. On the old daemon rp2 was an incremental point of 0 blocks whose
    every read failed."""
    d = daemon
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    region = region_path(d, "local")
    rng = random.Random(91)
    a_slots = list(range(0, 64))
    a = {s: rng.randbytes(G) for s in a_slots}
    nbd_write(d.nbd_uri("a"), [(s * G, a[s]) for s in a_slots])
    d.create_restore_point("c", "rp0")
    pack_a, _ = find_in_packs(region, a[10])
    b_slots = list(range(100, 110)) + list(range(200, 210))  # both leaves: a new tree
    nbd_write(d.nbd_uri("a"), [(s * G, rng.randbytes(G)) for s in b_slots])
    d.create_restore_point("c", "rp1")
    assert find_in_packs(region, a[10])[0] == pack_a  # rp1 names A where rp0 stored it
    disk_img = nbd_save(d.nbd_uri("a"), tmp_path / "disk.img")  # no write from here on

    if damage == "deleted":
        os.unlink(pack_a)
    else:
        os.truncate(pack_a, os.path.getsize(pack_a) // 2)
    if verify_first:
        r = d.api("POST", "/restorePointCollections/c/restorePoints/rp1/verify")
        assert r.status == 202, r
        op = d.wait_operation(operation_path(r))
        assert op["status"] == "Succeeded", op
        assert op["properties"]["output"]["ok"] is False, op

    d.create_restore_point("c", "rp2")
    drp2 = d.disk_restore_point("c", "rp2", "a")["properties"]
    assert drp2["incremental"] is True, drp2  # rp1's tree is sound: only A is copied
    assert drp2["blocksChanged"] >= len(a_slots) // 2, drp2
    assert "quarantined" in d.log_all(), d.log()
    for rp in ("rp2", "rp1"):
        same, msg = images_equal(disk_img, nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.x"))
        assert same, f"{rp} differs from the disk after a lost pack: {msg}\n{d.log()}"
    out = d.verify_restore_point("c", "rp1")["properties"]["output"]
    assert out["ok"] is True, out
    # rp0's tree pages were in the lost pack too: it reads back what it held
    # (pages and the pack still open from before serve verified bytes) or
    # fails loudly, never wrong bytes.
    want = tmp_path / "rp0.want"
    with open(want, "wb") as f:
        f.truncate(DISK_SIZE)
        for s in a_slots:
            f.seek(s * G)
            f.write(a[s])
    r = subprocess.run(["nbdcopy", d.rp_uri("c", "rp0", "a"), str(tmp_path / "rp0.copy")],
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        same, msg = images_equal(str(want), str(tmp_path / "rp0.copy"))
        assert same, f"rp0 read back wrong bytes after its pack was lost: {msg}"
