"""A restore point is a crash-consistent cut across every disk of the VM.

A writer stamps 4 KiB blocks with sequence numbers on two disks of one VM
(python3-libnbd, two connections per disk, many writes in flight) and keeps
writing while the point is cut and copied out (so copy-before-write has to
keep the point exact). From the submit and ack times it records, read back
from the points' NBD exports:

* every block holds an intact stamp of a write issued to it (or zeroes if it
  was never written), and the cold data outside the hot area is unchanged;
* every write acknowledged before the PUT was sent is in the point;
* no write submitted after the cut was observed done is in the point;
* the set of writes in the point is a consistent cut of real time, on both
  disks alike: if write X is not in the point, no write submitted after X's
  acknowledgement (on either disk) may be in it.

Two cuts run under load: the first (full) point and an incremental one.
"""
import hashlib
import os
import random
import threading
import time

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rp_load import BLOCK, StampWriter, parse, read_blocks, stamp  # noqa: E402
from rpointd_harness import nbd_write, operation_path  # noqa: E402

MiB = 1 << 20
DISK_SIZE = 64 * MiB
HOT_BLOCKS = 2048                      # writes go to the first 8 MiB
COLD_OFF, COLD_LEN = 16 * MiB, 40 * MiB  # data the copy-out has to read too
DISKS = ["da", "db"]


class CutWatcher(threading.Thread):
    """Creates the point while the writer runs and records when: PUT sent,
    answered, cut observed (cutPauseMicroseconds shown), operation done."""

    def __init__(self, daemon, collection, name, settle=0.3, after=0.3):
        super().__init__(daemon=True)
        self.d, self.c, self.name = daemon, collection, name
        self.settle, self.after = settle, after
        self.t = {}
        self.op = None
        self.error = None
        self.finished = threading.Event()

    def run(self):
        try:
            time.sleep(self.settle)
            self.t["put"] = time.monotonic()
            r = self.d.start_restore_point(self.c, self.name)
            self.t["answer"] = time.monotonic()
            assert r.status == 201, r
            op = operation_path(r)
            path = (f"/restorePointCollections/{self.c}/restorePoints/{self.name}"
                    "?$expand=instanceView")
            while True:
                p = self.d.api("GET", path).json["properties"]
                # Read the clock after the answer: the cut happened at or before it
                # arrived. The time before the GET is no bound (the cut may happen
                # while the GET is in flight; that raced under load 21).
                now = time.monotonic()
                iv = p.get("instanceView") or {}
                pause = iv.get("cutPauseMicroseconds")
                if "cut" not in self.t and pause is not None and pause >= 0:
                    self.t["cut"] = now
                if p["provisioningState"] != "Creating":
                    self.t.setdefault("cut", now)
                    self.t["done"] = now
                    break
                time.sleep(0.005)
            self.op = self.d.wait_operation(op)
            time.sleep(self.after)  # keep writing after the copy-out, too
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
        finally:
            self.finished.set()


def check_point(d, writer, rp, t, prefill_seq):
    """Reads the point's hot blocks on every disk; returns problems (strings)."""
    problems = []
    content = {}
    for di, disk in enumerate(DISKS):
        data = read_blocks(d.rp_uri("c", rp, disk), HOT_BLOCKS)
        for b in range(HOT_BLOCKS):
            try:
                content[(di, b)] = parse(di, b, data[b * BLOCK:(b + 1) * BLOCK])
            except ValueError as e:
                problems.append(f"{disk} block {b}: {e}")
        cold = read_blocks(d.rp_uri("c", rp, disk), COLD_LEN // BLOCK, COLD_OFF)
        if hashlib.sha256(cold).hexdigest() != writer.cold_sums[di]:
            problems.append(f"{disk}: cold data outside the hot area differs")
    if problems:
        return problems

    included = []
    excluded = []
    for w in writer.writes:
        if w.err is not None:
            continue
        got = content[(w.disk, w.block)]
        if got < prefill_seq.get((w.disk, w.block), 0):
            problems.append(f"{DISKS[w.disk]} block {w.block}: seq {got} is older than the "
                            f"state before this round")
        (included if w.seq <= got else excluded).append(w)
    # What a block shows must be a write issued to it (or its state before).
    issued = {(w.disk, w.block, w.seq) for w in writer.writes}
    for (di, b), seq in content.items():
        if seq and seq != prefill_seq.get((di, b)) and (di, b, seq) not in issued:
            problems.append(f"{DISKS[di]} block {b}: seq {seq} was never written there")

    for w in excluded:
        if w.ack is not None and w.ack < t["put"]:
            problems.append(f"{DISKS[w.disk]} block {w.block}: seq {w.seq} acked "
                            f"{t['put'] - w.ack:.4f} s before the PUT, missing from the point")
    for w in included:
        if w.submit > t["cut"]:
            problems.append(f"{DISKS[w.disk]} block {w.block}: seq {w.seq} submitted "
                            f"{w.submit - t['cut']:.4f} s after the cut was done, in the point")
    # Consistent cut: no included write was submitted after an excluded one was acked.
    acked_out = [w for w in excluded if w.ack is not None]
    if acked_out:
        first = min(acked_out, key=lambda w: w.ack)
        late = [w for w in included if w.submit > first.ack]
        for w in late[:10]:
            problems.append(
                f"inconsistent cut: {DISKS[w.disk]} block {w.block} seq {w.seq} (submitted "
                f"{w.submit - first.ack:.6f} s after the ack of {DISKS[first.disk]} block "
                f"{first.block} seq {first.seq}) is in the point, that earlier write is not")
    inc_disks = {w.disk for w in included if w.seq not in writer.prefill}
    exc_disks = {w.disk for w in excluded}
    print(f"{rp}: {len(included)} writes in, {len(excluded)} out, disks in {inc_disks} "
          f"out {exc_disks}, times {({k: round(v - t['put'], 4) for k, v in t.items()})}")
    # The test has to have cut through the load on both disks.
    if exc_disks != {0, 1}:
        problems.append(f"no write left out of the point on some disk ({exc_disks}): the load "
                        "did not run across the cut")
    return problems


def test_cut_is_consistent_across_disks_under_load(daemon):
    d = daemon
    rng = random.Random(int(os.environ.get("RPOINTD_CUT_SEED", time.time_ns())))
    seed_note = f"(first random {rng.random():.6f})"
    for disk in DISKS:
        d.create_disk(disk, DISK_SIZE)
    d.create_vm("vm", DISKS)
    d.create_collection("c", "vm")

    # Prefill: a stamp in every hot block, random cold data.
    seq = 1
    prefill_seq = {}
    cold_sums = []
    for di, disk in enumerate(DISKS):
        chunks = []
        for b in range(HOT_BLOCKS):
            chunks.append((b * BLOCK, stamp(di, b, seq)))
            prefill_seq[(di, b)] = seq
            seq += 1
        cold = rng.randbytes(COLD_LEN)
        cold_sums.append(hashlib.sha256(cold).hexdigest())
        chunks += [(COLD_OFF + o, cold[o:o + 4 * MiB]) for o in range(0, COLD_LEN, 4 * MiB)]
        nbd_write(d.nbd_uri(disk), chunks)

    for rp in ("rp1", "rp2"):
        w = StampWriter([d.nbd_uri(x) for x in DISKS], HOT_BLOCKS, rng, connections=2,
                        queue_depth=8, first_seq=seq)
        w.prefill = set(prefill_seq.values())
        w.cold_sums = cold_sums
        cut = CutWatcher(d, "c", rp)
        cut.start()
        try:
            w.run(stop=cut.finished.is_set)
        finally:
            w.close()
        cut.join(60)
        if cut.error:
            raise cut.error
        assert cut.op["status"] == "Succeeded", cut.op
        assert not w.errors, f"writes failed during the cut: {[(x.disk, x.block) for x in w.errors[:5]]}"
        during_copy = [x for x in w.writes if cut.t["cut"] < x.submit < cut.t["done"]]
        print(f"{rp}: {len(w.writes)} writes, {len(during_copy)} submitted during the copy-out")

        problems = check_point(d, w, rp, cut.t, prefill_seq)
        assert not problems, (f"{rp}: {len(problems)} problems {seed_note}:\n"
                              + "\n".join(problems[:30]))
        drp = d.disk_restore_point("c", rp, "da")["properties"]
        assert drp["incremental"] is (rp == "rp2"), drp

        # The next round starts from what the disks hold now.
        seq = w.next_seq
        for di, disk in enumerate(DISKS):
            data = read_blocks(d.nbd_uri(disk), HOT_BLOCKS)
            for b in range(HOT_BLOCKS):
                prefill_seq[(di, b)] = parse(di, b, data[b * BLOCK:(b + 1) * BLOCK])
        # Every acked write is on the live disk: the latest per block.
        last = {}
        for x in w.writes:
            last[(x.disk, x.block)] = x.seq
        wrong = [k for k, s in last.items() if prefill_seq[k] != s]
        assert not wrong, f"live disk lost acked writes: {wrong[:5]}"
