"""Several restore point collections of one VM (one per region, as Azure's copy
flow needs), each incremental against its own previous point.

Two collections of one VM in two regions take points in turn with writes in
between (to disjoint chunk sets, so the counts are exact): each point reads
back byte-identical to the disk at its cut, and an incremental point's
blocksChanged is exactly the chunks written since *that collection's* previous
point. kill -9 between cuts and right after one changes nothing. A collection
created late starts with a full point. The tracker keeps generations only
while some collection still needs them: deleting the collection that lags
lets it retire them at once (its generation files go).
"""
import os
import random

import pytest

from conftest import require
from rpointd_harness import images_equal, nbd_save, nbd_write

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
DISK_SIZE = 64 * MiB
SLOTS = DISK_SIZE // G


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


def two_regions(tmp_path):
    return ("regions:\n"
            f"  - {{name: east, path: {tmp_path}/east, default: true}}\n"
            f"  - {{name: west, path: {tmp_path}/west}}\n")


def widened(blocks, per=16):
    """What an unclean stop leaves of a generation's blocks: every block of
    each coarse tracking region (1/256 of the disk, at least 1 MiB: 16 blocks
    here) one of them is in (engine/change_tracker.h)."""
    return {b for x in blocks for b in range(x // per * per, x // per * per + per)}


def generation_files(d, disk):
    t = os.path.join(d.state_dir, "tracking", disk)
    return sorted(f for f in os.listdir(t) if f.endswith(".ctbm"))


class Writer:
    """Writes random chunks to slots never written before."""

    def __init__(self, d, disk, seed):
        self.d, self.disk = d, disk
        self.rng = random.Random(seed)
        self.free = list(range(SLOTS))
        self.rng.shuffle(self.free)

    def write(self, n):
        slots = [self.free.pop() for _ in range(n)]
        nbd_write(self.d.nbd_uri(self.disk), [(s * G, self.rng.randbytes(G)) for s in slots])
        return set(slots)


def point(d, c, name, tmp_path):
    """Saves the disk, cuts a point; returns (disk restore point props, image)."""
    img = nbd_save(d.nbd_uri("a"), tmp_path / f"{c}-{name}.img")
    d.create_restore_point(c, name)
    return d.disk_restore_point(c, name, "a")["properties"], img


def check_exact(d, points, tmp_path):
    for (c, name), img in points.items():
        got = nbd_save(d.rp_uri(c, name, "a"), tmp_path / f"got-{c}-{name}.img")
        eq, msg = images_equal(img, got)
        assert eq, f"{c}/{name} differs from the disk at its cut: {msg}"


def test_two_collections_alternate_each_incremental_against_its_own(make_daemon, tmp_path):
    d = make_daemon(config_text=two_regions(tmp_path)).start()
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("ce", "vm", location="east")
    w = Writer(d, "a", 5)
    imgs = {}

    s0 = w.write(40)
    p, imgs["ce", "p1"] = point(d, "ce", "p1", tmp_path)
    assert p["incremental"] is False and p["blocksChanged"] == 40, p

    # A second collection of the same VM (was 409): created late, its first point is full.
    s1 = w.write(20)
    r = d.api("PUT", "/restorePointCollections/cw",
              {"location": "west", "properties": {"source": {"id": "/vms/vm"}}})
    assert r.status == 201, r
    q, imgs["cw", "q1"] = point(d, "cw", "q1", tmp_path)
    assert q["incremental"] is False and q["blocksChanged"] == len(s0 | s1), q

    s2 = w.write(10)
    p, imgs["ce", "p2"] = point(d, "ce", "p2", tmp_path)
    assert p["incremental"] is True, p
    assert p["blocksChanged"] == len(s1 | s2), p  # since ce/p1, not since cw/q1

    # kill -9 between cuts: acknowledged (flushed) writes and both bases survive.
    s3 = w.write(5)
    d.kill9()
    d.start()
    q, imgs["cw", "q2"] = point(d, "cw", "q2", tmp_path)
    # s3's generation was active at the kill: widened to its coarse regions.
    # s2's was frozen (made complete behind the cut, so exact, unless the kill
    # came first: widened too).
    assert q["incremental"] is True, q
    assert len(s2 | widened(s3)) <= q["blocksChanged"] <= len(widened(s2 | s3)), q

    # kill -9 right after a point succeeded.
    d.kill9()
    d.start()
    s4 = w.write(7)
    p, imgs["ce", "p3"] = point(d, "ce", "p3", tmp_path)
    assert p["incremental"] is True and p["blocksChanged"] == len(widened(s3) | s4), p
    check_exact(d, imgs, tmp_path)

    # cw lags behind ce: the tracker keeps what cw has not captured (s4),
    # in a generation file besides the active one.
    assert len(generation_files(d, "a")) >= 2, generation_files(d, "a")
    s5 = w.write(3)
    q, imgs["cw", "q3"] = point(d, "cw", "q3", tmp_path)
    assert q["blocksChanged"] == len(s4 | s5), q

    # Deleting the lagging collection releases what it holds: only the
    # active generation is left, and ce stays incremental and exact.
    s6 = w.write(4)
    p, imgs["ce", "p4"] = point(d, "ce", "p4", tmp_path)
    assert p["blocksChanged"] == len(s5 | s6), p
    assert len(generation_files(d, "a")) >= 2, generation_files(d, "a")
    r = d.api("DELETE", "/restorePointCollections/cw")
    assert r.status in (200, 204), r
    assert len(generation_files(d, "a")) == 1, generation_files(d, "a")
    for k in [k for k in imgs if k[0] == "cw"]:
        del imgs[k]
    s7 = w.write(6)
    p, imgs["ce", "p5"] = point(d, "ce", "p5", tmp_path)
    assert p["incremental"] is True and p["blocksChanged"] == len(s7), p
    check_exact(d, imgs, tmp_path)

    # A collection created after all that starts full, whatever the tracker retired.
    d.create_collection("cw2", "vm", location="west")
    q, imgs["cw2", "r1"] = point(d, "cw2", "r1", tmp_path)
    assert q["incremental"] is False, q
    assert q["blocksChanged"] == len(s0 | s1 | s2 | s3 | s4 | s5 | s6 | s7), q
    check_exact(d, imgs, tmp_path)
    assert d.stop() == 0
