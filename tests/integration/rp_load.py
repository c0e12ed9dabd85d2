"""A sequence-stamping write load on several disks, for the restore point tests.

StampWriter drives python3-libnbd asynchronously: several connections per
disk, many 4 KiB writes in flight, one write per block at a time (so each
block's history is ordered), each write stamped with (disk, block, seq) and a
fill derived from them. For every write it records when it was submitted
(monotonic time taken *before* the request is handed to libnbd) and when its
acknowledgement was seen (taken in the completion callback, i.e. after the
reply arrived). Checks built on these times are conservative: an observed
"acked before T" is a real ack before T, an observed "submitted after T" a
real submission after T.

Used by test_restore_point_consistency.py (cut under load) and
test_restore_point_crash.py (kill -9 under load).
"""
import select
import struct
import time

import nbd

BLOCK = 4096
MAGIC = b"RPSTAMP1"
HEADER = struct.Struct("<8sIIQ")  # magic, disk index, block, seq
ZERO_BLOCK = bytes(BLOCK)


def stamp(disk_index, block, seq):
    """The full, reproducible content of write `seq` to `block` of disk `disk_index`."""
    header = HEADER.pack(MAGIC, disk_index, block, seq)
    fill = struct.pack("<Q", (seq * 0x9E3779B97F4A7C15 ^ (block << 8) ^ disk_index)
                       & 0xFFFFFFFFFFFFFFFF)
    return header + fill * ((BLOCK - len(header)) // 8)


def parse(disk_index, block, data):
    """seq of a stamped block, 0 for zeroes; raises ValueError for anything else."""
    if data == ZERO_BLOCK:
        return 0
    magic, d, b, seq = HEADER.unpack_from(data)
    if magic != MAGIC or d != disk_index or b != block:
        raise ValueError(f"garbage or misplaced data (magic={magic!r}, disk={d}, block={b})")
    if data != stamp(disk_index, block, seq):
        raise ValueError(f"seq {seq} torn or corrupted")
    return seq


class Write:
    __slots__ = ("seq", "disk", "block", "submit", "ack", "err")

    def __init__(self, seq, disk, block, submit):
        self.seq, self.disk, self.block, self.submit = seq, disk, block, submit
        self.ack = None
        self.err = None


class StampWriter:
    """Stamped writes to blocks [0, hot_blocks) of each disk in `uris` (list)."""

    def __init__(self, uris, hot_blocks, rng, connections=2, queue_depth=8, first_seq=1):
        self.hot_blocks = hot_blocks
        self.rng = rng
        self.conns = []  # (disk index, handle)
        for d, uri in enumerate(uris):
            for _ in range(connections):
                h = nbd.NBD()
                h.connect_uri(uri)
                self.conns.append([d, h])
        self.ndisks = len(uris)
        self.qd = queue_depth
        self.inflight = [0] * len(self.conns)
        self.busy = set()           # (disk, block) with a write in flight
        self.next_seq = first_seq
        self.writes = []            # every Write, in submission order
        self.errors = []
        self.dead = False

    # -- completions --

    def _done(self, conn, w, err):
        w.ack = time.monotonic()
        self.inflight[conn] -= 1
        self.busy.discard((w.disk, w.block))
        if err.value != 0:
            w.err = err.value
            self.errors.append(w)
        return 1

    # -- issuing --

    def _issue(self, i):
        d, h = self.conns[i]
        tries = 0
        while self.inflight[i] < self.qd and tries < 4 * self.qd:
            tries += 1
            block = self.rng.randrange(self.hot_blocks)
            if (d, block) in self.busy:
                continue
            w = Write(self.next_seq, d, block, 0.0)
            self.next_seq += 1
            buf = nbd.Buffer.from_bytearray(stamp(d, block, w.seq))
            self.busy.add((d, block))
            self.inflight[i] += 1
            self.writes.append(w)
            w.submit = time.monotonic()
            # The Buffer must outlive the command: the lambda holds it.
            h.aio_pwrite(buf, block * BLOCK,
                         completion=lambda err, c=i, w=w, keep=buf: self._done(c, w, err))

    def _poll_once(self, issue, timeout_ms=10):
        live = []
        for i, (_, h) in enumerate(self.conns):
            if h is None:
                continue
            try:
                if issue:
                    self._issue(i)
                live.append(i)
            except nbd.Error:
                self._drop(i)
        if not live:
            return False
        poller = select.poll()
        fds = {}
        for i in live:
            h = self.conns[i][1]
            d = h.aio_get_direction()
            ev = 0
            if d & nbd.AIO_DIRECTION_READ:
                ev |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                ev |= select.POLLOUT
            fd = h.aio_get_fd()
            fds[fd] = i
            poller.register(fd, ev)
        for fd, rev in poller.poll(timeout_ms):
            i = fds[fd]
            h = self.conns[i][1]
            try:
                if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                elif rev & select.POLLOUT:
                    h.aio_notify_write()
            except nbd.Error:
                self._drop(i)
                continue
            if h.aio_is_dead() or h.aio_is_closed():
                self._drop(i)
        return True

    def run(self, stop, drain_timeout=30):
        """Issues writes until stop() is true, then waits for those in flight."""
        while not stop():
            if not self._poll_once(issue=True):
                self.dead = True
                return
        deadline = time.monotonic() + drain_timeout
        while sum(self.inflight) > 0 and not self.dead:
            if not self._poll_once(issue=False):
                self.dead = True
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{sum(self.inflight)} writes still in flight "
                                     f"{drain_timeout} s after the load stopped")

    def run_until_dead(self, kill_at, kill, timeout=20, stop_early=None):
        """Issues writes; calls kill() at monotonic kill_at (or as soon as
        stop_early() is true); returns when every connection failed."""
        killed = False
        deadline = kill_at + timeout
        while time.monotonic() < deadline:
            if not killed and (time.monotonic() >= kill_at or (stop_early and stop_early())):
                kill()
                killed = True
            if not self._poll_once(issue=not killed):
                assert killed, "the daemon died before the planned kill"
                return
        raise AssertionError(f"connections still alive {timeout} s after the kill")

    def _drop(self, i):
        h = self.conns[i][1]
        self.conns[i][1] = None
        if h is not None:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - a dead handle may complain; it is gone anyway
                pass

    def close(self):
        for i, (_, h) in enumerate(self.conns):
            if h is not None:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
                self._drop(i)


def read_blocks(uri, nblocks, offset=0):
    """Reads nblocks 4 KiB blocks from offset through libnbd."""
    h = nbd.NBD()
    h.connect_uri(uri)
    data = bytearray()
    length = nblocks * BLOCK
    step = 1 << 20
    for off in range(0, length, step):
        data += h.pread(min(step, length - off), offset + off)
    h.shutdown()
    return bytes(data)
