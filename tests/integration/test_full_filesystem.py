"""Real full filesystems (small tmpfs mounts, root only), as an unlucky
operator meets them: the region that keeps the restore points fills up, or
the filesystem of the state directory (metadata.db) does.

Each must fail the request that needs the space with a clear error, keep the
daemon serving, leave every restore point that said Succeeded readable and
exact, and work again once there is room: never a crash, never a lost or
corrupted point.
"""
import os
import random
import subprocess

import pytest

from conftest import require

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rpointd_harness import images_equal, nbd_save, nbd_write, operation_path  # noqa: E402

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts small tmpfs file systems; unmounts them at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def mount(name, size_mib):
        mnt = tmp_path / name
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(mounts):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def resize(mnt, size_mib):
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(mnt)], check=True)


def check_point(d, tmp_path, rp, what):
    """rp of collection c equals disk a now, read through its export."""
    a = nbd_save(d.nbd_uri("a"), tmp_path / "a.disk")
    b = nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.point")
    same, msg = images_equal(a, b)
    assert same, f"{rp} ({what}) is not the disk: {msg}\n{d.log()}"


def failed_point(d, name):
    """Starts point `name` of collection c; returns its Failed operation's error."""
    r = d.start_restore_point("c", name)
    assert r.status in (201, 507), r
    if r.status == 507:
        return r.json["error"]
    op = d.wait_operation(operation_path(r))
    assert op["status"] == "Failed", op
    return op["error"]


def test_full_region_fails_the_point_keeps_the_others(make_daemon, tmp_path, tmpfs):
    """The region's filesystem (24 MiB) holds rp0 of a 16 MiB disk but not an
    rp1 after 16 MiB more of changes: rp1 fails (a clear out-of-space error,
    its partial packs removed), the daemon serves on, rp0 still reads back
    exactly and verifies; once the filesystem is grown, rp2 succeeds and
    equals the disk, and so does a disk restored from it."""
    region = tmpfs("region", 24)
    d = make_daemon(config_text=f"regions:\n  - name: small\n    path: {region}\n").start()
    d.create_disk("a", 32 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm", location="small")
    rng = random.Random(7)
    nbd_write(d.nbd_uri("a"), [(0, rng.randbytes(16 * MiB))])
    d.create_restore_point("c", "rp0")
    rp0 = nbd_save(d.rp_uri("c", "rp0", "a"), tmp_path / "rp0.want")
    used_after_rp0 = os.statvfs(region).f_bfree

    nbd_write(d.nbd_uri("a"), [(16 * MiB, rng.randbytes(16 * MiB))])
    err = failed_point(d, "rp1")
    text = (err.get("code", "") + " " + err.get("message", "")).lower()
    assert "no space left" in text, err
    # The failed point's packs are gone: the region has the room it had.
    free = os.statvfs(region).f_bfree
    assert free >= used_after_rp0 - 64, (free, used_after_rp0, sorted(os.listdir(region)))
    assert d.api("GET", "/health").status == 200

    # rp0 is untouched: its export reads what it read, and it verifies.
    again = nbd_save(d.rp_uri("c", "rp0", "a"), tmp_path / "rp0.again")
    same, msg = images_equal(rp0, again)
    assert same, msg
    v = d.verify_restore_point("c", "rp0")
    assert v["status"] == "Succeeded", v

    resize(region, 96)
    nbd_write(d.nbd_uri("a"), [(3 * MiB, rng.randbytes(8192))])
    d.delete_restore_point("c", "rp1")
    d.create_restore_point("c", "rp2")
    check_point(d, tmp_path, "rp2", "after the region was grown")
    d.restore_disk("back", "c", "rp2", "a")
    same, msg = images_equal(nbd_save(d.nbd_uri("a"), tmp_path / "a2.disk"),
                             nbd_save(d.nbd_uri("back"), tmp_path / "back.disk"))
    assert same, msg
    # A restart reads the same region back.
    d.stop()
    d.start()
    check_point(d, tmp_path, "rp2", "after a restart")


def test_full_state_filesystem_refuses_cleanly_and_recovers(make_daemon, tmp_path, tmpfs):
    """metadata.db's filesystem filled by another file (the disks and the
    region elsewhere): requests that must record something fail with a clear
    error and no crash; reads keep working; the guest's disk keeps serving
    writes; with the room back, a point succeeds and equals the disk, and a
    restart finds every record."""
    meta = tmpfs("meta", 8)
    d = make_daemon(config_text=f"metadata_db: {meta}/metadata.db\n").start()
    d.create_disk("a", 16 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(11)
    nbd_write(d.nbd_uri("a"), [(0, rng.randbytes(4 * MiB))])
    d.create_restore_point("c", "rp0")

    filler = meta / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError:
            pass
    statuses = []
    for i in range(5):
        r = d.api("PUT", f"/disks/x{i}", {"properties": {"sizeBytes": MiB}})
        statuses.append(r.status)
        if r.status >= 400:
            assert r.json["error"]["code"] == "NoSpace", r
            assert "metadata.db" in r.json["error"]["message"], r
    r = d.start_restore_point("c", "rp1")
    statuses.append(r.status)
    if r.status == 201:
        op = d.wait_operation(operation_path(r))
        assert op["status"] in ("Succeeded", "Failed"), op
    assert d.api("GET", "/disks/a").status == 200
    assert d.api("GET", "/restorePointCollections/c/restorePoints/rp0").status == 200
    nbd_write(d.nbd_uri("a"), [(5 * MiB, rng.randbytes(64 << 10))])  # the guest goes on
    assert d.proc.poll() is None, d.log()
    # 8 MiB cannot have held them all: 507 NoSpace, naming the database.
    assert 507 in statuses and set(statuses) <= {200, 201, 507}, statuses
    # A refused disk left no backing file behind (its record was never made).
    disks_dir = os.path.join(d.state_dir, "disks")
    refused = [f"x{i}" for i, s in enumerate(statuses[:5]) if s == 507]
    assert not [f for f in os.listdir(disks_dir) if any(f.startswith(x) for x in refused)], \
        os.listdir(disks_dir)

    os.unlink(filler)
    nbd_write(d.nbd_uri("a"), [(9 * MiB, rng.randbytes(4096))])
    d.create_restore_point("c", "rp2")
    check_point(d, tmp_path, "rp2", "with the room back")
    check_point_rp0 = nbd_save(d.rp_uri("c", "rp0", "a"), tmp_path / "rp0.point")
    assert os.path.getsize(check_point_rp0) == 16 * MiB
    d.stop()
    d.start()
    r = d.api("GET", "/restorePointCollections/c/restorePoints")
    names = {p["name"] for p in r.json["value"]}
    assert {"rp0", "rp2"} <= names, names
    check_point(d, tmp_path, "rp2", "after a restart")


def test_full_disk_filesystem_fails_the_guest_write_not_the_daemon(make_daemon, tmp_path,
                                                                   tmpfs):
    """A sparse 64 MiB disk on a 12 MiB filesystem: the guest's writes past
    the room fail with ENOSPC over NBD (the client sees an error, not a hang
    or a disconnect), the daemon and the export stay up, and what was
    written before reads back. With the filesystem grown, the same writes
    succeed and a restore point equals the disk."""
    disks = tmpfs("disks", 12)
    d = make_daemon(config_text=f"disks_dir: {disks}\n").start()
    d.create_disk("a", 64 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(5)
    first = rng.randbytes(4 * MiB)
    nbd_write(d.nbd_uri("a"), [(0, first)])

    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("a"))
    errors = 0
    chunk = rng.randbytes(MiB)
    for i in range(8, 40):
        try:
            h.pwrite(chunk, i * MiB)
        except nbd.Error as e:
            errors += 1
            assert e.errno in (28, None) or "space" in str(e).lower(), e  # ENOSPC
    try:
        h.flush()
    except nbd.Error:
        errors += 1
    assert errors > 0, "a 12 MiB filesystem took 32 MiB of writes"
    assert h.pread(4 * MiB, 0) == first  # the same connection still serves
    h.shutdown()
    assert d.proc.poll() is None, d.log()
    assert d.api("GET", "/disks/a").status == 200

    resize(disks, 128)
    nbd_write(d.nbd_uri("a"), [(i * MiB, chunk) for i in range(8, 40)])
    d.create_restore_point("c", "rp0")
    check_point(d, tmp_path, "rp0", "after the disk's filesystem was grown")
