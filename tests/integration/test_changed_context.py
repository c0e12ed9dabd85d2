"""The rpoint:changed:{collection}/{point} NBD metadata context on restore point exports.

A disk gets known writes, rp1 is cut, known ranges change (overwrites, a
partial write, a trim, a write-zeroes, new data in a hole, and a rewrite of
identical bytes), rp2 is cut. On the export c/rp2/a the context
rpoint:changed:c/rp1 must mark exactly the changed chunks (bit 0 = dirty),
merged, as nbdinfo --map and python3-libnbd see it, alone and together with
base:allocation, also after a daemon restart; it must match a brute-force
per-chunk byte diff of the two exports. Identical bytes rewritten are
"unchanged" (same chunk digest). Contexts are listed per export; unknown,
self and foreign (another disk's) points are not selected.
"""
import json
import random
import subprocess

import pytest

from conftest import require
from rpointd_harness import nbd_save, nbd_write

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB  # default tracking granularity = store chunk size
DISK_SIZE = 16 * MiB
SLOTS = DISK_SIZE // G
CTX = "rpoint:changed:c/rp1"


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "nbdinfo")


def runs(slots, total=SLOTS):
    """Merged (offset, length, dirty) extents of a set of changed slots."""
    out = []
    for s in range(total):
        bit = 1 if s in slots else 0
        if out and out[-1][2] == bit:
            out[-1][1] += G
        else:
            out.append([s * G, G, bit])
    return [tuple(e) for e in out]


def nbdinfo_map(uri, ctx):
    r = subprocess.run(["nbdinfo", f"--map={ctx}", uri], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        f = line.split()
        out.append((int(f[0]), int(f[1]), int(f[2])))
    return out


def libnbd_map(uri, contexts, flags=0, length=DISK_SIZE, offset=0):
    """{context: [(offset, length, flags)]} from BLOCK_STATUS requests over the range."""
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    got = {c: [] for c in contexts}
    for c in contexts:
        assert h.can_meta_context(c), c
    end = offset + length
    pos = offset
    while pos < end:
        seen = {}

        def cb(ctx, off, entries, err):
            seen[ctx] = list(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(end - pos, pos, cb, flags=flags)
        assert set(seen) == set(contexts), seen
        advance = None
        for c, ents in seen.items():
            p = pos
            for ln, fl in ents:
                got[c].append((p, ln, fl))
                p += ln
            advance = p - pos if advance is None else min(advance, p - pos)
        pos += advance
        # Keep each context's list within what every context covered.
        for c in contexts:
            trimmed = []
            for o, ln, fl in got[c]:
                if o >= pos:
                    continue
                trimmed.append((o, min(ln, pos - o), fl))
            got[c] = trimmed
    h.shutdown()
    return {c: merge(v) for c, v in got.items()}


def merge(ext):
    out = []
    for o, ln, fl in ext:
        if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + ln, fl)
        else:
            out.append((o, ln, fl))
    return out


def dirty_slots(ext):
    s = set()
    for o, ln, fl in ext:
        if fl & 1:
            s.update(range(o // G, (o + ln) // G))
    return s


def byte_diff_slots(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return {s for s in range(SLOTS) if fa.read(G) != fb.read(G)}


def contexts_of(uri):
    r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    return set(j["exports"][0].get("contexts", []))


@pytest.fixture
def points(daemon):
    """c/rp1 and c/rp2 of disk a with known changes; returns (daemon, expected slots)."""
    d = daemon
    d.create_disk("a", DISK_SIZE)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(9)
    uri = d.nbd_uri("a")
    base = {s: rng.randbytes(G) for s in range(0, 40)}
    nbd_write(uri, [(s * G, v) for s, v in base.items()])
    d.create_restore_point("c", "rp1")

    nbd_write(uri, [(s * G, rng.randbytes(G)) for s in (3, 4, 5)]          # overwrites
              + [(10 * G, base[10])]                                      # identical bytes
              + [(30 * G + 8 * KiB, rng.randbytes(4 * KiB))]              # partial chunk
              + [(200 * G, rng.randbytes(2 * G))])                        # new data in a hole
    h = nbd.NBD()
    h.connect_uri(uri)
    h.trim(G, 20 * G)   # discarded: now reads zeroes, stored as a hole
    h.zero(G, 21 * G)   # zeroed data chunk
    h.flush()
    h.shutdown()
    d.create_restore_point("c", "rp2")
    return d, {3, 4, 5, 20, 21, 30, 200, 201}


def test_map_exact_with_nbdinfo_libnbd_and_byte_diff(points, tmp_path):
    d, expected = points
    uri2 = d.rp_uri("c", "rp2", "a")
    want = runs(expected)

    # nbdinfo --map=CONTEXT prints exactly the merged changed extents.
    assert nbdinfo_map(uri2, CTX) == want

    # libnbd: both contexts on one connection, each answered in its own chunk.
    m = libnbd_map(uri2, ["base:allocation", CTX])
    assert m[CTX] == want
    holes = {s for o, ln, fl in m["base:allocation"] if fl & nbd.STATE_HOLE
             for s in range(o // G, (o + ln) // G)}
    assert 20 in holes and 3 not in holes and 200 not in holes

    # Small and unaligned requests, and REQ_ONE, answer the same map.
    m = libnbd_map(uri2, [CTX, "base:allocation"], flags=nbd.CMD_FLAG_REQ_ONE)
    assert m[CTX] == want
    m = libnbd_map(uri2, [CTX], length=5 * G + 4096, offset=G + 512)
    assert dirty_slots([(o, ln, fl) for o, ln, fl in m[CTX]]) == {3, 4, 5}

    # "Differs from" is symmetric: on rp1 against rp2, the same blocks.
    assert nbdinfo_map(d.rp_uri("c", "rp1", "a"), "rpoint:changed:c/rp2") == want

    # The brute-force byte diff of the two exports agrees, chunk by chunk (slot
    # 10, rewritten with identical bytes, is unchanged in both views).
    f1 = nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "rp1.img")
    f2 = nbd_save(uri2, tmp_path / "rp2.img")
    assert byte_diff_slots(f1, f2) == expected
    assert 10 not in expected


def test_contexts_listed_and_unknown_ones_omitted(points):
    d, expected = points
    # Another VM's disk with its own point: a foreign point for disk a.
    d.create_disk("b", DISK_SIZE)
    d.create_vm("vm2", ["b"])
    d.create_collection("c2", "vm2")
    d.create_restore_point("c2", "rpb")

    uri2 = d.rp_uri("c", "rp2", "a")
    assert contexts_of(uri2) == {"base:allocation", CTX}
    assert contexts_of(d.rp_uri("c", "rp1", "a")) == {"base:allocation", "rpoint:changed:c/rp2"}
    assert contexts_of(d.rp_uri("c2", "rpb", "b")) == {"base:allocation"}

    # LIST with namespace and leaf-prefix queries, through libnbd's opt mode.
    for query in ("rpoint:", "rpoint:changed:", CTX):
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.add_meta_context(query)
        h.connect_uri(uri2)
        names = []
        h.opt_list_meta_context(lambda name: names.append(name) or 0)
        h.opt_abort()
        assert names == [CTX], (query, names)

    # SET omits what the export does not offer; the rest still works.
    bad = ["rpoint:changed:c/nope", "rpoint:changed:c/rp2", "rpoint:changed:c2/rpb",
           "rpoint:changed:c", "rpoint:changed:", "rpoint:other"]
    h = nbd.NBD()
    for c in bad + [CTX]:
        h.add_meta_context(c)
    h.connect_uri(uri2)
    for c in bad:
        assert not h.can_meta_context(c), c
    assert h.can_meta_context(CTX)
    h.shutdown()

    # A live disk offers the context of its collections' latest points only
    # (test_live_changed_context.py): c/rp2, not c/rp1.
    live = contexts_of(d.nbd_uri("a"))
    assert "rpoint:changed:c/rp2" in live and "rpoint:changed:c/rp1" not in live, live


def test_map_exact_after_restart(points):
    d, expected = points
    d.restart()
    assert nbdinfo_map(d.rp_uri("c", "rp2", "a"), CTX) == runs(expected)
