"""A lost or stale metadata.db never costs a disk its data.

metadata.db names the managed disks; their data lives in <state>/disks/NAME.raw.
An operator who loses metadata.db (deleted, or put back from an old copy) must
find the disks again, byte for byte, not have rpointd delete the files no row
names: only a file that never held data (a create interrupted before its row
committed) or the tombstone of a committed delete may go. Real daemon, real
NBD writes (python3-libnbd), real kill -9.
"""
import glob
import os
import shutil

import nbd
import pytest

from rpointd_harness import nbd_write

MiB = 1 << 20


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
        assert read_all(d.nbd_uri(n), size) == want[n], f"disk {n} lost data"
    assert "recovered" in d.log_all()
    # The restore points came back from the region; the VM is made again with
    # its recovered disks, and its next point is full (the tracking history
    # went with metadata.db) and equals the disks.
    assert read_all(d.rp_uri("c", "rp1", "web.os"), 8 * MiB) == first
    d.create_vm("vm", ["web.os", "data"])
    d.create_restore_point("c", "rp2")
    for n in ("web.os", "data"):
        drp = d.disk_restore_point("c", "rp2", n)["properties"]
        assert drp["incremental"] is False, drp
        assert read_all(d.rp_uri("c", "rp2", n), size) == want[n]


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
    assert read_all(d.nbd_uri("new"), 8 * MiB)[MiB:3 * MiB] == data
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
    assert read_all(d.nbd_uri("kept"), MiB) == data
    assert d.api("GET", "/disks/half").status == 404
    # A real delete leaves nothing behind, and the name is free again.
    assert d.api("DELETE", "/disks/kept").status in (200, 202, 204)
    assert os.listdir(disks) == []
    d.create_disk("kept", 8 * MiB)
    assert read_all(d.nbd_uri("kept"), MiB) == bytes(MiB)


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
        assert f.read(2 * MiB) == data
    # Following the advice brings the disk and the point back.
    for f in glob.glob(db + "*"):
        os.rename(f, f + ".damaged")
    d.start()
    assert read_all(d.nbd_uri("disk"), 2 * MiB) == data
    assert read_all(d.rp_uri("c", "rp1", "disk"), 2 * MiB) == data
