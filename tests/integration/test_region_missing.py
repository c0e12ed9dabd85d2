"""A region whose store is not there is unavailable, never silently replaced.

The unlucky operator's case: the region lives on a filesystem that did not
mount at boot (or its directory was removed). Before, rpointd created an
empty store in the bare mountpoint: new points landed on the wrong
filesystem, the old ones still said Succeeded and failed on read, and once
the filesystem was mounted again the points made meanwhile were hidden
under it. Now:

(a) missing at start while metadata.db records points in it: the region is
    Unavailable (GET /regions says why), nothing is created in its place,
    everything needing it answers 503 Unavailable, the disks serve; mounted
    again (the directory back) and restarted, every point reads back exactly.
(b) its data really gone: deleting its points drops their records; after a
    restart an empty store is created and new (full) points work.
(c) removed while the daemon runs: new points, restores and exports fail at
    once with 503 / RegionUnavailable naming the removal, instead of
    "open pack ...: No such file" on every try; nothing is recreated.
(d) a damaged store.db: the daemon starts (before, it refused, and no disk
    was served), the region is Unavailable saying Corruption; moved aside,
    it is rebuilt and every point reads back.
"""
import os
import random
import shutil

import pytest

from conftest import require
from rpointd_harness import nbd_digest, nbd_write

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy")


def region_state(d):
    r = d.api("GET", "/regions")
    assert r.status == 200, r
    (local,) = [g for g in r.json["value"] if g["name"] == "local"]
    return local["properties"]


def make_point(d):
    rng = random.Random(11)
    d.create_disk("a", 16 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri("a"), [(o, rng.randbytes(MiB)) for o in range(0, 12 * MiB, 3 * MiB)])
    d.create_restore_point("c", "rp1")
    # Changes after the point: what the disk (not the point) holds.
    nbd_write(d.nbd_uri("a"), [(MiB, b"after" * 4096)])
    return nbd_digest(d.rp_uri("c", "rp1", "a")), nbd_digest(d.nbd_uri("a"))


def assert_unavailable(d, why):
    props = region_state(d)
    assert props["state"] == "Unavailable", props
    assert props["error"]["code"] == "RegionUnavailable", props
    assert why in props["error"]["message"], props
    new = d.api("PUT", "/restorePointCollections/c/restorePoints/rp-new", {})
    assert new.status == 503 and new.json["error"]["code"] == "Unavailable", new
    assert why in new.json["error"]["message"], new
    restore = d.api(
        "PUT", "/disks/r",
        {"properties": {"creationData": {
            "sourceResourceId": "/restorePointCollections/c/restorePoints/rp1/diskRestorePoints/a"}}})
    assert restore.status == 503, restore
    for path in ("/regions/local/repair", "/regions/local/gc"):
        r = d.api("POST", path)
        assert r.status == 503, (path, r)
    # Listing and showing still work; the disk still serves.
    assert d.api("GET", "/restorePointCollections/c/restorePoints/rp1").status == 200


def test_region_missing_at_start_is_unavailable_until_it_is_back(daemon):
    rp1, disk = make_point(daemon)
    region = daemon.region_dir()
    daemon.stop()
    away = region + ".unmounted"
    os.rename(region, away)
    os.mkdir(region)  # the bare mountpoint
    daemon.start()
    assert_unavailable(daemon, "missing")
    assert nbd_digest(daemon.nbd_uri("a")) == disk
    assert os.listdir(region) == [], "an empty store was created in the mountpoint"
    assert "region 'local' is unavailable" in daemon.log_all()
    daemon.stop()
    os.rmdir(region)
    os.rename(away, region)  # "mounted" again
    daemon.start()
    assert region_state(daemon)["state"] == "Available"
    assert nbd_digest(daemon.rp_uri("c", "rp1", "a")) == rp1
    daemon.verify_restore_point("c", "rp1")
    daemon.create_restore_point("c", "rp2")
    assert daemon.disk_restore_point("c", "rp2", "a")["properties"]["incremental"]
    assert nbd_digest(daemon.rp_uri("c", "rp2", "a")) == disk


def test_region_data_gone_delete_points_then_a_fresh_store(daemon):
    make_point(daemon)
    region = daemon.region_dir()
    daemon.stop()
    shutil.rmtree(region)
    daemon.start()
    assert_unavailable(daemon, "missing")
    daemon.delete_restore_point("c", "rp1")
    daemon.restart()
    assert region_state(daemon)["state"] == "Available", daemon.log()
    disk = nbd_digest(daemon.nbd_uri("a"))
    daemon.create_restore_point("c", "rp2")
    assert not daemon.disk_restore_point("c", "rp2", "a")["properties"]["incremental"]
    assert nbd_digest(daemon.rp_uri("c", "rp2", "a")) == disk


def test_region_removed_while_running_fails_loudly_and_is_not_recreated(daemon):
    make_point(daemon)
    region = daemon.region_dir()
    shutil.rmtree(region)
    assert_unavailable(daemon, "removed")
    assert not os.path.exists(region)
    assert daemon.api("GET", "/disks/a").status == 200
    # After a restart it is missing at start: still unavailable, still not recreated.
    daemon.restart()
    assert_unavailable(daemon, "missing")
    assert not os.path.exists(region)


def test_damaged_store_db_leaves_the_region_unavailable_and_the_disks_served(daemon):
    rp1, disk = make_point(daemon)
    db = os.path.join(daemon.region_dir(), "store.db")
    daemon.stop()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    with open(db, "r+b") as f:  # garbage over the header and the first pages
        f.write(b"\xa5" * 8192)
    daemon.start()  # before: the daemon refused to start, so no VM disk served
    props = region_state(daemon)
    assert props["state"] == "Unavailable", props
    assert "Corruption" in props["error"]["message"], props
    assert nbd_digest(daemon.nbd_uri("a")) == disk
    # Moved aside, as the message says: rebuilt from the packs, every point back.
    daemon.stop()
    os.rename(db, db + ".damaged")
    daemon.start()
    assert region_state(daemon)["state"] == "Available", daemon.log()
    assert nbd_digest(daemon.rp_uri("c", "rp1", "a")) == rp1
