"""A damaged change-tracking file never takes the disk out of service and never
makes a point miss a change (docs/restore-points.md, *Change tracking across
crashes*).

The newest generation file of a disk (the one that holds the changes since the
last point) is damaged while the daemon is stopped: zeroed, truncated into its
header, or truncated after its header (the fine map gone). After the restart
the disk is served, and the next point equals the disk byte for byte: for a
file with no readable header a full copy (the history is dropped, loudly), for
a short one the lost blocks count as changed.
"""
import os
import random

import pytest

from conftest import require

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rpointd_harness import images_equal, nbd_save, nbd_write  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


def newest_generation(d, disk):
    t = os.path.join(d.state_dir, "tracking", disk)
    return os.path.join(t, sorted(f for f in os.listdir(t) if f.endswith(".ctbm"))[-1])


def disk_changed_after_a_point(make_daemon, seed):
    """A daemon with disk `a` of VM `vm`, point rp0 of collection c, and two
    writes after it: the changes the damaged file holds. Returns (d, rng)."""
    d = make_daemon().start()
    d.create_disk("a", SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(seed)
    nbd_write(d.nbd_uri("a"), [(0, rng.randbytes(SIZE))])
    d.create_restore_point("c", "rp0")
    nbd_write(d.nbd_uri("a"), [(5 * MiB, rng.randbytes(64 << 10)),
                               (11 * MiB + 4096, rng.randbytes(4096))])
    return d, rng


def restart_and_check_rp1(d, tmp_path, what):
    """Restarts d: disk `a` is served, and rp1 equals it byte for byte.
    Returns rp1's disk restore point properties."""
    d.start()
    r = d.api("GET", "/disks/a")
    assert r.status == 200 and r.json["properties"]["diskState"] != "Unavailable", r
    d.create_restore_point("c", "rp1")
    a = nbd_save(d.nbd_uri("a"), tmp_path / "a.disk")
    b = nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "rp1.point")
    same, msg = images_equal(a, b)
    assert same, f"rp1 misses changes after {what}: {msg}\n{d.log()}"
    return d.disk_restore_point("c", "rp1", "a")["properties"]


@pytest.mark.parametrize("damage", ["zeroed", "cut-in-header", "cut-after-header"])
def test_damaged_tracking_file_keeps_the_disk_and_every_change(make_daemon, tmp_path, damage):
    d, rng = disk_changed_after_a_point(make_daemon, 7)
    assert d.stop() == 0, d.log()
    gen = newest_generation(d, "a")
    with open(gen, "r+b") as f:
        if damage == "zeroed":
            f.write(bytes(os.fstat(f.fileno()).st_size))
        elif damage == "cut-in-header":
            f.truncate(16)
        else:
            f.truncate(4096)
    drp = restart_and_check_rp1(d, tmp_path, f"the tracking file was {damage}")
    if damage == "cut-after-header":
        assert "shorter than its disk needs" in d.log_all()
    else:
        assert drp["incremental"] is False, drp
        assert "tracking history of this disk is dropped" in d.log_all()
    # The tracker goes on: the point after is incremental again and exact.
    nbd_write(d.nbd_uri("a"), [(2 * MiB, rng.randbytes(4096))])
    d.create_restore_point("c", "rp2")
    drp = d.disk_restore_point("c", "rp2", "a")["properties"]
    assert drp["incremental"] is True, drp
    b = nbd_save(d.rp_uri("c", "rp2", "a"), tmp_path / "rp2.point")
    a = nbd_save(d.nbd_uri("a"), tmp_path / "a2.disk")
    assert images_equal(a, b)[0]


@pytest.mark.parametrize("stop", ["clean", "kill9"])
def test_grown_disk_written_only_past_the_coarse_map(make_daemon, stop):
    """A disk made small, then grown more than 126x before its next point: its
    blocks past the generation's coarse map (here past 31.5 GiB of a disk made
    at 64 MiB) are covered only by the header's widen flag. A generation
    marked only there must survive a restart (clean: its fine bits written;
    kill -9: widened), so the next incremental point holds the write."""
    d = make_daemon().start()
    d.create_disk("a", 64 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    d.create_restore_point("c", "rp0")
    grown, at = 33 << 30, 65 << 29  # the map ends at 31.5 GiB
    r = d.api("PATCH", "/disks/a", {"properties": {"sizeBytes": grown}})
    assert r.status == 200, r
    data = random.Random(9).randbytes(4096)
    nbd_write(d.nbd_uri("a"), [(at, data)])
    if stop == "clean":
        assert d.stop() == 0, d.log()
    else:
        d.kill9()
    d.start()
    d.create_restore_point("c", "rp1")
    drp = d.disk_restore_point("c", "rp1", "a")["properties"]
    assert drp["incremental"] is True, drp
    h = nbd.NBD()
    h.connect_uri(d.rp_uri("c", "rp1", "a"))
    try:
        assert h.pread(4096, at) == data, f"rp1 lost the write at {at} ({stop} restart)"
    finally:
        h.shutdown()


def test_flipped_header_bit_after_kill9_makes_the_next_point_full(make_daemon, tmp_path):
    """A single flipped bit in the header of the generation a kill -9 left
    unfinished: its coarse shift (4, regions of 16 blocks, read as 0: regions
    of one block) would make the restart widen block numbers instead of
    regions and the next incremental point miss the writes. The header's
    checksum catches it: the history is dropped, loudly, and the next point is
    full and equals the disk."""
    d, _ = disk_changed_after_a_point(make_daemon, 11)
    d.kill9()
    gen = newest_generation(d, "a")
    with open(gen, "r+b") as f:
        head = bytearray(f.read(32))
        assert head[:8] == b"RPCTBM02" and head[12] & 1, "the active generation is unfinished"
        assert head[24] == 4, f"coarse shift {head[24]}: the disk size changed?"
        head[24] ^= 1 << 2
        f.seek(0)
        f.write(head)
    drp = restart_and_check_rp1(d, tmp_path, "a flipped coarse-shift bit")
    assert drp["incremental"] is False, drp
    log = d.log_all()
    assert "fails its header checksum" in log and "tracking history of this disk is dropped" in log
    assert "tracking/a" in log  # the line names the disk


def write_load(uri, seed, stop):
    """A background writer: random 4 KiB writes all over the disk, a flush
    every 32, until `stop` is set. Returns (thread, errors)."""
    import threading

    errors = []

    def run():
        rng = random.Random(seed)
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            n = 0
            while not stop.is_set():
                h.pwrite(rng.randbytes(4096), rng.randrange(SIZE // 4096) * 4096)
                n += 1
                if n % 32 == 0:
                    h.flush()
            h.flush()
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
        finally:
            h.shutdown()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def check_point(d, tmp_path, rp, what):
    """rp of disk `a` equals the disk (qemu-img compare: digests, not bytes in
    an assert); returns its disk restore point properties."""
    d.create_restore_point("c", rp)
    a = nbd_save(d.nbd_uri("a"), tmp_path / f"{rp}.disk")
    b = nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.point")
    same, msg = images_equal(a, b)
    assert same, f"{rp} differs from the disk after {what}: {msg}\n{d.log()}"
    return d.disk_restore_point("c", rp, "a")["properties"]


@pytest.mark.parametrize("damage", ["rm-dir", "rm-file", "truncate-file"])
def test_tracking_files_lost_while_running_make_the_next_point_full(make_daemon, tmp_path,
                                                                   damage):
    """The tracking directory removed (an operator's rm -rf), or the
    generation file holding the changes since rp0 deleted or truncated, while
    the daemon runs under an NBD write load. The next point succeeds (no
    CutFailed), is full (the history is dropped: its files can no longer
    vouch for it after a crash) and equals the disk; the point after it is
    incremental and exact again, and so is one after a kill -9."""
    import shutil
    import threading
    import time

    d, rng = disk_changed_after_a_point(make_daemon, 13)
    track = os.path.join(d.state_dir, "tracking", "a")
    stop = threading.Event()
    t, errors = write_load(d.nbd_uri("a"), 5, stop)
    time.sleep(0.5)
    if damage == "rm-dir":
        shutil.rmtree(track)
    elif damage == "rm-file":
        os.unlink(newest_generation(d, "a"))
    else:
        os.truncate(newest_generation(d, "a"), 0)
    time.sleep(1.0)  # writes land after the damage too
    stop.set()
    t.join(60)
    assert not t.is_alive() and not errors, errors

    drp = check_point(d, tmp_path, "rp1", f"{damage} of the tracking files")
    assert drp["incremental"] is False, drp
    assert "tracking history of this disk is dropped" in d.log_all()
    assert os.path.exists(os.path.join(track, "id")), os.listdir(track)

    nbd_write(d.nbd_uri("a"), [(3 * MiB, rng.randbytes(8192)), (SIZE - 4096, rng.randbytes(4096))])
    drp = check_point(d, tmp_path, "rp2", f"{damage}, one point later")
    assert drp["incremental"] is True, drp

    nbd_write(d.nbd_uri("a"), [(7 * MiB, rng.randbytes(65536))])
    d.kill9()
    d.start()
    drp = check_point(d, tmp_path, "rp3", f"{damage}, then a kill -9")
    assert drp["incremental"] is True, drp


@pytest.mark.parametrize("stop", ["clean", "kill9", "kill9-at-once", "kill9-live-too"])
def test_tracking_file_deleted_while_running_is_no_hole_after_a_restart(make_daemon, tmp_path,
                                                                       stop):
    """The generation file holding the changes since rp0 deleted while the
    daemon runs, and no point before the daemon stops (clean: at once; kill -9:
    after the flusher's file check had its second; kill -9 at once: before
    any check, so only the start-up can tell, from the generations it
    recorded; live too: the record of those generations deleted with it, so
    the start-up finds a history with no record at all). The restart must not
    take the remaining files for the whole history: rp1 is full, equals the
    disk, and so does a disk restored from it."""
    import time

    d, rng = disk_changed_after_a_point(make_daemon, 17)
    os.unlink(newest_generation(d, "a"))
    if stop == "kill9-live-too":
        os.unlink(os.path.join(d.state_dir, "tracking", "a", "live"))
    nbd_write(d.nbd_uri("a"), [(9 * MiB, rng.randbytes(4096))])  # only in memory now
    if stop == "clean":
        assert d.stop() == 0, d.log()
    elif stop == "kill9":
        time.sleep(3)  # the check runs every second
        d.kill9()
    else:
        d.kill9()
    if stop not in ("kill9-at-once", "kill9-live-too"):
        drp = restart_and_check_rp1(d, tmp_path, "a tracking file deleted while running")
        assert drp["incremental"] is False, drp
        return
    d.start()
    nbd_write(d.nbd_uri("a"), [(13 * MiB, rng.randbytes(8192))])  # after the restart
    d.create_restore_point("c", "rp1")
    drp = d.disk_restore_point("c", "rp1", "a")["properties"]
    d.restore_disk("back", "c", "rp1", "a")
    a = nbd_save(d.nbd_uri("a"), tmp_path / "a.disk")
    b = nbd_save(d.nbd_uri("back"), tmp_path / "back.disk")
    same, msg = images_equal(a, b)
    assert same, f"rp1 misses changes after a tracking file deleted, then kill -9: {msg}\n{d.log()}"
    assert drp["incremental"] is False, drp
    assert "tracking history of this disk is dropped" in d.log_all()
