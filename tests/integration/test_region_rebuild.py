"""A region survives the loss of its index and of the daemon's metadata, and
travels: nothing in it is deleted unless an operator asks (issue #7, defect 2).

(b) store.db deleted while the daemon is down: every point is still listed and
    its NBD exports read exactly what they read before; no pack is unlinked.
(c) a fresh metadata.db beside the region: no pack is unlinked, the points are
    imported from the region's manifests and can be exported and restored.
(d) the region's directory copied into a second daemon's state dir (its own
    metadata.db, the region configured to that path): listed and restored there.
(e) store points no restore point names are kept until
    `rpoint region gc NAME --orphans`, which deletes them and their packs;
    `rpoint region repair NAME` deletes nothing.
"""
import glob
import json
import os
import random
import shutil

import pytest

from conftest import require
from rpointd_harness import images_equal, nbd_save, nbd_write

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


def packs(region):
    return sorted(glob.glob(os.path.join(region, "packs", "*", "*.pack")))


def make_points(d, tmp_path):
    """VM with two disks, two restore points with data; returns the reference
    images of every disk restore point, saved through NBD."""
    rng = random.Random(7)
    d.create_disk("a", 24 * MiB)
    d.create_disk("b", 8 * MiB)
    d.create_vm("vm", ["a", "b"], configuration={"cpu": 2, "note": "portable"})
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri("a"), [(o, rng.randbytes(MiB)) for o in range(0, 20 * MiB, 2 * MiB)])
    nbd_write(d.nbd_uri("b"), [(3 * MiB, rng.randbytes(2 * MiB))])
    d.create_restore_point("c", "rp1")
    nbd_write(d.nbd_uri("a"), [(5 * MiB + 4096, rng.randbytes(3 * MiB)), (22 * MiB, b"x" * 65536)])
    nbd_write(d.nbd_uri("b"), [(0, rng.randbytes(MiB))])
    d.create_restore_point("c", "rp2")
    ref = {}
    for rp in ("rp1", "rp2"):
        for disk in ("a", "b"):
            ref[(rp, disk)] = nbd_save(d.rp_uri("c", rp, disk), tmp_path / f"ref-{rp}-{disk}.img")
    return ref


def check_points(d, ref, tmp_path, tag):
    pts = d.api("GET", "/restorePointCollections/c/restorePoints")
    assert pts.status == 200, f"{pts}\n{d.log()}"
    names = [p["name"] for p in pts.json["value"]]
    assert names == ["rp1", "rp2"], f"{names}\n{d.log()}"
    for p in pts.json["value"]:
        assert p["properties"]["provisioningState"] == "Succeeded", f"{p}\n{d.log()}"
    for (rp, disk), want in ref.items():
        got = nbd_save(d.rp_uri("c", rp, disk), tmp_path / f"{tag}-{rp}-{disk}.img")
        same, msg = images_equal(want, got)
        assert same, f"{tag}: {rp}/{disk} reads other data: {msg}\n{d.log()}"
    for rp in ("rp1", "rp2"):
        v = d.verify_restore_point("c", rp)
        assert v["properties"]["output"]["ok"], v


def restore_and_compare(d, ref, tmp_path, disk, tag):
    d.restore_disk(disk, "c", "rp2", "a")
    got = nbd_save(d.nbd_uri(disk), tmp_path / f"{tag}-restored.img")
    same, msg = images_equal(ref[("rp2", "a")], got)
    assert same, f"{tag}: restored disk differs: {msg}"


def remove_db(path):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


def test_lost_store_db_is_rebuilt_and_nothing_is_deleted(daemon, tmp_path):
    ref = make_points(daemon, tmp_path)
    region = daemon.region_dir()
    before = packs(region)
    assert before
    daemon.stop()
    remove_db(os.path.join(region, "store.db"))
    daemon.start()
    assert packs(region) == before, daemon.log()
    check_points(daemon, ref, tmp_path, "rebuilt")
    # New points still work on the rebuilt index (incremental from rp2).
    nbd_write(daemon.nbd_uri("a"), [(0, b"y" * 65536)])
    daemon.create_restore_point("c", "rp3")
    assert daemon.disk_restore_point("c", "rp3", "a")["properties"]["incremental"]
    # Manifests missing (a region from before they existed) are written at start.
    manifests = os.path.join(region, "manifests")
    assert sorted(os.listdir(manifests)) == ["c~rp1.json", "c~rp2.json", "c~rp3.json"]
    daemon.stop()
    for m in os.listdir(manifests):
        os.unlink(os.path.join(manifests, m))
    daemon.start()
    assert sorted(os.listdir(manifests)) == ["c~rp1.json", "c~rp2.json", "c~rp3.json"]


def test_fresh_metadata_db_imports_the_region(daemon, tmp_path):
    ref = make_points(daemon, tmp_path)
    region = daemon.region_dir()
    before = packs(region)
    daemon.stop()
    remove_db(os.path.join(daemon.state_dir, "metadata.db"))
    daemon.start()
    assert packs(region) == before, daemon.log()
    c = daemon.api("GET", "/restorePointCollections/c")
    assert c.status == 200, c
    assert c.json["properties"]["source"]["id"] == "/vms/vm"
    check_points(daemon, ref, tmp_path, "imported")
    rp = daemon.get_restore_point("c", "rp2")["properties"]
    assert rp["sourceMetadata"]["configuration"] == {"cpu": 2, "note": "portable"}
    restore_and_compare(daemon, ref, tmp_path, "r", "imported")
    # A second start changes nothing (the points are known now).
    daemon.restart()
    assert packs(region) == before
    check_points(daemon, ref, tmp_path, "again")


def test_region_copied_to_another_daemon(make_daemon, tmp_path):
    d1 = make_daemon("one").start()
    ref = make_points(d1, tmp_path)
    before = packs(d1.region_dir())
    d1.stop()
    copy = str(tmp_path / "two" / "moved-region")
    shutil.copytree(d1.region_dir(), copy, ignore=shutil.ignore_patterns("LOCK"))
    d2 = make_daemon("two", config_text=f"regions:\n  - name: far\n    path: {copy}\n").start()
    assert packs(copy) == [p.replace(d1.region_dir(), copy) for p in before], d2.log()
    c = d2.api("GET", "/restorePointCollections/c")
    assert c.status == 200, f"{c}\n{d2.log()}"
    assert c.json["location"] == "far"
    check_points(d2, ref, tmp_path, "copied")
    restore_and_compare(d2, ref, tmp_path, "there", "copied")
    assert d2.stop() == 0


def test_unnamed_points_are_kept_until_gc_orphans(daemon, tmp_path):
    make_points(daemon, tmp_path)
    region = daemon.region_dir()
    before = packs(region)
    daemon.stop()
    # Neither metadata.db nor the manifests name the store points now.
    remove_db(os.path.join(daemon.state_dir, "metadata.db"))
    for m in glob.glob(os.path.join(region, "manifests", "*.json")):
        os.unlink(m)
    daemon.start()
    assert packs(region) == before, daemon.log()
    assert daemon.api("GET", "/restorePointCollections").json["value"] == []
    rep = json.loads(daemon.cli("region", "repair", "local", "-o", "json").stdout)
    assert rep["packsIndexed"] == 0 and rep["restorePointsImported"] == []
    assert packs(region) == before
    plain = daemon.api("POST", "/regions/local/gc")
    assert plain.status == 200, plain
    assert packs(region) == before  # a plain GC keeps the unnamed store points
    r = json.loads(daemon.cli("region", "gc", "local", "--orphans", "-o", "json").stdout)
    assert r["storePointsDeleted"] == 4, r
    assert packs(region) == [], r
    bad = daemon.api("POST", "/regions/nowhere/gc?orphans=true")
    assert bad.status == 404, bad
    bad = daemon.api("POST", "/regions/local/gc?orphans=maybe")
    assert bad.status == 400, bad
