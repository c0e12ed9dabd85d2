"""rpoint:changed:{collection}/{point} on a LIVE disk export (docs/api.md).

On the disk's own export the context marks the blocks written since that
point, from the change tracker (crash-safe: the marks are durable before the
writes). Known writes after rp1, then `nbdinfo --map=rpoint:changed:c/rp1`:
every written block is marked (over-report would be allowed by the block
granularity; here the map is exact). After kill -9 and a restart, the map
still has them, plus what is written afterwards. Only the collection's latest
point is offered: once rp2 is cut, c/rp1 is not (its history is retired) and
c/rp2 marks nothing until the next write.
"""
import json
import os
import random
import subprocess

import pytest

from conftest import require
from rpointd_harness import nbd_write
from test_changed_context import G, nbdinfo_map, runs

MiB = 1 << 20
DISK_SIZE = 16 * MiB
SLOTS = DISK_SIZE // G


@pytest.fixture(autouse=True)
def _tools():
    require("nbdinfo")


def contexts_of(uri):
    r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["exports"][0].get("contexts", [])


def test_live_disk_changed_context_survives_kill9(daemon, tmp_path):
    d = daemon
    rng = random.Random(11)
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    nbd_write(d.nbd_uri("a"), [(s * G, rng.randbytes(G)) for s in range(0, SLOTS, 3)])
    d.create_restore_point("c", "rp1")
    uri = d.nbd_uri("a")
    assert "rpoint:changed:c/rp1" in contexts_of(uri)
    # Nothing written since rp1 yet.
    assert nbdinfo_map(uri, "rpoint:changed:c/rp1") == [(0, DISK_SIZE, 0)]

    # Whole blocks, a 4 KiB write inside a block, a write across two blocks.
    nbd_write(uri, [(3 * G, rng.randbytes(G)), (10 * G, rng.randbytes(2 * G)),
                    (100 * G + 8192, rng.randbytes(4096)), (200 * G - 512, rng.randbytes(1024))])
    want = {3, 10, 11, 100, 199, 200}
    assert nbdinfo_map(uri, "rpoint:changed:c/rp1") == runs(want, SLOTS)

    d.kill9()
    d.start()
    assert "rpoint:changed:c/rp1" in contexts_of(uri)
    # The generation active at the kill is widened: every block of each coarse
    # tracking region written (1/256 of the disk, at least 1 MiB: 16 blocks
    # here), never fewer than were written (engine/change_tracker.h).
    want = {b for x in want for b in range(x // 16 * 16, x // 16 * 16 + 16)}
    assert nbdinfo_map(uri, "rpoint:changed:c/rp1") == runs(want, SLOTS)
    nbd_write(uri, [(250 * G + 1, b"z")])
    want.add(250)
    assert nbdinfo_map(uri, "rpoint:changed:c/rp1") == runs(want, SLOTS)

    # rp2 retires rp1's history: c/rp1 is no longer offered, c/rp2 is.
    d.create_restore_point("c", "rp2")
    ctxs = contexts_of(uri)
    assert "rpoint:changed:c/rp1" not in ctxs and "rpoint:changed:c/rp2" in ctxs, ctxs
    r = subprocess.run(["nbdinfo", "--map=rpoint:changed:c/rp1", uri], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0, r.stdout
    assert nbdinfo_map(uri, "rpoint:changed:c/rp2") == [(0, DISK_SIZE, 0)]
    nbd_write(uri, [(5 * G, rng.randbytes(G))])
    assert nbdinfo_map(uri, "rpoint:changed:c/rp2") == runs({5}, SLOTS)
    # Unknown names are not offered either.
    for bad in ("rpoint:changed:c/nope", "rpoint:changed:other/rp2", "rpoint:changed:c"):
        r = subprocess.run(["nbdinfo", f"--map={bad}", uri], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0, (bad, r.stdout)
