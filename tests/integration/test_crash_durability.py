"""Writes acknowledged before a completed FLUSH survive kill -9 of the daemon.

A writer drives several NBD connections (python3-libnbd, asynchronous, many
requests in flight) with sequence-stamped 4 KiB blocks, write-zeroes and FUA
writes mixed in, and FLUSHes every few dozen milliseconds. For each completed
FLUSH it knows which writes had been acknowledged before that FLUSH was sent:
those must be durable (NBD spec, "Ordering"; with CAN_MULTI_CONN a FLUSH on one
connection covers acknowledgements on every connection, otherwise only its
own). A FUA write is durable once acknowledged.

At a random moment the daemon gets SIGKILL. After a restart every block must
hold either the last write that had to be durable or a later write issued to
that block, byte for byte (no torn, misplaced or invented data), and blocks
never written must still read as zeroes. Several rounds run on the same disk,
each starting from what the previous one read back; the whole thing runs with
the daemon in buffered and in O_DIRECT mode.

A kill -9 is not a power cut (the page cache survives), so this proves that
the daemon never acknowledges a write it has not handed to the kernel, never
reorders or loses data across restarts, and that disk metadata survives.
"""
import os
import random
import select
import signal
import struct
import time

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

BLOCK = 4096
DISK_SIZE = 32 << 20
HOT_BLOCKS = 4096          # writes go to the first 16 MiB; the rest must stay zero
CONNECTIONS = 4
QUEUE_DEPTH = 16           # per connection
FLUSH_EVERY = 0.03         # seconds between FLUSHes on a connection
MAGIC = b"RPCRASH1"
HEADER = struct.Struct("<8sQQQ")  # magic, block, seq, round

QUICK = os.environ.get("RPOINTD_QUICK") == "1"
ROUNDS = 2 if QUICK else 4


def block_bytes(block, seq, rnd):
    """The full, reproducible content of write `seq` to `block`."""
    header = HEADER.pack(MAGIC, block, seq, rnd)
    fill = struct.pack("<Q", (seq * 0x9E3779B97F4A7C15 ^ block) & 0xFFFFFFFFFFFFFFFF)
    return header + fill * ((BLOCK - len(header)) // 8)


ZERO_BLOCK = bytes(BLOCK)


class State:
    """What each hot block holds: (seq, round) of a write, or (seq, None) for zeroes
    (seq 0: the fresh disk)."""

    def __init__(self):
        self.block = {b: (0, None) for b in range(HOT_BLOCKS)}
        self.next_seq = 1


class Writer:
    """One round of load on several connections, until the daemon dies."""

    def __init__(self, uri, state, rnd, rng):
        self.state = state
        self.rnd = rnd
        self.rng = rng
        self.handles = []
        for _ in range(CONNECTIONS):
            h = nbd.NBD()
            h.connect_uri(uri)
            self.handles.append(h)
        h0 = self.handles[0]
        assert h0.get_size() == DISK_SIZE
        assert h0.can_flush(), "rpointd must advertise FLUSH"
        self.multi_conn = h0.can_multi_conn()
        self.can_fua = h0.can_fua()
        self.can_zero = h0.can_zero()
        self.inflight_blocks = set()
        self.inflight = [0] * CONNECTIONS
        # Every op issued this round per block: seq -> ("w", rnd) | ("z", None).
        self.issued = {}
        # Acknowledgements in order, per connection and overall: (block, seq).
        self.acks = [[] for _ in range(CONNECTIONS)]
        self.all_acks = []
        self.applied = [0] * CONNECTIONS   # acks already made durable by a flush
        self.applied_all = 0
        self.required = {}                 # block -> lowest seq it may hold
        self.flush_inflight = [False] * CONNECTIONS
        self.last_flush = [time.monotonic()] * CONNECTIONS
        self.flushes_done = 0
        self.durable_writes = 0
        self.acked_writes = 0
        self.errors = []                   # completions with an error
        self.dead = False

    # -- completions (run inside aio_notify_*, on this thread) --

    def _on_op(self, conn, block, seq, fua, err):
        self.inflight[conn] -= 1
        self.inflight_blocks.discard(block)
        if err.value != 0:
            self.errors.append((time.monotonic(), "write/zero", block, seq, err.value))
            return 1
        self.acked_writes += 1
        self.acks[conn].append((block, seq))
        self.all_acks.append((block, seq))
        if fua:
            self._require(block, seq)
        return 1

    def _on_flush(self, conn, upto_conn, upto_all, err):
        self.flush_inflight[conn] = False
        if err.value != 0:
            self.errors.append((time.monotonic(), "flush", None, None, err.value))
            return 1
        self.flushes_done += 1
        if self.multi_conn:
            if upto_all > self.applied_all:
                for block, seq in self.all_acks[self.applied_all:upto_all]:
                    self._require(block, seq)
                self.applied_all = upto_all
        elif upto_conn > self.applied[conn]:
            for block, seq in self.acks[conn][self.applied[conn]:upto_conn]:
                self._require(block, seq)
            self.applied[conn] = upto_conn
        return 1

    def _require(self, block, seq):
        if seq > self.required.get(block, 0):
            if block not in self.required:
                self.durable_writes += 1
            self.required[block] = seq

    # -- issuing --

    def _issue(self, conn):
        h = self.handles[conn]
        now = time.monotonic()
        if not self.flush_inflight[conn] and now - self.last_flush[conn] >= FLUSH_EVERY:
            # Snapshot what was acknowledged before this FLUSH is sent.
            upto_conn, upto_all = len(self.acks[conn]), len(self.all_acks)
            h.aio_flush(completion=lambda err, c=conn, a=upto_conn, b=upto_all:
                        self._on_flush(c, a, b, err))
            self.flush_inflight[conn] = True
            self.last_flush[conn] = now
        while self.inflight[conn] < QUEUE_DEPTH:
            block = self.rng.randrange(HOT_BLOCKS)
            if block in self.inflight_blocks:
                continue  # one op per block at a time keeps each block's history ordered
            seq = self.state.next_seq
            self.state.next_seq += 1
            off = block * BLOCK
            r = self.rng.random()
            fua = False
            if self.can_zero and r < 0.05:
                self.issued.setdefault(block, {})[seq] = ("z", None)
                h.aio_zero(BLOCK, off, completion=lambda err, c=conn, b=block, s=seq:
                           self._on_op(c, b, s, False, err))
            else:
                fua = self.can_fua and r > 0.95
                buf = nbd.Buffer.from_bytearray(block_bytes(block, seq, self.rnd))
                self.issued.setdefault(block, {})[seq] = ("w", self.rnd)
                flags = nbd.CMD_FLAG_FUA if fua else 0
                # The Buffer must outlive the command: the lambda holds it.
                h.aio_pwrite(buf, off, flags=flags,
                             completion=lambda err, c=conn, b=block, s=seq, f=fua, keep=buf:
                             self._on_op(c, b, s, f, err))
            self.inflight_blocks.add(block)
            self.inflight[conn] += 1

    def run(self, kill_at, kill):
        """Runs the load; calls kill() at monotonic time kill_at; returns when
        every connection has failed (or after a safety timeout)."""
        deadline = kill_at + 20
        killed = False
        while time.monotonic() < deadline:
            if not killed and time.monotonic() >= kill_at:
                kill()
                killed = True
                self.kill_time = time.monotonic()
            live = []
            for i, h in enumerate(self.handles):
                if h is None:
                    continue
                try:
                    if not killed:
                        self._issue(i)
                    live.append(i)
                except nbd.Error:
                    self._drop(i)
            if not live:
                break
            poller = select.poll()
            fds = {}
            for i in live:
                h = self.handles[i]
                d = h.aio_get_direction()
                ev = 0
                if d & nbd.AIO_DIRECTION_READ:
                    ev |= select.POLLIN
                if d & nbd.AIO_DIRECTION_WRITE:
                    ev |= select.POLLOUT
                fd = h.aio_get_fd()
                fds[fd] = i
                poller.register(fd, ev)
            for fd, rev in poller.poll(20):
                i = fds[fd]
                h = self.handles[i]
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
        else:
            raise AssertionError("connections still alive 20 s after the kill")
        assert killed, "the daemon died before the planned kill"

    def _drop(self, i):
        h = self.handles[i]
        self.handles[i] = None
        if h is not None:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - a dead handle may complain; it is gone either way
                pass


def verify(uri, state, writer):
    """Reads every block back and checks it against what had to survive.
    Updates state to what the disk now holds."""
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == DISK_SIZE
    data = bytearray()
    chunk = 1 << 20
    for off in range(0, DISK_SIZE, chunk):
        data += h.pread(chunk, off)
    h.shutdown()

    problems = []
    for block in range(DISK_SIZE // BLOCK):
        got = bytes(data[block * BLOCK:(block + 1) * BLOCK])
        if block >= HOT_BLOCKS:
            if got != ZERO_BLOCK:
                problems.append(f"block {block}: never written, but not zero")
            continue
        base_seq, base_rnd = state.block[block]  # what it held when the round started
        issued = writer.issued.get(block, {})
        need = writer.required.get(block, 0)
        if got == ZERO_BLOCK:
            # Zeroes: the start state (fresh disk / earlier write-zeroes) or a write-zeroes
            # of this round. Which zeroing it was cannot be told apart: take the latest.
            cands = [s for s, (kind, _) in issued.items() if kind == "z"]
            if base_rnd is None:
                cands.append(base_seq)
            if not cands:
                problems.append(f"block {block}: reads as zeroes, but it held seq {base_seq} "
                                f"and no write-zeroes was issued to it")
                continue
            now = (max(cands), None)
        else:
            magic, b, seq, rnd = HEADER.unpack_from(got)
            if magic != MAGIC or b != block:
                problems.append(f"block {block}: garbage or misplaced data "
                                f"(magic={magic!r}, block field={b})")
                continue
            if got != block_bytes(block, seq, rnd):
                problems.append(f"block {block}: seq {seq} torn or corrupted")
                continue
            if issued.get(seq) != ("w", rnd) and (seq, rnd) != (base_seq, base_rnd):
                problems.append(f"block {block}: holds seq {seq} (round {rnd}), which was "
                                f"never written there (it held seq {base_seq} before)")
                continue
            now = (seq, rnd)
        if now[0] < need:
            problems.append(f"block {block}: holds seq {now[0]}, but seq {need} was "
                            f"acknowledged before a completed FLUSH (or with FUA)")
            continue
        state.block[block] = now
    return problems


def _daemon_config(mode):
    return "io:\n  direct: true\n" if mode == "direct" else "io:\n  direct: false\n"


@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_flushed_writes_survive_kill9(make_daemon, mode):
    d = make_daemon(config_text=_daemon_config(mode)).start()
    d.create_disk("crash", DISK_SIZE)
    uri = d.nbd_uri("crash")
    rng = random.Random(int(os.environ.get("RPOINTD_CRASH_SEED", time.time_ns())))
    seed_note = f"(RPOINTD_CRASH_SEED to replay; first random {rng.random():.6f})"
    state = State()
    total_durable = 0
    for rnd in range(1, ROUNDS + 1):
        w = Writer(uri, state, rnd, rng)
        pid = d.proc.pid
        kill_at = time.monotonic() + rng.uniform(0.4, 1.5)
        w.run(kill_at, lambda: os.kill(pid, signal.SIGKILL))
        d.kill9()  # reaps it
        early = [e for e in w.errors if e[0] < w.kill_time]
        assert not early, f"round {rnd}: I/O failed before the kill: {early[:5]}"
        assert w.flushes_done > 0, f"round {rnd}: no FLUSH completed before the kill"

        d.start()
        problems = verify(uri, state, w)
        assert not problems, (f"round {rnd} ({mode}, multi_conn={w.multi_conn}): "
                              f"{len(problems)} bad blocks {seed_note}:\n"
                              + "\n".join(problems[:30]) + "\n" + d.log()[-3000:])
        total_durable += w.durable_writes
        print(f"round {rnd}: {w.acked_writes} writes acked, {w.flushes_done} flushes, "
              f"{w.durable_writes} blocks with a durable write, multi_conn={w.multi_conn}")
    # The test must actually have had something to check.
    assert total_durable >= ROUNDS * 10, f"only {total_durable} durable writes checked"
    r = d.api("GET", "/disks/crash")
    assert r.status == 200, r
    assert d.stop() == 0, d.log()
