"""Buffered writes with many requests in flight, across a cut (engine/blocking_worker.h).

Buffered writes to a regular file leave the reactor for the disk's
BlockingWorker, which takes them in batches and answers each reactor once per
batch. This drives that path hard: two python3-libnbd connections keep 64
writes each in flight (unaligned offsets and lengths, so none goes through
O_DIRECT; some straddle a 64 KiB tracking granule; some FUA, some FLUSHes in
between) while a restore point is cut and copied out. Then, with the load
stopped:

* the disk holds every acknowledged write (a shadow copy of what was written);
* the next (incremental) point equals the disk byte for byte: every write was
  tracked, including those in flight at the cut.
"""
import os
import random
import threading
import time

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

from rpointd_harness import operation_path  # noqa: E402

MiB = 1 << 20
DISK_SIZE = 16 * MiB
SLOT = 16 << 10   # one write in flight per slot, so the shadow copy is exact
QD = 64
CONNS = 2


def read_all(uri, size):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = bytearray()
    for off in range(0, size, MiB):
        data += h.pread(min(MiB, size - off), off)
    h.shutdown()
    return bytes(data)


class Writer:
    def __init__(self, uri, rng, shadow):
        self.rng, self.shadow = rng, shadow
        self.handles = []
        for _ in range(CONNS):
            h = nbd.NBD()
            h.connect_uri(uri)
            self.handles.append(h)
        self.busy = set()  # slots with a write in flight
        self.count = 0
        self.errors = []

    def _done(self, slot, err):
        self.busy.discard(slot)
        if err.value != 0:
            self.errors.append((slot, err.value))
        return 1

    def _issue(self, h):
        while h.aio_in_flight() < QD:
            # Slots start 8 KiB into each 16 KiB: every fourth straddles a 64 KiB granule.
            slot = self.rng.randrange(DISK_SIZE // SLOT - 1)
            if slot in self.busy:
                continue
            off = slot * SLOT + SLOT // 2 + self.rng.randrange(1, 4096)
            length = self.rng.randrange(512, SLOT - 4096)
            data = self.rng.randbytes(length)
            self.shadow[off:off + length] = data
            self.busy.add(slot)
            self.count += 1
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            flags = nbd.CMD_FLAG_FUA if self.count % 97 == 0 else 0
            h.aio_pwrite(buf, off, flags=flags,
                         completion=lambda err, s=slot, keep=buf: self._done(s, err))
            if self.count % 251 == 0:
                h.aio_flush()

    def run(self, stop):
        while not stop():
            for h in self.handles:
                self._issue(h)
                h.poll(0)
            self.handles[0].poll(1)
        for h in self.handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)

    def close(self):
        for h in self.handles:
            h.shutdown()


def test_many_buffered_writes_in_flight_across_a_cut(daemon):
    d = daemon
    rng = random.Random(int(os.environ.get("RPOINTD_TEST_SEED", time.time_ns())))
    d.create_disk("da", DISK_SIZE)
    d.create_vm("vm", ["da"])
    d.create_collection("c", "vm")
    uri = d.nbd_uri("da")
    shadow = bytearray(DISK_SIZE)

    done = threading.Event()
    result = {}

    def cut():
        try:
            time.sleep(0.3)
            r = d.start_restore_point("c", "rp1")
            assert r.status == 201, r
            result["op"] = d.wait_operation(operation_path(r))
            time.sleep(0.2)  # keep writing after the copy-out too
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e
        finally:
            done.set()

    w = Writer(uri, rng, shadow)
    t = threading.Thread(target=cut, daemon=True)
    t.start()
    try:
        w.run(stop=done.is_set)
    finally:
        w.close()
    t.join(60)
    if "error" in result:
        raise result["error"]
    assert result["op"]["status"] == "Succeeded", result["op"]
    assert not w.errors, f"writes failed: {w.errors[:5]}"
    print(f"{w.count} writes, {CONNS} connections x {QD} in flight")
    assert w.count > 2 * CONNS * QD, "the load did not run across the cut"

    disk = read_all(uri, DISK_SIZE)
    assert disk == bytes(shadow), "the disk lost acknowledged writes"
    d.create_restore_point("c", "rp2")
    assert d.disk_restore_point("c", "rp2", "da")["properties"]["incremental"] is True
    point = read_all(d.rp_uri("c", "rp2", "da"), DISK_SIZE)
    bad = [o for o in range(0, DISK_SIZE, 4096) if point[o:o + 4096] != disk[o:o + 4096]]
    assert not bad, f"the incremental point differs from the disk at {len(bad)} blocks: {bad[:8]}"
