"""Copy-before-write staging never makes a Succeeded restore point wrong.

* Points cut at the same time stage apart, whatever their names (disk d /
  collection x / point y.z and disk d.x / collection y / point z once shared
  one staging file).
* staging_dir (and tracking_dir) filling up fails the point with a clear
  error; every guest write succeeds, earlier points still verify, and once the
  space is back the next point captures every change.
* The copied data is made durable on the disk (fdatasync of the disk) before
  the tracker forgets the generation that recorded it.

Real daemon, real NBD writes (python3-libnbd), real tmpfs (root only).
"""
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rpointd_harness import images_equal, nbd_write, operation_path  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CI = os.environ.get("CI") == "true"


def need(cond, why):
    if not cond:
        if CI:
            pytest.fail(why)
        pytest.skip(why)


def read_all(uri, length, offset=0):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray()
    for off in range(offset, offset + length, 4 * MiB):
        out += h.pread(min(4 * MiB, offset + length - off), off)
    h.shutdown()
    return bytes(out)


def wait_cut(d, collection, name, timeout=60):
    """Polls until the point's cut is done (cutPauseMicroseconds shown) or it ended."""
    path = f"/restorePointCollections/{collection}/restorePoints/{name}?$expand=instanceView"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = d.api("GET", path).json["properties"]
        iv = p.get("instanceView") or {}
        if iv.get("cutPauseMicroseconds") is not None or p["provisioningState"] != "Creating":
            return p["provisioningState"]
        time.sleep(0.002)
    raise AssertionError(f"{collection}/{name}: no cut after {timeout} s")


def test_points_cut_together_with_once_colliding_names_are_exact(daemon):
    """Two VMs, one collection each, cut at the same time while both disks are
    written from the end back during the copy-out."""
    d = daemon
    size = 256 * MiB
    pairs = [("d", "x", "y.z"), ("d.x", "y", "z")]  # (disk, collection, point)
    before = {}
    for i, (disk, coll, _) in enumerate(pairs):
        d.create_disk(disk, size)
        d.create_vm(f"vm{i}", [disk])
        d.create_collection(coll, f"vm{i}")
        data = os.urandom(size)
        nbd_write(d.nbd_uri(disk), [(o, data[o:o + 4 * MiB]) for o in range(0, size, 4 * MiB)])
        before[disk] = hashlib.sha256(data).hexdigest()

    ops = []
    for disk, coll, rp in pairs:
        r = d.start_restore_point(coll, rp)
        assert r.status == 201, r
        ops.append(operation_path(r))
    for disk, coll, rp in pairs:
        wait_cut(d, coll, rp)
    # Both cuts are in: the disk images at the cuts are `before`. Now write
    # 64 KiB every 1 MiB from the end back on both disks, ahead of the copiers.
    handles = {}
    for disk, _, _ in pairs:
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri(disk))
        handles[disk] = h
    for off in range(size - MiB, -1, -MiB):
        for disk, _, _ in pairs:
            handles[disk].pwrite(bytes([0xEE]) * (64 * 1024), off)
    for h in handles.values():
        h.flush()
        h.shutdown()

    for op in ops:
        res = d.wait_operation(op)
        assert res["status"] == "Succeeded", res
    for disk, coll, rp in pairs:
        got = hashlib.sha256(read_all(d.rp_uri(coll, rp, disk), size)).hexdigest()
        assert got == before[disk], f"point {coll}/{rp} of disk {disk} differs from the disk at its cut"
    leftovers = [f for f in os.listdir(os.path.join(d.state_dir, "staging"))]
    assert not leftovers, f"staging_dir not empty after the points: {leftovers}"


@pytest.fixture
def small_tmpfs(tmp_path):
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    need(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_staging_dir_fails_the_point_never_the_guest(make_daemon, small_tmpfs):
    mnt = small_tmpfs
    d = make_daemon(config_text=f"tracking_dir: {mnt}/tracking\nstaging_dir: {mnt}/staging\n").start()
    # Past 2 GiB so the tracker's bitmap has a second page (at 64 KiB per bit),
    # which a write there needs marked in a fresh generation.
    size = 2 * GiB + 64 * MiB
    hot = 96 * MiB          # changed between the points: 48x the tmpfs
    far = 2 * GiB + 8 * MiB  # a second bitmap page
    d.create_disk("disk", size)
    d.create_vm("vm", ["disk"])
    d.create_collection("c", "vm")
    uri = d.nbd_uri("disk")
    first = os.urandom(hot)
    nbd_write(uri, [(o, first[o:o + 4 * MiB]) for o in range(0, hot, 4 * MiB)])
    d.create_restore_point("c", "rp1")

    second = os.urandom(hot)
    nbd_write(uri, [(o, second[o:o + 4 * MiB]) for o in range(0, hot, 4 * MiB)])
    # Overwrite every changed block from the end back, pass after pass, from
    # before the cut until rp2 ends, so the copier always finds blocks it has
    # to stage: far more than the tmpfs holds.
    third = os.urandom(hot)
    done = threading.Event()
    errors = []

    def overwrite(k, n):
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            while not done.is_set():  # whole passes: the disk ends up holding `third`
                for off in range(hot - (k + 1) * 64 * 1024, -1, -n * 64 * 1024):
                    h.pwrite(third[off:off + 64 * 1024], off)  # raises on any failed write
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    writers = [threading.Thread(target=overwrite, args=(k, 4), daemon=True) for k in range(4)]
    for t in writers:
        t.start()
    time.sleep(0.05)
    r = d.start_restore_point("c", "rp2")
    assert r.status == 201, r
    op = operation_path(r)
    try:
        res = d.wait_operation(op)
    finally:
        done.set()
        for t in writers:
            t.join(60)
    assert not errors, f"guest writes failed: {errors}"
    assert res["status"] == "Failed", res
    rp2 = d.get_restore_point("c", "rp2")["properties"]
    msg = (res.get("error") or {}).get("message", "") + " " + str(rp2)
    assert "staging" in msg and "No space left on device" in msg, (res, rp2)

    # The state filesystem completely full: a write the tracker must mark in a
    # bitmap page of its own still succeeds, and a point fails with the error.
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * (64 * 1024))
                f.flush()
        except OSError:
            pass
    far_data = os.urandom(MiB)
    nbd_write(uri, [(far, far_data)])
    full = d.create_restore_point("c", "rp-full", expect_status="Failed")
    assert "No space left on device" in str(full), full
    os.unlink(filler)

    # The guest writes all landed.
    assert read_all(uri, hot) == third
    assert read_all(uri, MiB, far) == far_data
    # The earlier point still verifies and reads what it held.
    v = d.verify_restore_point("c", "rp1")
    assert v["status"] == "Succeeded", v
    assert read_all(d.rp_uri("c", "rp1", "disk"), hot) == first

    # The failed point released its staging (an unnamed file, so nothing is
    # named in staging_dir): the space is back, and the next point captures
    # every change since rp1, the failed point's included.
    assert not os.listdir(mnt / "staging")
    vfs = os.statvfs(mnt)
    assert vfs.f_bavail * vfs.f_frsize > MiB, "the failed point's staging was not freed"
    d.create_restore_point("c", "rp3")
    equal, how = images_equal(f"nbd+unix:///disk?socket={d.nbd_sock}",
                              f"nbd+unix:///{d.rp_export('c', 'rp3', 'disk')}?socket={d.nbd_sock}")
    assert equal, how
    d.stop()


def test_disk_is_synced_after_the_copy_before_the_generation_is_retired(make_daemon):
    """strace of the daemon: the disk's descriptor gets an fdatasync after the
    copy-out and before the tracker unlinks the generation the point covered.
    This proves the order of the calls, not durability across a power loss
    (that is the power-loss VM lane's job)."""
    need(shutil.which("strace"), "strace is needed")
    d = make_daemon().start()
    d.create_disk("disk", 64 * MiB)
    d.create_vm("vm", ["disk"])
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri("disk"), [(0, os.urandom(4 * MiB))])
    d.create_restore_point("c", "rp1")
    nbd_write(d.nbd_uri("disk"), [(8 * MiB, os.urandom(MiB))])
    # Let the writes' flush settle, then trace only the point job.
    trace = os.path.join(d.state_dir, "strace.out")
    st = subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", "trace=fdatasync,fsync,unlink,unlinkat",
                           "-o", trace, "-p", str(d.proc.pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # strace attached to every thread
        d.create_restore_point("c", "rp2")
    finally:
        time.sleep(0.2)
        st.terminate()
        st.wait(10)
    lines = open(trace).read().splitlines()
    disk_file = os.path.realpath(os.path.join(d.state_dir, "disks"))
    # A call another thread interrupts is split ("<unfinished ...>"): match its start.
    sync_at = [i for i, l in enumerate(lines)
               if re.search(r"fdatasync\(\d+<" + re.escape(disk_file) + r"/disk[^>]*>", l)]
    retire_at = [i for i, l in enumerate(lines) if ".ctbm" in l and "unlink" in l]
    assert retire_at, "the point retired no generation:\n" + "\n".join(lines[-40:])
    assert sync_at and sync_at[0] < retire_at[0], (
        "no fdatasync of the disk before its generation was retired:\n" + "\n".join(lines[-60:]))
