"""Change tracking and restore point creation survive kill -9 of the daemon.

1. Rounds of random kill -9 under a stamped write load (several connections,
   many writes in flight; every other round a point is started just before
   the kill): after each restart an incremental point is cut and must equal
   the disk byte for byte, and verify. A tracker that lost a dirty bit for a
   block whose data reached the file would leave the parent's old block in the
   point. The point must also stay incremental (no full re-copy of the cold
   data after a crash).
2. kill -9 while a point is being copied out: after the restart the earlier
   point is intact (exact, verify ok), the interrupted one is Failed (and can be
   deleted), and the next point is exact and still incremental.
3. A power cut's share of it: the tracker's fine dirty bits are written behind
   (only the coarse intent map is durable before a write), so a power cut may
   lose every fine bitmap page of the generation taking marks. After kill -9
   those pages are zeroed (the page cache a power cut would have lost), and
   the next incremental point must still equal the disk byte for byte.
"""
import os
import random
import signal
import threading
import time

import pytest

from conftest import require

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rp_load import StampWriter  # noqa: E402
from rpointd_harness import images_equal, nbd_save, nbd_write  # noqa: E402

MiB = 1 << 20
G = 64 << 10
QUICK = os.environ.get("RPOINTD_QUICK") == "1"


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img")


def lose_unsynced_tracking_pages(d, disk, active_too=False):
    """What a power cut takes from the disk's change-tracking files: the fine
    bitmap pages (everything after the 4 KiB header) of each generation whose
    header says its fine bits may lag the coarse map (flag bit 0 at offset 12);
    active_too: also those of the newest generation file whatever its header
    says (the one taking marks at the crash). Returns the files zeroed."""
    t = os.path.join(d.state_dir, "tracking", disk)
    files = sorted(f for f in os.listdir(t) if f.endswith(".ctbm"))
    hit = []
    for i, name in enumerate(files):
        path = os.path.join(t, name)
        with open(path, "r+b") as f:
            header = f.read(4096)
            incomplete = int.from_bytes(header[12:16], "little") & 1
            if not incomplete and not (active_too and i == len(files) - 1):
                continue
            size = os.fstat(f.fileno()).st_size
            f.seek(4096)
            f.write(bytes(size - 4096))
        hit.append(name)
    return hit


def assert_point_equals_disk(d, rp, disk, tmp_path, note=""):
    a = nbd_save(d.nbd_uri(disk), tmp_path / f"{rp}-{disk}.disk")
    b = nbd_save(d.rp_uri("c", rp, disk), tmp_path / f"{rp}-{disk}.point")
    same, msg = images_equal(a, b)
    assert same, f"point {rp} differs from disk {disk} {note}: {msg}\n{d.log()[-3000:]}"
    os.unlink(a)
    os.unlink(b)


def test_incremental_point_equals_disk_after_kill9_under_load(make_daemon, tmp_path):
    disk_size, hot_blocks, cold = 48 * MiB, 4096, 24 * MiB  # hot: first 16 MiB
    rounds = 3 if QUICK else 5
    d = make_daemon().start()
    d.create_disk("a", disk_size)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(int(os.environ.get("RPOINTD_CRASH_SEED", time.time_ns())))
    seed_note = f"(first random {rng.random():.6f})"
    nbd_write(d.nbd_uri("a"), [(disk_size - cold + o, rng.randbytes(4 * MiB))
                               for o in range(0, cold, 4 * MiB)])
    d.create_restore_point("c", "rp0")
    seq = 1
    for rnd in range(1, rounds + 1):
        w = StampWriter([d.nbd_uri("a")], hot_blocks, rng, connections=3, queue_depth=16,
                        first_seq=seq)
        pid = d.proc.pid
        kill_at = time.monotonic() + rng.uniform(0.3, 1.2)
        # Every other round a point is started just before the kill, so the kill
        # lands in its cut, its copy-out or just after it.
        inflight = None
        if rnd % 2 == 0:
            inflight = threading.Timer(max(0.0, kill_at - time.monotonic() - rng.uniform(0, 0.3)),
                                       _start_point_quietly, (d, f"x{rnd}"))
            inflight.start()
        w.run_until_dead(kill_at, lambda: os.kill(pid, signal.SIGKILL))
        w.close()
        if inflight:
            inflight.join()
        seq = w.next_seq
        d.kill9()
        # Every other round also a power cut's loss of the unsynced fine bits.
        if rnd % 2 == 1:
            print(f"round {rnd}: lost the fine bits of {lose_unsynced_tracking_pages(d, 'a')}")
        acked = sum(1 for x in w.writes if x.ack is not None and x.err is None)
        assert acked > 100, f"round {rnd}: only {acked} writes acked before the kill"
        d.start()
        if inflight:
            r = d.api("GET", f"/restorePointCollections/c/restorePoints/x{rnd}")
            if r.status == 200:
                state = r.json["properties"]["provisioningState"]
                assert state in ("Failed", "Succeeded"), r
                if state == "Succeeded":
                    assert d.verify_restore_point("c", f"x{rnd}")["properties"]["output"]["ok"]
                print(f"round {rnd}: the point started before the kill is {state}")
        rp = f"rp{rnd}"
        d.create_restore_point("c", rp)
        assert_point_equals_disk(d, rp, "a", tmp_path, f"after kill -9 round {rnd} {seed_note}")
        drp = d.disk_restore_point("c", rp, "a")["properties"]
        assert drp["incremental"] is True, drp
        # Only the hot area can have changed: no full re-copy after a crash.
        assert drp["blocksChanged"] <= hot_blocks * 4096 // G, drp
        out = d.verify_restore_point("c", rp)["properties"]["output"]
        assert out["ok"] is True, out
        print(f"round {rnd}: {acked} writes acked, point stored {drp['bytesStored']} bytes, "
              f"{drp['blocksChanged']} blocks")
    assert d.stop() == 0, d.log()


def _start_point_quietly(d, name):
    """PUT of a point from a timer thread; the daemon may be dying meanwhile."""
    try:
        d.start_restore_point("c", name)
    except OSError:
        pass


def test_kill9_during_creation(make_daemon, tmp_path):
    d = make_daemon().start()
    size = 320 * MiB
    d.create_disk("a", size)
    d.create_disk("b", 32 * MiB)
    d.create_vm("vm", ["a", "b"])
    d.create_collection("c", "vm")
    rng = random.Random(5)
    nbd_write(d.nbd_uri("a"), [(0, rng.randbytes(4 * MiB))])
    nbd_write(d.nbd_uri("b"), [(MiB, rng.randbytes(MiB))])
    d.create_restore_point("c", "rp1")
    img1 = nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "rp1.img")

    # Lots of changed data so the copy-out takes a while.
    src = tmp_path / "fill"
    with open(src, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    assert os.system(f"nbdcopy '{src}' '{d.nbd_uri('a')}'") == 0
    os.unlink(src)

    r = d.start_restore_point("c", "rp2")
    assert r.status == 201, r
    op = r.headers.get("Azure-AsyncOperation") or r.headers.get("azure-asyncoperation")
    # Kill once the copy-out is under way (or after 0.3 s at the latest).
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        iv = d.get_restore_point("c", "rp2", expand="instanceView")["properties"]
        pct = [x["replicationStatus"]["completionPercent"]
               for x in (iv.get("instanceView") or {}).get("diskRestorePoints", [])]
        if iv["provisioningState"] != "Creating":
            break
        if pct and max(pct) > 0:
            break
        time.sleep(0.01)
    state_before_kill = d.get_restore_point("c", "rp2")["properties"]["provisioningState"]
    d.kill9()
    assert state_before_kill == "Creating", \
        "the copy-out finished before the kill; make the disk bigger"
    d.start()

    rp2 = d.get_restore_point("c", "rp2", expand="instanceView")["properties"]
    assert rp2["provisioningState"] == "Failed", rp2
    assert rp2.get("error", {}).get("code"), rp2
    o = d.api("GET", op)
    assert o.status == 200 and o.json["status"] == "Failed", o
    # Its disk restore points are not exported.
    assert os.system(f"nbdinfo --can connect '{d.rp_uri('c', 'rp2', 'a')}' 2>/dev/null") != 0

    rp1 = d.get_restore_point("c", "rp1")["properties"]
    assert rp1["provisioningState"] == "Succeeded", rp1
    same, msg = images_equal(img1, nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "rp1.after"))
    assert same, f"rp1 changed by the crash: {msg}"
    out = d.verify_restore_point("c", "rp1")["properties"]["output"]
    assert out["ok"] is True, out

    # The failed point can go; the next one sees every change since rp1.
    d.delete_restore_point("c", "rp2")
    d.create_restore_point("c", "rp3")
    for disk in ("a", "b"):
        assert_point_equals_disk(d, "rp3", disk, tmp_path, "(first point after the crash)")
    drp = d.disk_restore_point("c", "rp3", "a")["properties"]
    assert drp["incremental"] is True, drp
    assert drp["blocksChanged"] >= (size - 4 * MiB) // G, drp
    out = d.verify_restore_point("c", "rp3")["properties"]["output"]
    assert out["ok"] is True, out
    assert d.stop() == 0, d.log()


def test_incremental_point_equals_disk_after_kill9_and_lost_page_cache(make_daemon, tmp_path):
    """Writes after a point, kill -9, then the fine bitmap pages of the active
    generation zeroed (a power cut loses exactly the pages never fdatasynced:
    the tracker writes those behind and makes only its coarse map durable
    before a write). The next point must still be exact and incremental."""
    disk_size = 64 * MiB
    d = make_daemon().start()
    d.create_disk("a", disk_size)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(5)
    nbd_write(d.nbd_uri("a"), [(o, rng.randbytes(4 * MiB)) for o in range(0, disk_size, 4 * MiB)])
    d.create_restore_point("c", "rp0")
    # Scattered 4 KiB writes after the point (three 1 MiB regions of 64, and
    # many blocks in each), acknowledged, then the crash.
    writes = []
    for region in (3, 17, 40):
        for _ in range(20):
            writes.append((region * MiB + rng.randrange(0, MiB - 4096) // 4096 * 4096,
                           rng.randbytes(4096)))
    nbd_write(d.nbd_uri("a"), writes)
    d.kill9()
    hit = lose_unsynced_tracking_pages(d, "a", active_too=True)
    assert hit, "no tracking file to lose pages of"
    d.start()
    d.create_restore_point("c", "rp1")
    assert_point_equals_disk(d, "rp1", "a", tmp_path, "after kill -9 and a lost page cache")
    drp = d.disk_restore_point("c", "rp1", "a")["properties"]
    assert drp["incremental"] is True, drp
    # Widened to the three written regions (16 blocks each), not the disk.
    assert drp["blocksChanged"] <= 3 * MiB // G, drp
    assert d.verify_restore_point("c", "rp1")["properties"]["output"]["ok"] is True
    # A clean stop leaves every generation complete: nothing left to lose.
    assert d.stop() == 0, d.log()
    assert lose_unsynced_tracking_pages(d, "a") == []
