"""Real NBD clients against rpointd's NBD server: nbdinfo, qemu-img, qemu-io, nbdcopy.

Each test creates its disks, drives one client tool the way users do, and checks
what the tool reports or the bytes that come back.
"""
import hashlib
import json
import os
import subprocess

import pytest

from conftest import require
from nbd_targets import libnbd_alive, make_target, tcp_uri

MiB = 1 << 20


@pytest.fixture
def target(tmp_path):
    t = make_target(tmp_path)
    yield t
    t.close()


def run(*cmd, timeout=120, check=True):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_random_image(path, size, holes=()):
    """A raw image of random data with zeroed holes at the given (offset, length)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
        for off, length in holes:
            f.seek(off)
            f.write(b"\0" * length)


def test_nbdinfo_list(target):
    require("nbdinfo")
    target.create("alpha", 16 * MiB)
    target.create("beta", 3 * MiB)
    uri = target.uri("")  # the server, no export: --list enumerates them
    out = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)
    exports = {e["export-name"]: e for e in out["exports"]}
    assert {"alpha", "beta"} <= set(exports)
    a = exports["alpha"]
    assert a["export-size"] == 16 * MiB
    assert exports["beta"]["export-size"] == 3 * MiB
    assert a["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert a[flag] is True, flag
    assert "base:allocation" in a["contexts"]
    assert a["block_size_minimum"] >= 1
    assert a["block_size_preferred"] == 4096
    assert a["block_size_maximum"] >= 32 * MiB


def test_nbdinfo_map_holes_and_data(target):
    require("nbdinfo")
    import nbd

    uri = target.create("mapped", 64 * MiB)
    # Data at [4 MiB, 6 MiB) and at the last 64 KiB; everything else a hole.
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x5a" * (2 * MiB), 4 * MiB)
    h.pwrite(b"\xa5" * 65536, 64 * MiB - 65536)
    h.flush()
    h.shutdown()
    out = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    extents = [(e["offset"], e["length"], e["type"]) for e in out]
    assert sum(length for _, length, _ in extents) == 64 * MiB
    assert extents[0][0] == 0

    def kind_at(off):
        for o, length, t in extents:
            if o <= off < o + length:
                return t
        raise AssertionError(f"offset {off} not covered: {extents}")

    # type 3 = hole|zero, 0 = data.
    assert kind_at(0) == 3
    assert kind_at(4 * MiB) == 0
    assert kind_at(6 * MiB - 1) == 0
    assert kind_at(6 * MiB) == 3
    assert kind_at(32 * MiB) == 3
    assert kind_at(64 * MiB - 1) == 0
    # --totals agrees: about 2 MiB + 64 KiB of data.
    totals = json.loads(run("nbdinfo", "--map", "--totals", "--json", uri).stdout)
    data = sum(t["size"] for t in totals if t["type"] == 0)
    assert data == 2 * MiB + 65536


def test_qemu_img_info(target):
    require("qemu-img")
    uri = target.create("info", 123 * MiB)
    out = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert out["virtual-size"] == 123 * MiB
    assert out["format"] == "raw"


def test_qemu_img_convert_in_out_and_compare(target, tmp_path):
    require("qemu-img")
    size = 48 * MiB
    src = tmp_path / "src.raw"
    write_random_image(src, size, holes=[(0, 4 * MiB), (20 * MiB, 8 * MiB)])
    uri = target.create("conv", size)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back)
    assert sha256(back) == sha256(src)
    # qcow2 out as well: a different write pattern from qemu's block layer.
    q = tmp_path / "back.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, q)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, src)
    # A differing byte is noticed (compare must be able to fail).
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 12345 1", uri)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri, check=False).returncode == 1


def test_qemu_io_patterns(target):
    require("qemu-io")
    size = 32 * MiB
    uri = target.create("pat", size)
    last = size - 512
    cmds = [
        # unaligned offsets and lengths
        "write -P 0x11 1 1", "read -P 0x11 1 1",
        "write -P 0x22 4095 2", "read -P 0x22 4095 2",
        "write -P 0x33 1000001 70001", "read -P 0x33 1000001 70001",
        "read -P 0 0 1", "read -P 0 2 4093",
        # the first and last sectors
        "write -P 0x44 0 512", "read -P 0x44 0 512",
        f"write -P 0x55 {last} 512", f"read -P 0x55 {last} 512",
        f"write -P 0x66 {size - 1} 1", f"read -P 0x66 {size - 1} 1",
        # zeroes, discard, flush; large multi-request I/O
        "write -z 4096 65536", "read -P 0 4096 65536",
        "write -P 0x77 8M 4M", "read -P 0x77 8M 4M",
        "aio_write -P 0x78 16M 1M", "aio_write -P 0x79 17M 1M", "aio_flush",
        "read -P 0x78 16M 1M", "read -P 0x79 17M 1M",
        "discard 8M 1M", "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = run(*args, uri)
    assert "fail" not in r.stdout.lower(), r.stdout
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    # A mismatch is reported (the check above can fail).
    r = run("qemu-io", "-f", "raw", "-c", "read -P 0x12 1 1", uri, check=False)
    assert "Pattern verification failed" in r.stdout + r.stderr
    # And a fresh connection sees the same bytes.
    run("qemu-io", "-f", "raw", "-c", f"read -P 0x55 {last} 511", "-c", "read -P 0x44 0 512", uri)


def test_qemu_io_out_of_range_fails_cleanly(target):
    require("qemu-io")
    uri = target.create("oor", 1 * MiB)
    r = run("qemu-io", "-f", "raw", "-c", "read 1048064 1024", uri, check=False)
    assert r.returncode != 0 or "error" in (r.stdout + r.stderr).lower()
    assert libnbd_alive(uri, 1 * MiB)


def test_nbdcopy_256m_in_and_out(target, tmp_path):
    require("nbdcopy")
    size = 256 * MiB
    src = tmp_path / "random.img"
    write_random_image(src, size, holes=[(64 * MiB, 16 * MiB)])
    uri = target.create("copy", size)
    # nbdcopy uses several connections (multi-conn) and many requests in flight.
    run("nbdcopy", "--flush", src, uri, timeout=300)
    out = tmp_path / "out.img"
    run("nbdcopy", uri, out, timeout=300)
    assert os.path.getsize(out) == size
    assert sha256(out) == sha256(src)
    # One connection, one request at a time: another request mix.
    out2 = tmp_path / "out2.img"
    run("nbdcopy", "--connections=1", "--requests=1", "--request-size=1048576", uri, out2,
        timeout=300)
    assert sha256(out2) == sha256(src)


def test_tcp_listener(tmp_path):
    require("nbdinfo", "qemu-io", "nbdcopy")
    t = make_target(tmp_path, tcp=True)
    try:
        t.create("net", 32 * MiB)
        uri = tcp_uri(t, "net")
        out = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert out["exports"][0]["export-size"] == 32 * MiB
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 1000 300000", "-c",
            "read -P 0x3c 1000 300000", uri)
        src = tmp_path / "src.img"
        write_random_image(src, 32 * MiB)
        run("nbdcopy", src, uri)
        out = tmp_path / "out.img"
        run("nbdcopy", uri, out)
        assert sha256(out) == sha256(src)
        # The same bytes over the Unix socket.
        back = tmp_path / "back.img"
        run("nbdcopy", t.uri("net"), back)
        assert sha256(back) == sha256(src)
    finally:
        t.close()
