"""Copy-before-write keeps a point byte for byte what the disk held at its cut,
whatever the guest does during the copy-out.

Copy-before-write preserves only the 4 KiB sub-blocks a write touches, and the
copier assembles each 64 KiB block from the preserved sub-blocks (in memory or
in the staging file) and the disk. Guests hammer a disk of random data with
holes, from several connections, while a full and then an incremental point
are copied out:

* unaligned writes of 1 byte to 200 KiB, straddling sub-blocks and blocks;
* small writes right across a sub-block boundary and a block boundary, and
  aligned 4 KiB writes, many to the same blocks again and again;
* trims and write-zeroes (punching and not), aligned and not;

first with the copier held at its first pack write (so the writes find blocks
not copied yet), then with it running, so writes race its reads of the same
blocks. Every point must equal the disk as saved just before its cut (no write
is in flight across it), and verify. A staging failure (ENOSPC) failing the
point and never the guest is test_restore_point_staging.py's job.
"""
import os
import random
import threading
import time

import pytest

from conftest import require
from rpointd_harness import Daemon, images_equal, nbd_save, operation_path

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB
SUB = 4 * KiB
SIZE = 48 * MiB
# The first pack write waits; the copier goes on until every pack buffer waits
# behind it (16 MiB of the 48), then stops too.
HOLD = "pack.write=delay60000*1"


class Rig:
    def __init__(self, tmp_path):
        state = tmp_path / "state"
        os.makedirs(state)
        self.rules = str(state / "faults")
        self.d = Daemon(state, env={"RPOINTD_FAULTS_FILE": self.rules}).start()

    def arm(self, rules):
        self.d.arm_faults(rules)

    def log(self):
        return self.d.log_all()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    d = r.d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0, "rpointd did not exit 0 on SIGTERM:\n" + d.log()
    elif d.proc is not None:
        pytest.fail(f"rpointd died (rc={d.proc.returncode}):\n{d.log()}")


class Hammer:
    """Guest threads, one NBD connection each, mutating the disk until stopped."""

    def __init__(self, uri, seed):
        self.uri = uri
        self.seed = seed
        self.stop = threading.Event()
        self.errors = []
        self.ops = 0
        self.threads = [threading.Thread(target=self._run, args=(k, f), daemon=True)
                        for k, f in enumerate([self._unaligned, self._boundaries,
                                               self._boundaries, self._trim_zero])]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a guest thread hangs"
        assert not self.errors, f"guest I/O failed: {self.errors}"

    def _run(self, k, body):
        rng = random.Random(self.seed * 10 + k)
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                body(h, rng)
                self.ops += 1
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported by __exit__
            self.errors.append(repr(e))

    @staticmethod
    def _unaligned(h, rng):
        n = rng.choice([1, 100, 4095, 4097, 9000, 65535, 65537, 200 * KiB])
        off = rng.randrange(SIZE - n)
        h.pwrite(rng.randbytes(n), off)

    @staticmethod
    def _boundaries(h, rng):
        # Blocks the hammer keeps coming back to: the first quarter of the disk.
        b = rng.randrange(SIZE // G // 4) if rng.random() < 0.5 else rng.randrange(SIZE // G)
        s = rng.randrange(1, G // SUB)
        pick = rng.random()
        if pick < 0.3:    # across a sub-block boundary inside the block
            off, n = b * G + s * SUB - 256, 512
        elif pick < 0.5 and b > 0:  # across the boundary of two blocks
            off, n = b * G - 100, 300
        else:             # one aligned sub-block
            off, n = b * G + s * SUB, SUB
        h.pwrite(rng.randbytes(n), off)

    @staticmethod
    def _trim_zero(h, rng):
        n = rng.choice([SUB, 3 * SUB, G, 2 * G + 5 * SUB, 1000, 70000])
        off = rng.randrange(SIZE - n)
        if rng.random() < 0.5:
            off -= off % SUB
        pick = rng.random()
        if pick < 0.4:
            h.trim(n, off)
        elif pick < 0.7:
            h.zero(n, off)
        else:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)


def wait_cut(d, rp, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = d.get_restore_point("c", rp, expand="instanceView")["properties"]
        if p["provisioningState"] != "Creating":
            return
        views = p.get("instanceView", {}).get("diskRestorePoints", [])
        if any(v["replicationStatus"]["status"] != "Pending" for v in views):
            return
        time.sleep(0.01)
    raise AssertionError(f"{rp} not cut after {timeout} s")


def point_under_hammer(rig, tmp_path, rp, seed):
    """Saves the disk, cuts rp, hammers the disk until rp's copy-out ends;
    returns (image at the cut, guest operations done meanwhile)."""
    d = rig.d
    uri = d.nbd_uri("a")
    img = nbd_save(uri, tmp_path / f"{rp}.cut.img")
    rig.arm(HOLD)
    r = d.start_restore_point("c", rp)
    assert r.status == 201, r
    op_path = operation_path(r)
    wait_cut(d, rp)
    with Hammer(uri, seed) as hm:
        time.sleep(1.0)  # writes to blocks the held copier has not reached
        held = hm.ops
        rig.arm("")      # the copier goes on, racing the writes
        op = d.wait_operation(op_path, timeout=300)
        time.sleep(0.2)
    assert op["status"] == "Succeeded", (op, d.log()[-3000:])
    assert held > 50, f"only {held} guest operations while the copier was held"
    return img, hm.ops


def test_point_is_the_disk_at_its_cut_under_every_kind_of_write(rig, tmp_path):
    require("nbdcopy", "qemu-img")
    d = rig.d
    d.create_disk("a", SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(5)
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("a"))
    for off in range(0, SIZE, 4 * MiB):
        h.pwrite(rng.randbytes(4 * MiB), off)
    # Holes and zeroes at the cut: whole blocks, sub-blocks, unaligned pieces.
    for _ in range(40):
        n = rng.choice([G, 4 * G, SUB, 3 * SUB, 777])
        off = rng.randrange(SIZE - n)
        (h.trim if rng.random() < 0.5 else h.zero)(n, off)
    h.flush()
    h.shutdown()

    for i, rp in enumerate(["full", "inc1", "inc2"]):
        img, ops = point_under_hammer(rig, tmp_path, rp, seed=i)
        print(f"{rp}: {ops} guest operations during the copy-out")
        got = nbd_save(d.rp_uri("c", rp, "a"), tmp_path / f"{rp}.export")
        same, msg = images_equal(img, got)
        assert same, f"{rp} differs from the disk at its cut: {msg}"
        out = d.verify_restore_point("c", rp)["properties"]["output"]
        assert out["ok"] is True and out["damage"] == [], (rp, out)
        for f in (img, got):
            os.unlink(f)
