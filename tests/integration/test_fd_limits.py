"""Descriptors: point exports and verifies give back what they open, and no
listener stops accepting for good when the daemon runs out of descriptors
(issue #8, defect 5).

Pack files are opened through one bounded LRU (store.open_packs): a daemon
that served many point exports holds at most that many pack files once the
clients are gone, and while they read, only the packs in use beyond it. Under
a low RLIMIT_NOFILE, clients that exhaust the daemon's descriptors are
refused (or wait), and once they leave the control API and NBD answer again.
"""
import os
import resource
import socket
import threading
import time

import pytest

from rpointd_harness import Daemon, nbd_write

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
POINTS = 40
OPEN_PACKS = 8
SLACK = 12  # sqlite, log, eventfds that come and go: far below POINTS


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def pack_fds(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").split(" ")[0].endswith(".pack"):
                n += 1
        except OSError:
            pass
    return n


def settle(pid, want_at_most, timeout=10):
    """Pack fds of the daemon, once at most `want_at_most` or after timeout
    (connections close asynchronously after the client hangs up)."""
    deadline = time.monotonic() + timeout
    while True:
        n = pack_fds(pid)
        if n <= want_at_most or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def make_points(d, n):
    """A 1 MiB disk and n points, each after a write of its own block, so each
    point has packs of its own and reading point k touches the packs of 1..k."""
    d.create_disk("d", 1 * MiB)
    d.create_vm("vm", ["d"])
    d.create_collection("c", "vm")
    for i in range(n):
        nbd_write(d.nbd_uri("d"), [((i % 16) * G, bytes([i + 1]) * G)])
        d.create_restore_point("c", f"rp{i}")


def test_point_exports_and_verifies_release_pack_files(tmp_path):
    d = Daemon(tmp_path / "state", config_text=f"store:\n  open_packs: {OPEN_PACKS}\n").start()
    try:
        make_points(d, POINTS)
        pid = d.proc.pid
        # Let start-up and the last point's work settle.
        settle(pid, OPEN_PACKS)
        base = fd_count(pid)
        handles = []
        for i in range(POINTS):
            h = nbd.NBD()
            h.connect_uri(d.rp_uri("c", f"rp{i}", "d"))
            got = h.pread(1 * MiB, 0)
            assert got[(i % 16) * G] == i + 1
            handles.append(h)
        # All open and idle: no export holds a pack between reads.
        open_packs = settle(pid, OPEN_PACKS)
        assert open_packs <= OPEN_PACKS, f"{open_packs} pack fds with {POINTS} exports open"
        for h in handles:
            h.shutdown()
        handles.clear()
        assert settle(pid, OPEN_PACKS) <= OPEN_PACKS
        deadline = time.monotonic() + 10
        while fd_count(pid) > base + SLACK and time.monotonic() < deadline:
            time.sleep(0.05)
        after_exports = fd_count(pid)
        assert after_exports <= base + SLACK, (base, after_exports)

        for i in range(POINTS):
            op = d.verify_restore_point("c", f"rp{i}")
            assert op["properties"]["output"]["ok"] is True, op
        assert settle(pid, OPEN_PACKS) <= OPEN_PACKS
        after_verifies = fd_count(pid)
        assert after_verifies <= base + SLACK, (base, after_exports, after_verifies)
        # Still readable after all that eviction.
        h = nbd.NBD()
        h.connect_uri(d.rp_uri("c", "rp0", "d"))
        assert h.pread(G, 0) == bytes([1]) * G
        h.shutdown()
    finally:
        assert d.stop() == 0, d.log()


NOFILE = 200
MANY_POINTS = 170  # more packs than the daemon has descriptors left over


def _low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


class LowFdDaemon(Daemon):
    """A daemon started with RLIMIT_NOFILE = NOFILE."""

    def start(self, timeout=20):
        import subprocess
        real = subprocess.Popen

        def popen(*a, **kw):
            kw["preexec_fn"] = _low_nofile
            return real(*a, **kw)

        subprocess.Popen = popen
        try:
            return super().start(timeout)
        finally:
            subprocess.Popen = real


def api_answers(d, timeout=2):
    try:
        return d.api("GET", "/health", timeout=timeout).status == 200
    except OSError:
        return False


def _try_connect(h, uri):
    try:
        h.connect_uri(uri)
        h.ok = True
    except nbd.Error:
        h.ok = False


def connect(uri, timeout=3):
    """A connected handle, or None when the daemon refused or did not answer."""
    h = nbd.NBD()
    h.ok = False
    t = threading.Thread(target=_try_connect, args=(h, uri), daemon=True)
    t.start()
    t.join(timeout)
    return h if not t.is_alive() and h.ok else None


def test_fd_exhaustion_never_stops_accept(tmp_path):
    """The default store.open_packs under a low descriptor limit: reading more
    point exports than the daemon has descriptors for leaves it serving (the
    old unbounded pack cache kept every pack open and starved accept() for
    good); then NBD clients exhaust its descriptors, are refused, leave, and
    the control API and NBD accept answer again."""
    d = LowFdDaemon(tmp_path / "state").start()
    try:
        with open(f"/proc/{d.proc.pid}/limits") as f:
            assert any(l.startswith("Max open files") and f" {NOFILE} " in l for l in f), \
                "the daemon must run with the low limit"
        make_points(d, MANY_POINTS)
        for i in range(MANY_POINTS):
            h = connect(d.rp_uri("c", f"rp{i}", "d"))
            assert h is not None, f"point export rp{i} refused: {fd_count(d.proc.pid)} fds open"
            assert h.pread(G, (i % 16) * G) == bytes([i + 1]) * G
            h.shutdown()
        assert api_answers(d), "control API stopped answering after the point exports"

        # NBD clients until the daemon has no descriptor left: every accepted
        # connection costs it one; the ones beyond are refused, not left hanging.
        clients, refused = [], 0
        for _ in range(NOFILE + 40):
            h = connect(d.nbd_uri("d"))
            if h is None:
                refused += 1
                if refused >= 5:
                    break
                continue
            clients.append(h)
        assert refused >= 5, f"{len(clients)} NBD clients and the daemon still had descriptors"
        assert d.proc.poll() is None
        assert not api_answers(d, timeout=5)  # exhausted: refused (or no answer)
        for h in clients:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        clients.clear()
        # Released: the control API and NBD accept answer again, soon.
        deadline = time.monotonic() + 15
        while not api_answers(d) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api_answers(d), "control API did not come back after descriptors were freed"
        h = connect(d.nbd_uri("d"))
        assert h is not None, "NBD accept did not come back"
        last = max(i for i in range(MANY_POINTS) if i % 16 == 0)
        assert h.pread(G, 0) == bytes([last + 1]) * G
        h.shutdown()
        with open(d.log_path, "rb") as f:
            log = f.read().decode(errors="replace")
        # Logged, but not once per failed accept.
        lines = [l for l in log.splitlines() if "accept" in l and "open files" in l]
        assert 1 <= len(lines) <= 20, lines[-30:]
    finally:
        d.stop()
