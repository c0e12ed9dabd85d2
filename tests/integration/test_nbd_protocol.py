"""The NBD protocol, command by command and error by error.

Commands and flags go through python3-libnbd; what libnbd refuses to send
(unknown commands and flags, bad magic, truncated or garbage messages, clients
that vanish mid-request) goes through the raw client in nbd_targets.py. After
each test the disk fixture checks that the server is alive and still serves a
fresh client.
"""
import errno
import os
import socket
import struct
import threading
import time

import pytest

from nbd_targets import (
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, EPERM, FLAG_DF, FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE,
    FLAG_REQ_ONE, IHAVEOPT, OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_SERVER, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, ProtocolError, RawClient, libnbd_alive, make_target)

nbd = pytest.importorskip("nbd", reason="python3-libnbd (run with /usr/bin/python3)")

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def target(tmp_path):
    t = make_target(tmp_path)
    yield t
    t.close()


@pytest.fixture
def disk(target):
    uri = target.create("d", SIZE)
    yield uri
    # Whatever the test did, the server is alive and serves a new client.
    assert target.alive(), target.log()
    assert libnbd_alive(uri, SIZE)


def connect(uri, meta=True, structured=True, strict=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    if not structured:
        h.set_request_structured_replies(False)
    if not strict:
        h.set_strict_mode(0)  # let libnbd send what the server must refuse
    h.connect_uri(uri)
    return h


def extents(h, offset, length, flags=0):
    out = []

    def cb(ctx, off, entries, err):
        assert ctx == "base:allocation"
        for i in range(0, len(entries), 2):
            out.append((entries[i], entries[i + 1]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def status_at(h, offset):
    return extents(h, offset, 4096, nbd.CMD_FLAG_REQ_ONE)[0][1]


def errno_of(e):
    # python3-libnbd reports errno as its name ("EINVAL"); normalise to the number.
    return getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno


def nbd_errno(fn, *args):
    with pytest.raises(nbd.Error) as e:
        fn(*args)
    return errno_of(e.value)


def pattern(seed, n):
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


# --------------------------------------------------------------------------
# Commands


def test_advertised_flags_and_sizes(disk):
    h = connect(disk)
    assert h.get_size() == SIZE
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn() and h.can_df()
    assert h.can_meta_context("base:allocation")
    assert h.get_structured_replies_negotiated()
    assert h.get_block_size(nbd.SIZE_MINIMUM) >= 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 32 * MiB
    h.shutdown()


def test_write_read_fua_flush(disk):
    h = connect(disk)
    data = pattern(1, 256 * 1024)
    h.pwrite(data, 12345, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 12345) == data
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    h.shutdown()
    h2 = connect(disk)
    assert h2.pread(len(data), 12345) == data
    assert h2.pread(4096, 0) == b"x" * 4096
    h2.shutdown()


def test_trim_makes_a_hole(disk):
    h = connect(disk)
    h.pwrite(b"\xee" * MiB, 2 * MiB)
    h.flush()
    assert status_at(h, 2 * MiB) == 0  # data
    h.trim(MiB, 2 * MiB, nbd.CMD_FLAG_FUA)
    assert status_at(h, 2 * MiB) & 1, "trimmed range is reported as a hole"
    assert h.pread(MiB, 2 * MiB) == bytes(MiB)
    h.shutdown()


def test_zero_plain_no_hole_fast(disk):
    h = connect(disk)
    for off in (0, 4 * MiB, 8 * MiB):
        h.pwrite(b"\x77" * MiB, off)
    h.zero(MiB, 0)
    assert h.pread(MiB, 0) == bytes(MiB)
    assert status_at(h, 0) & 2, "zeroed range reads as zero"
    h.zero(MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(MiB, 4 * MiB) == bytes(MiB)
    # FAST_ZERO either zeroes quickly or fails with ENOTSUP, leaving data alone.
    try:
        h.zero(MiB, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(MiB, 8 * MiB) == bytes(MiB)
    except nbd.Error as e:
        assert errno_of(e) == errno.ENOTSUP
        assert h.pread(MiB, 8 * MiB) == b"\x77" * MiB
    # Unaligned zeroing in the middle of data.
    h.pwrite(b"\x99" * 8192, 12 * MiB)
    h.zero(1000, 12 * MiB + 3)
    got = h.pread(8192, 12 * MiB)
    assert got == b"\x99" * 3 + bytes(1000) + b"\x99" * (8192 - 1003)
    h.shutdown()


def test_block_status(disk):
    h = connect(disk)
    h.pwrite(b"\x01" * 65536, MiB)
    h.flush()
    ex = extents(h, 0, SIZE)
    assert sum(n for n, _ in ex) <= SIZE
    assert ex[0] == (MiB, 3), ex  # hole|zero up to the data
    assert ex[1][1] == 0 and ex[1][0] >= 65536, ex
    # REQ_ONE: exactly one extent, never longer than asked.
    one = extents(h, 0, 8192, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][0] <= 8192
    one = extents(h, MiB + 100, 3 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][1] == 0 and one[0][0] <= 65536 - 100
    # Unaligned start, last bytes of the disk.
    assert sum(n for n, _ in extents(h, SIZE - 777, 777)) == 777
    h.shutdown()


def test_cache(disk):
    h = connect(disk)
    h.pwrite(b"c" * 65536, 0)
    h.cache(MiB, 0)
    h.cache(4096, SIZE - 4096)
    h.shutdown()


def test_multi_conn_flush_covers_other_connections(disk):
    hs = [connect(disk) for _ in range(4)]
    assert all(h.can_multi_conn() for h in hs)
    hs[0].pwrite(b"A" * 65536, 0)
    hs[1].pwrite(b"B" * 65536, 65536)
    hs[3].flush()  # covers the writes replied to on the other connections
    assert hs[2].pread(65536, 0) == b"A" * 65536
    assert hs[2].pread(65536, 65536) == b"B" * 65536
    # Concurrent writers on several connections, many requests in flight each.
    def writer(h, seed):
        for i in range(64):
            h.aio_pwrite(bytes([seed]) * 4096, (seed * 64 + i) * 4096)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    ts = [threading.Thread(target=writer, args=(h, i + 1)) for i, h in enumerate(hs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    hs[0].flush()
    for i in range(4):
        assert hs[(i + 1) % 4].pread(64 * 4096, (i + 1) * 64 * 4096) == bytes([i + 1]) * 64 * 4096
    for h in hs:
        h.shutdown()


def test_simple_replies_only(disk):
    h = connect(disk, meta=False, structured=False, strict=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()
    h.pwrite(b"s" * 8192, 4096)
    assert h.pread(8192, 4096) == b"s" * 8192
    assert nbd_errno(h.pread, 4096, SIZE) == errno.EINVAL
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def test_read_only_export(target):
    uri = target.create_read_only("image", MiB)
    h = connect(uri, strict=False)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero() and not h.can_fua()
    assert h.pread(4096, 0) == bytes(4096)
    assert nbd_errno(h.pwrite, b"x" * 512, 0) == errno.EPERM
    assert nbd_errno(h.trim, 512, 0) == errno.EPERM
    assert nbd_errno(h.zero, 512, 0) == errno.EPERM
    h.flush()
    h.shutdown()


def test_option_haggling_with_libnbd(target):
    target.create("one", MiB)
    target.create("two", 2 * MiB)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.connect_uri(target.uri("two"))
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert {"one", "two"} <= set(names)
    contexts = []
    h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
    assert contexts == ["base:allocation"]
    h.set_export_name("one")
    h.opt_info()
    assert h.get_size() == MiB
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.set_export_name("two")
    h.opt_go()
    assert h.get_size() == 2 * MiB
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


# --------------------------------------------------------------------------
# Errors through libnbd


def test_out_of_range_requests(disk):
    h = connect(disk, strict=False)
    assert nbd_errno(h.pread, 4096, SIZE) == errno.EINVAL
    assert nbd_errno(h.pread, 4096, SIZE - 2048) == errno.EINVAL
    assert nbd_errno(h.pread, 512, 1 << 62) == errno.EINVAL
    assert nbd_errno(h.pwrite, b"w" * 4096, SIZE - 2048) == errno.ENOSPC
    assert nbd_errno(h.pwrite, b"w" * 512, 1 << 62) == errno.ENOSPC
    assert nbd_errno(h.zero, 4096, SIZE) == errno.ENOSPC
    assert nbd_errno(h.trim, 4096, SIZE) == errno.EINVAL
    assert nbd_errno(h.cache, 4096, SIZE) == errno.EINVAL
    assert nbd_errno(extents, h, SIZE, 4096) == errno.EINVAL
    # Nothing was written past the end or at the start; the connection still works.
    assert h.pread(4096, SIZE - 4096) == bytes(4096)
    assert h.get_size() == SIZE
    h.shutdown()


def test_oversized_read(target):
    uri = target.create("big", 64 * MiB)
    h = connect(uri, strict=False)
    assert nbd_errno(h.pread, 32 * MiB + 4096, 0) == errno.EINVAL
    assert len(h.pread(32 * MiB, 0)) == 32 * MiB  # the advertised maximum itself is fine
    h.shutdown()


# --------------------------------------------------------------------------
# Errors through raw sockets


def raw(target, name="d", **kw):
    return RawClient(target.sock).connect(name, **kw)


def replies_by_cookie(c, n):
    got = {}
    for _ in range(n):
        err, cookie, data = c.reply()
        got[cookie] = (err, data, list(c.chunks))
    return got


def test_unknown_commands_and_bad_flags(target, disk):
    for structured in (False, True):
        c = raw(target, structured=structured)
        c.request(42, 0, 512, cookie=1)                         # unknown command
        c.request(CMD_READ, 0, 512, flags=0x80, cookie=2)       # unknown flag
        c.request(CMD_READ, 0, 512, flags=FLAG_NO_HOLE, cookie=3)
        c.request(CMD_READ, 0, 512, flags=FLAG_REQ_ONE, cookie=4)
        c.request(CMD_WRITE, 0, 512, flags=FLAG_REQ_ONE, cookie=5, payload=b"z" * 512)
        c.request(CMD_FLUSH, 4096, 0, cookie=6)                 # FLUSH with an offset
        c.request(CMD_BLOCK_STATUS, 0, 512, cookie=7)           # no metadata context
        c.request(CMD_WRITE_ZEROES, 0, 512, flags=FLAG_DF, cookie=8)
        c.request(CMD_READ, 0, 0, cookie=9)                     # zero length
        c.request(CMD_TRIM, 0, 512, flags=FLAG_FAST_ZERO, cookie=10)
        if not structured:
            c.request(CMD_READ, 0, 512, flags=FLAG_DF, cookie=11)  # DF needs structured replies
        n = 11 if not structured else 10
        got = {}
        for _ in range(n):
            err, cookie, _ = c.reply()
            got[cookie] = err
        assert got == {k: EINVAL for k in range(1, n + 1)}, got
        # The write payload was consumed: the stream is still in sync.
        c.request(CMD_READ, 0, 512, cookie=99)
        err, cookie, data = c.reply(read_len=512)
        assert (err, cookie) == (0, 99)
        assert data == bytes(512), "the refused write must not have written"
        c.request(CMD_DISC)
        assert c.closed_by_server()
        c.close()


def test_structured_error_chunks_and_df(target, disk):
    c = raw(target, structured=True, meta=True)
    c.request(CMD_READ, SIZE, 4096, cookie=1)
    err, cookie, data = c.reply()
    assert (err, cookie, data) == (EINVAL, 1, b"")
    (rtype, flags, payload), = c.chunks
    assert rtype == REPLY_TYPE_ERROR and flags & REPLY_FLAG_DONE
    e, mlen = struct.unpack(">IH", payload[:6])
    assert e == EINVAL and mlen == len(payload) - 6 and mlen > 0
    # DF: a single OFFSET_DATA chunk, which is also the last one.
    c.request(CMD_WRITE, 8192, 8192, cookie=2, payload=b"q" * 8192)
    assert c.reply()[:2] == (0, 2)
    c.request(CMD_READ, 8192 + 100, 5000, flags=FLAG_DF, cookie=3)
    err, cookie, data = c.reply()
    assert (err, cookie, data) == (0, 3, b"q" * 5000)
    (rtype, flags, payload), = c.chunks
    assert rtype == REPLY_TYPE_OFFSET_DATA and flags & REPLY_FLAG_DONE
    assert struct.unpack(">Q", payload[:8])[0] == 8192 + 100
    # Block status comes as one BLOCK_STATUS chunk with our context id.
    c.request(CMD_BLOCK_STATUS, 0, SIZE, flags=FLAG_REQ_ONE, cookie=4)
    err, cookie, _ = c.reply()
    assert (err, cookie) == (0, 4)
    (rtype, flags, payload), = c.chunks
    assert rtype == REPLY_TYPE_BLOCK_STATUS and flags & REPLY_FLAG_DONE
    ctx, length, st = struct.unpack(">III", payload)
    assert ctx == c.meta_id and 0 < length <= SIZE
    c.request(CMD_WRITE, SIZE - 1, 2, cookie=5, payload=b"xx")
    assert c.reply()[:2] == (ENOSPC, 5)
    c.close()


def test_refused_write_payload_is_consumed(target, disk):
    c = raw(target)
    body = os.urandom(65536)
    c.request(CMD_WRITE, SIZE - 4096, 65536, cookie=1, payload=body)        # past the end
    c.request(CMD_WRITE, 0, 65536, flags=FLAG_FAST_ZERO, cookie=2, payload=body)  # bad flag
    c.request(CMD_WRITE, 0, 65536, cookie=3, payload=body)                  # good
    got = {}
    for _ in range(3):
        err, cookie, _ = c.reply()
        got[cookie] = err
    assert got == {1: ENOSPC, 2: EINVAL, 3: 0}
    c.request(CMD_READ, 0, 65536, cookie=4)
    err, cookie, data = c.reply(read_len=65536)
    assert (err, cookie) == (0, 4) and data == body
    c.close()


def test_absurd_write_length_closes_connection(target, disk):
    c = raw(target)
    c.request(CMD_WRITE, 0, 0xFFFFFFF0, cookie=1, payload=b"x" * 1000)
    assert c.closed_by_server()
    c.close()
    c = raw(target)
    # Above 64 MiB (the most a client that never asked for block sizes may
    # send, as with nbdkit): not worth reading.
    c.request(CMD_WRITE, 0, 65 * MiB, cookie=1)
    assert c.closed_by_server()
    c.close()


def test_bad_request_magic_closes_connection(target, disk):
    c = raw(target)
    c.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert c.closed_by_server()
    c.close()


def test_pipelined_requests_and_out_of_order_replies(target, disk):
    c = raw(target, structured=True)
    body = {i: os.urandom(4096 * (1 + i % 8)) for i in range(64)}
    off = {i: i * 65536 + (i % 3) for i in range(64)}
    for i in range(64):
        c.request(CMD_WRITE, off[i], len(body[i]), cookie=1000 + i, payload=body[i])
    got = replies_by_cookie(c, 64)
    assert all(got[1000 + i][0] == 0 for i in range(64))
    for i in range(64):
        c.request(CMD_READ, off[i], len(body[i]), cookie=2000 + i)
    got = replies_by_cookie(c, 64)
    for i in range(64):
        assert got[2000 + i][0] == 0 and got[2000 + i][1] == body[i]
    c.close()


# --------------------------------------------------------------------------
# Handshakes: garbage, truncation, refusals; the server keeps serving others.


def test_garbage_and_truncated_handshakes(target, disk):
    h = connect(disk)
    h.pwrite(b"K" * 4096, 0)
    sock = target.sock

    def conn():
        return RawClient(sock, timeout=10)

    # Connect and vanish, at every early point.
    conn().close()
    c = conn()
    c.recv_exact(5)
    c.close()
    c = conn()
    c.greeting(client_flags=None)
    c.send(b"\0\0")  # half the client flags
    c.close()
    # Unknown client flags: dropped.
    c = conn()
    c.greeting(client_flags=0x80000000)
    assert c.closed_by_server()
    # Bad option magic: dropped.
    c = conn()
    c.greeting()
    c.send(b"IHAVENOT" + struct.pack(">II", OPT_GO, 0))
    assert c.closed_by_server()
    # Option data cut short, then gone.
    c = conn()
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"abc")
    c.close()
    # Absurd option length: dropped without reading it.
    c = conn()
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_INFO, 0x7FFFFFFF))
    assert c.closed_by_server()
    # EXPORT_NAME of an unknown export cannot be answered: dropped.
    c = conn()
    c.greeting()
    c.option(OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()
    # Random bytes after the greeting.
    for i in range(10):
        c = conn()
        c.greeting()
        c.send(os.urandom(64 + i * 100))
        c.closed_by_server(timeout=2)
        c.close()
    # The first client never noticed.
    assert h.pread(4096, 0) == b"K" * 4096
    h.shutdown()


def test_refused_options_keep_haggling(target, disk):
    c = RawClient(target.sock)
    c.greeting()
    c.option(0x7777)
    assert c.opt_reply()[1] == REP_ERR_UNSUP
    c.option(OPT_STARTTLS)
    assert c.opt_reply()[1] in (REP_ERR_UNSUP, REP_ERR_POLICY)
    c.option(OPT_EXTENDED_HEADERS)
    assert c.opt_reply()[1] == REP_ERR_UNSUP
    c.option(OPT_SET_META_CONTEXT, struct.pack(">I", 1) + b"d" + struct.pack(">I", 0))
    assert c.opt_reply()[1] == REP_ERR_INVALID  # before STRUCTURED_REPLY
    c.option(OPT_LIST, b"junk")
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.option(OPT_INFO, b"\0\0")
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.option(OPT_INFO, bytes(100 * 1024))  # too big to bother with, small enough to skip
    assert c.opt_reply()[1] == REP_ERR_TOO_BIG
    for name in (b"", b"nope", b"n" * 4096):
        c.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        _, rtype, msg = c.opt_reply()
        assert rtype == REP_ERR_UNKNOWN and msg
    name = b"n" * 4097  # longer than any NBD string
    c.option(OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
    assert c.opt_reply()[1] == REP_ERR_INVALID
    c.option(OPT_LIST)
    names = []
    while True:
        _, rtype, data = c.opt_reply()
        if rtype != REP_SERVER:
            break
        names.append(data[4:4 + struct.unpack(">I", data[:4])[0]])
    assert rtype == REP_ACK and b"d" in names
    # After all that, GO still works.
    assert c.go("d", structured=True, meta=True) == REP_ACK
    c.request(CMD_READ, 0, 512, cookie=7)
    assert c.reply()[:2] == (0, 7)
    c.close()
    # ABORT is acknowledged.
    c = RawClient(target.sock)
    c.greeting()
    c.option(OPT_ABORT)
    assert c.opt_reply()[1] == REP_ACK
    assert c.closed_by_server()


def test_export_name_with_and_without_zeroes(target, disk):
    for flags, pad in ((1, 124), (3, 0)):
        c = RawClient(target.sock)
        c.greeting(client_flags=flags)
        c.option(OPT_EXPORT_NAME, b"d")
        size, tx = struct.unpack(">QH", c.recv_exact(10))
        assert size == SIZE and tx & 1
        if pad:
            assert c.recv_exact(pad) == bytes(pad)
        c.request(CMD_READ, 0, 512, cookie=5)
        err, cookie, data = c.reply(read_len=512)
        assert (err, cookie) == (0, 5) and len(data) == 512
        c.close()


def test_silent_clients_do_not_block_others(target, disk):
    idle = [RawClient(target.sock) for _ in range(8)]  # never say anything
    half = [RawClient(target.sock) for _ in range(4)]
    for c in half:
        c.greeting()
        c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))  # half an option header
    t0 = time.time()
    assert libnbd_alive(disk, SIZE)
    assert time.time() - t0 < 5
    for c in idle + half:
        c.close()


# --------------------------------------------------------------------------
# Clients vanishing


def test_client_vanishes_mid_write(target, disk):
    h = connect(disk)
    original = os.urandom(MiB)
    h.pwrite(original, 0)
    c = raw(target)
    c.request(CMD_WRITE, 0, MiB, cookie=1, payload=b"\xff" * (300 * 1024))
    time.sleep(0.1)
    c.close()  # 700 KiB of the payload never arrive
    time.sleep(0.2)
    assert h.pread(MiB, 0) == original, "a write whose payload never arrived must not land"
    h.shutdown()


def test_clients_vanish_with_requests_in_flight(target, disk):
    for _ in range(3):
        c = raw(target, structured=True)
        for i in range(64):
            c.request(CMD_READ, (i % 16) * MiB, MiB, cookie=i)
        for i in range(16):
            c.request(CMD_WRITE, i * 65536, 65536, cookie=100 + i, payload=b"v" * 65536)
        c.close()  # replies (tens of MiB) never read
    # A reset right in the middle of a reply stream.
    c = raw(target)
    for i in range(32):
        c.request(CMD_READ, 0, MiB, cookie=i)
    c.recv_exact(1000)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    time.sleep(0.3)
    assert target.alive()


def test_disconnect_finishes_in_flight_writes(target, disk):
    c = raw(target)
    body = os.urandom(65536)
    for i in range(32):
        c.request(CMD_WRITE, i * 65536, 65536, cookie=i, payload=body)
    c.request(CMD_DISC)
    # The server answers what it had read, then closes.
    got = 0
    try:
        while True:
            err, _, _ = c.reply()
            assert err == 0
            got += 1
    except ProtocolError:
        pass
    assert got == 32
    c.close()
    h = connect(disk)
    for i in range(32):
        assert h.pread(65536, i * 65536) == body
    h.shutdown()


# --------------------------------------------------------------------------
# The disk goes away; the server stops


def test_force_deleted_disk_disconnects_clients(target):
    if target.kind != "daemon":
        pytest.skip("needs the control API")
    d = target.daemon
    uri = target.create("gone", MiB)
    other = target.create("stays", MiB)
    h = connect(uri)
    h2 = connect(other)
    assert d.api("GET", "/disks/gone").json["properties"]["attachedClients"] == 1
    assert d.api("DELETE", "/disks/gone").status == 409  # in use
    assert d.api("DELETE", "/disks/gone?force=true").status in (200, 202, 204)
    deadline = time.time() + 5
    while True:
        try:
            h.pread(512, 0)
        except nbd.Error:
            break
        assert time.time() < deadline, "client of a deleted disk was not disconnected"
        time.sleep(0.05)
    assert h2.pread(512, 0) == bytes(512)
    h2.shutdown()
    deadline = time.time() + 5
    while d.api("GET", "/disks/stays").json["properties"]["attachedClients"] != 0:
        assert time.time() < deadline, "attachedClients did not drop after disconnect"
        time.sleep(0.05)


def test_shutdown_with_clients_attached(target):
    uri = target.create("s", 64 * MiB)
    idle = connect(uri)
    idle.pwrite(b"D" * 65536, 0)  # acknowledged: must survive the stop
    busy = raw(target, "s")
    for i in range(64):  # ~64 MiB of replies the client never reads
        busy.request(CMD_READ, 0, MiB, cookie=i)
    shaking = RawClient(target.sock)
    shaking.greeting()
    time.sleep(0.2)
    t0 = time.time()
    rc = target.stop()
    assert rc == 0, target.log()
    assert time.time() - t0 < 20, "shutdown took too long"
    for c in (busy, shaking):
        c.close()
    if target.kind == "daemon":
        target.daemon.start()
        h = connect(uri)
        assert h.pread(65536, 0) == b"D" * 65536
        h.shutdown()


# --------------------------------------------------------------------------
# Fuzzing: mutated client transcripts fed to one connection on stdin/stdout
# (NbdServer::serve_one), preferably under ASan/UBSan. Every run must end by
# itself, exit 0 and leave no sanitizer report.


def _transcript(rng):
    """A valid client byte stream: handshake, a mix of requests, maybe DISC."""
    out = bytearray(struct.pack(">I", 3))
    out += struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0)
    name = b"f"
    q = b"base:allocation"
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q
    out += struct.pack(">QII", IHAVEOPT, OPT_SET_META_CONTEXT, len(meta)) + meta
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
    out += struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go
    for i in range(rng.randint(1, 40)):
        cmd = rng.choice([CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES,
                          CMD_BLOCK_STATUS])
        off = rng.choice([0, 1, 511, 4096, rng.randrange(0, MiB), MiB - 4096])
        length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 200000)])
        flags = rng.choice([0, 0, 0, FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO])
        if cmd == CMD_FLUSH:
            off = length = 0
        out += struct.pack(">IHHQQI", 0x25609513, flags, cmd, i, off, length)
        if cmd == CMD_WRITE:
            out += bytes([i & 0xFF]) * length
    if rng.random() < 0.5:
        out += struct.pack(">IHHQQI", 0x25609513, 0, CMD_DISC, 999, 0, 0)
    return bytes(out)


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:  # flip bits
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # random bytes in place
            n = rng.randint(1, 8)
            data[pos:pos + n] = os.urandom(n)
        elif op == 2:  # truncate
            del data[pos:]
        elif op == 3:  # insert junk
            data[pos:pos] = os.urandom(rng.randint(1, 64))
        elif op == 4 and data:  # interesting 32-bit values
            v = rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4097])
            data[pos:pos + 4] = struct.pack(">I", v)
    return bytes(data)


def test_fuzz_single_connection(tmp_path):
    import random
    import subprocess
    from rpointd_harness import REPO
    from nbd_targets import TESTSERVER

    asan = os.path.join(os.environ.get("RPOINTD_ASAN_BUILD_DIR", os.path.join(REPO, "build-asan")),
                        "nbd", "nbd_testserver")
    binary = asan if os.path.exists(asan) else TESTSERVER
    if not os.path.exists(binary):
        pytest.skip(f"{TESTSERVER} is not built")
    exports = tmp_path / "exports"
    exports.mkdir()
    with open(exports / "f", "wb") as f:
        f.truncate(MiB)
    seed = int(os.environ.get("NBD_FUZZ_SEED", str(int(time.time()))))
    iterations = int(os.environ.get("NBD_FUZZ_ITERATIONS", "120"))
    rng = random.Random(seed)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87")
    deadline = time.time() + float(os.environ.get("NBD_FUZZ_SECONDS", "20"))
    for i in range(iterations):
        if time.time() > deadline:
            break
        case = _transcript(rng)
        if i % 10:  # every tenth run is the unmutated transcript
            case = _mutate(rng, case)
        inp = tmp_path / "case.bin"
        inp.write_bytes(case)
        with open(inp, "rb") as stdin:
            r = subprocess.run([binary, "--dir", str(exports), "--stdio", "--log-level", "error",
                                "--handshake-timeout", "5"],
                               stdin=stdin, capture_output=True, timeout=30, env=env)
        if r.returncode != 0 or b"Sanitizer" in r.stderr or b"runtime error" in r.stderr:
            (tmp_path / "crash.bin").write_bytes(case)
            pytest.fail(f"seed {seed} run {i}: exit {r.returncode}\n"
                        f"{r.stderr.decode(errors='replace')[-4000:]}\ncase saved in {tmp_path}/crash.bin")
