"""A lost or stale metadata.db never costs a disk its data.

metadata.db names the managed disks; their data lives in <state>/disks/NAME.raw.
An operator who loses metadata.db (deleted, or put back from an old copy) must
find the disks again, byte for byte, not have rpointd delete the files no row
names: only a file that never held data (a create interrupted before its row
committed) or the tombstone of a committed delete may go. Real daemon, real
NBD writes (python3-libnbd), real kill -9.
"""
import glob
import hashlib
import os
import shutil
import sqlite3

import nbd
import pytest

from rpointd_harness import nbd_write, operation_path

MiB = 1 << 20


def same(a, b):
    """Equal bytes, compared by digest: pytest's diff of two disk images
    takes longer than any test may."""
    return hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def read_all(uri, length):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for off in range(0, length, 4 * MiB):
        out += h.pread(min(4 * MiB, length - off), off)
    h.shutdown()
    return bytes(out)


def test_disks_survive_a_lost_metadata_db(make_daemon):
    d = make_daemon().start()
    size = 64 * MiB
    d.create_disk("web.os", size)
    d.create_disk("data", size)
    d.create_vm("vm", ["web.os", "data"])
    d.create_collection("c", "vm")
    first = os.urandom(8 * MiB)
    nbd_write(d.nbd_uri("web.os"), [(0, first)])
    d.create_restore_point("c", "rp1")
    # Written (and flushed: nbd_write flushes) after the point: only the disk
    # file holds these bytes.
    nbd_write(d.nbd_uri("web.os"), [(16 * MiB, os.urandom(4 * MiB))])
    nbd_write(d.nbd_uri("data"), [(40 * MiB, os.urandom(MiB))])
    want = {n: read_all(d.nbd_uri(n), size) for n in ("web.os", "data")}
    d.kill9()
    for f in glob.glob(os.path.join(d.state_dir, "metadata.db*")):
        os.unlink(f)
    d.start()

    for n in ("web.os", "data"):
        r = d.api("GET", f"/disks/{n}")
        assert r.status == 200, r
        assert r.json["properties"]["sizeBytes"] == size, r.json
        assert same(read_all(d.nbd_uri(n), size), want[n]), f"disk {n} lost data"
    assert "recovered" in d.log_all()
    # The restore points came back from the region; the VM is made again with
    # its recovered disks, and its next point is full (the tracking history
    # went with metadata.db) and equals the disks.
    assert same(read_all(d.rp_uri("c", "rp1", "web.os"), 8 * MiB), first)
    d.create_vm("vm", ["web.os", "data"])
    d.create_restore_point("c", "rp2")
    for n in ("web.os", "data"):
        drp = d.disk_restore_point("c", "rp2", n)["properties"]
        assert drp["incremental"] is False, drp
        assert same(read_all(d.rp_uri("c", "rp2", n), size), want[n])


def test_a_stale_metadata_db_keeps_disks_created_after_it(make_daemon):
    d = make_daemon().start()
    d.create_disk("old", 8 * MiB)
    d.stop()
    backup = os.path.join(d.state_dir, "metadata.db.bak")
    shutil.copy(os.path.join(d.state_dir, "metadata.db"), backup)
    d.start()
    d.create_disk("new", 8 * MiB)
    data = os.urandom(2 * MiB)
    nbd_write(d.nbd_uri("new"), [(MiB, data)])
    d.stop()
    os.replace(backup, os.path.join(d.state_dir, "metadata.db"))
    d.start()
    assert same(read_all(d.nbd_uri("new"), 8 * MiB)[MiB:3 * MiB], data)
    assert d.api("GET", "/disks/old").status == 200


def test_crash_states_of_create_and_delete(make_daemon):
    d = make_daemon().start()
    d.create_disk("kept", 8 * MiB)
    data = os.urandom(MiB)
    nbd_write(d.nbd_uri("kept"), [(0, data)])
    d.stop()
    disks = os.path.join(d.state_dir, "disks")
    # A delete interrupted before its row's delete committed: the disk stays.
    os.rename(os.path.join(disks, "kept.raw"), os.path.join(disks, "kept.raw.deleting"))
    # A committed delete whose unlink did not happen: the tombstone goes.
    with open(os.path.join(disks, "gone.raw.deleting"), "wb") as f:
        f.write(os.urandom(MiB))
    # A create interrupted before its row committed: never written, goes.
    with open(os.path.join(disks, "half.raw"), "wb") as f:
        f.truncate(8 * MiB)
    d.start()
    assert sorted(os.listdir(disks)) == ["kept.raw"]
    assert same(read_all(d.nbd_uri("kept"), MiB), data)
    assert d.api("GET", "/disks/half").status == 404
    # A real delete leaves nothing behind, and the name is free again.
    assert d.api("DELETE", "/disks/kept").status in (200, 202, 204)
    assert os.listdir(disks) == []
    d.create_disk("kept", 8 * MiB)
    assert same(read_all(d.nbd_uri("kept"), MiB), bytes(MiB))


def test_a_damaged_metadata_db_stops_the_start_and_says_how_to_recover(make_daemon):
    d = make_daemon().start()
    d.create_disk("disk", 8 * MiB)
    d.create_vm("vm", ["disk"])
    d.create_collection("c", "vm")
    data = os.urandom(2 * MiB)
    nbd_write(d.nbd_uri("disk"), [(0, data)])
    d.create_restore_point("c", "rp1")
    d.stop()
    db = os.path.join(d.state_dir, "metadata.db")
    with open(db, "r+b") as f:  # a page of garbage past the header
        f.seek(4096)
        f.write(os.urandom(4096))
    with pytest.raises(Exception, match="exited"):
        d.start()
    log = d.log_all()
    assert "malformed" in log and "move " + db in log, log[-2000:]
    # Nothing was touched: the disk file is all there.
    with open(os.path.join(d.state_dir, "disks", "disk.raw"), "rb") as f:
        assert same(f.read(2 * MiB), data)
    # Following the advice brings the disk and the point back.
    for f in glob.glob(db + "*"):
        os.rename(f, f + ".damaged")
    d.start()
    assert same(read_all(d.nbd_uri("disk"), 2 * MiB), data)
    assert same(read_all(d.rp_uri("c", "rp1", "disk"), 2 * MiB), data)


def random_disk_in_a_vm(d, disk, size):
    """Disk `disk` of random data in VM `vm` with collection `c`; returns its image."""
    d.create_disk(disk, size)
    d.create_vm("vm", [disk])
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri(disk), [(0, os.urandom(size))])
    return read_all(d.nbd_uri(disk), size)


def two_points(d):
    """rp1 and rp2 of disk `disk`, different contents; returns both images."""
    size = 16 * MiB
    one = random_disk_in_a_vm(d, "disk", size)
    d.create_restore_point("c", "rp1")
    nbd_write(d.nbd_uri("disk"), [(0, os.urandom(4 * MiB))])
    two = read_all(d.nbd_uri("disk"), size)
    d.create_restore_point("c", "rp2")
    return size, one, two


def sql(d, *statements):
    con = sqlite3.connect(os.path.join(d.state_dir, "metadata.db"))
    with con:
        rows = [con.execute(s).fetchall() for s in statements]
    con.close()
    return rows


def test_a_record_naming_another_points_data_fails_loudly(make_daemon):
    """A damaged row of metadata.db (here: rp1's store point swapped with
    rp2's, as a flipped bit could) must not serve, verify, restore or copy
    rp2's bytes as rp1's: every use fails, naming the damage."""
    d = make_daemon().start()
    size, one, two = two_points(d)
    d.stop()
    (sp1,), (sp2,) = [r[0] for r in sql(
        d, "SELECT store_point FROM disk_restore_points WHERE restore_point = 'rp1'",
        "SELECT store_point FROM disk_restore_points WHERE restore_point = 'rp2'")]
    sql(d, f"UPDATE disk_restore_points SET store_point = {sp2} WHERE restore_point = 'rp1'")
    d.start()
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(d.rp_uri("c", "rp1", "disk"))
        got = h.pread(MiB, 0)
        assert got != two[:MiB], "rp1's export served rp2's bytes"
    assert "written for /restorePointCollections/c/restorePoints/rp2" in d.log_all()
    r = d.api("POST", "/restorePointCollections/c/restorePoints/rp1/verify")
    assert r.status == 202, r
    v = d.wait_operation(operation_path(r))
    assert v["status"] == "Failed" and "damaged" in v["error"]["message"], v
    r, _ = d.restore_disk("back", "c", "rp1", "disk", wait=False)
    res = d.wait_operation(operation_path(r))
    assert res["status"] == "Failed" and "damaged" in str(res), res
    # rp2 itself is untouched.
    assert same(read_all(d.rp_uri("c", "rp2", "disk"), size), two)
    assert d.verify_restore_point("c", "rp2")["status"] == "Succeeded"


def test_a_tracking_base_naming_another_point_makes_the_next_point_full(make_daemon):
    """The disk's tracking base (the parent of its next incremental point)
    damaged to name rp1's store point while the tracker counts changes since
    rp2: an incremental point on that parent would hold rp1's bytes where the
    disk did not change since rp2. It must be full instead, and equal the disk."""
    d = make_daemon().start()
    size, one, two = two_points(d)
    nbd_write(d.nbd_uri("disk"), [(12 * MiB, os.urandom(MiB))])
    now = read_all(d.nbd_uri("disk"), size)
    d.stop()
    ((sp1,),), = sql(d, "SELECT store_point FROM disk_restore_points WHERE restore_point = 'rp1'")
    sql(d, f"UPDATE tracking_bases SET store_point = {sp1}, retained = 1")
    d.start()
    d.create_restore_point("c", "rp3")
    assert same(read_all(d.rp_uri("c", "rp3", "disk"), size), now)
    assert d.disk_restore_point("c", "rp3", "disk")["properties"]["incremental"] is False


def restore_held_half_done(make_daemon, tmp_path):
    """Disk `src` (16 MiB of data) in point c/rp1; a restore of it into disk
    `back` held by the restore.fill fault after two pieces, then kill -9
    with `back.raw` partly filled. Returns (d, the source image)."""
    import time

    faults = str(tmp_path / "faults")
    d = make_daemon(env={"RPOINTD_FAULTS_FILE": faults}).start()
    size = 16 * MiB
    want = random_disk_in_a_vm(d, "src", size)
    d.create_restore_point("c", "rp1")
    # Pieces are 4 MiB: two are written (which two depends on the workers'
    # timing), the rest wait.
    d.arm_faults("restore.fill=delay60000@3")
    d.restore_disk("back", "c", "rp1", "src", wait=False)
    raw = os.path.join(d.state_dir, "disks", "back.raw")
    deadline = time.monotonic() + 30
    while True:
        try:
            with open(raw, "rb") as f:
                got = f.read()
            if any(got[p:p + 64 * 1024] == want[p:p + 64 * 1024] for p in range(0, size, 4 * MiB)):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the restore wrote nothing:\n{d.log()}"
        time.sleep(0.05)
    d.kill9()
    with open(raw, "rb") as f:
        assert not same(f.read(), want), "the restore was not held half done"
    return d, want


def test_a_restore_interrupted_with_metadata_db_lost_is_not_recovered_as_a_disk(make_daemon,
                                                                                tmp_path):
    """A kill -9 while a restore fills `back.raw`, and metadata.db lost: the
    half-filled file must never come back as a healthy disk (it would read as
    the point in part, zeroes in the rest). It is removed; the point still
    holds the data, and restoring again gives the whole disk."""
    d, want = restore_held_half_done(make_daemon, tmp_path)
    for f in glob.glob(os.path.join(d.state_dir, "metadata.db*")):
        os.unlink(f)
    d.start()
    r = d.api("GET", "/disks/back")
    assert r.status == 404, f"a half-restored disk came back: {r}"
    assert "a restore (from /restorePointCollections/c/restorePoints/rp1" in d.log_all()
    disks = os.path.join(d.state_dir, "disks")
    assert sorted(os.listdir(disks)) == ["src.raw"], os.listdir(disks)
    assert d.api("GET", "/disks/src").status == 200  # a whole disk is still recovered
    d.arm_faults("")
    d.restore_disk("again", "c", "rp1", "src")
    assert same(read_all(d.nbd_uri("again"), len(want)), want)


def test_a_restore_interrupted_with_metadata_db_kept_is_removed_as_before(make_daemon, tmp_path):
    """The same kill -9 with metadata.db intact: the disk still Creating is
    removed at the start (file and marker), and the name can be restored again."""
    d, want = restore_held_half_done(make_daemon, tmp_path)
    d.start()
    assert d.api("GET", "/disks/back").status == 404
    assert "its restore was interrupted by a restart" in d.log_all()
    assert sorted(os.listdir(os.path.join(d.state_dir, "disks"))) == ["src.raw"]
    d.arm_faults("")
    d.restore_disk("back", "c", "rp1", "src")
    assert same(read_all(d.nbd_uri("back"), len(want)), want)
    assert sorted(os.listdir(os.path.join(d.state_dir, "disks"))) == ["back.raw", "src.raw"]


def point_after_lost_history(d, lose_metadata):
    """Disk `disk` written A, point rp1, B, rp2, C; then lose_metadata(d)
    brings back a metadata.db that knows rp1 but not rp2 (its tracking base
    is rp1's generation, which the tracker retired with rp2) and starts the
    daemon; D is written and rp3 made. rp3, restored, must be the disk: an
    incremental point on rp1 that copies only what the tracker still holds
    (C and D) would miss B."""
    size = 16 * MiB
    d.create_disk("disk", size)
    d.create_vm("vm", ["disk"])
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri("disk"), [(0, os.urandom(2 * MiB))])  # A
    d.create_restore_point("c", "rp1")
    lose_metadata(d, "before")
    nbd_write(d.nbd_uri("disk"), [(4 * MiB, os.urandom(2 * MiB))])  # B
    d.create_restore_point("c", "rp2")
    nbd_write(d.nbd_uri("disk"), [(8 * MiB, os.urandom(2 * MiB))])  # C
    lose_metadata(d, "after")
    nbd_write(d.nbd_uri("disk"), [(12 * MiB, os.urandom(2 * MiB))])  # D
    want = read_all(d.nbd_uri("disk"), size)
    d.create_restore_point("c", "rp3")
    d.restore_disk("back", "c", "rp3", "disk")
    assert same(read_all(d.nbd_uri("back"), size), want), "rp3 is not the disk"
    assert same(read_all(d.rp_uri("c", "rp3", "disk"), size), want), "rp3 is not the disk"
    assert d.disk_restore_point("c", "rp3", "disk")["properties"]["incremental"] is False
    assert "tracking history" in d.log_all()
    return d


def test_a_metadata_db_put_back_from_before_a_point_makes_the_next_point_full(make_daemon):
    """metadata.db copied aside (daemon stopped: a consistent copy) after rp1,
    put back after rp2 (its -wal and -shm removed)."""
    backup = None

    def lose(d, when):
        nonlocal backup
        db = os.path.join(d.state_dir, "metadata.db")
        d.stop()
        if when == "before":
            backup = db + ".bak"
            shutil.copy(db, backup)
        else:
            for f in glob.glob(db + "-*"):
                os.unlink(f)
            os.replace(backup, db)
        d.start()

    point_after_lost_history(make_daemon().start(), lose)


def test_a_metadata_db_wal_lost_in_a_crash_makes_the_next_point_full(make_daemon):
    """metadata.db-wal deleted while the daemon runs (rp2's commit only in it),
    then kill -9: the restart's metadata.db ends at rp1."""
    def lose(d, when):
        db = os.path.join(d.state_dir, "metadata.db")
        if when == "before":
            d.restart()  # a clean stop checkpoints: rp1 is in metadata.db itself
            assert not os.path.exists(db + "-wal") or os.path.getsize(db + "-wal") == 0
            return
        os.unlink(db + "-wal")
        d.kill9()
        d.start()
        # rp2's commit went with the -wal: the point comes back from the
        # region's manifest, not its tracking base.
        assert "restorePoints/rp2 imported" in d.log(), d.log()[-3000:]

    point_after_lost_history(make_daemon().start(), lose)
