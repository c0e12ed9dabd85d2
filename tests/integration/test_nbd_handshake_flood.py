"""Hostile NBD clients that connect and never negotiate.

A connection that never finishes the handshake holds a handshake slot until
its deadline; at the cap of 512 the oldest of them is evicted for the newest,
so a flood of silent sockets cannot lock a real client out. Established
(transmission-phase) connections are never evicted.
"""
import os
import resource
import socket
import time

import pytest

nbd = pytest.importorskip("nbd", reason="python3-libnbd (run with /usr/bin/python3)")

MiB = 1 << 20
SILENT = 600


def _raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def _silent_sockets(path, n):
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        socks.append(s)
    return socks


def test_silent_flood_does_not_lock_out_clients(daemon):
    _raise_fd_limit(SILENT + 256)
    daemon.create_disk("d", 4 * MiB)
    uri = daemon.nbd_uri("d")
    pattern = bytes(range(256)) * 16
    early = nbd.NBD()
    early.connect_uri(uri)
    early.pwrite(pattern, 0)
    early.flush()

    socks = _silent_sockets(daemon.nbd_sock, SILENT)
    try:
        # Well inside the 30 s handshake deadline: only eviction frees a slot.
        start = time.monotonic()
        late = nbd.NBD()
        late.connect_uri(uri)
        assert late.pread(len(pattern), 0) == pattern
        late.shutdown()
        assert time.monotonic() - start < 10

        # The connection established before the flood was not evicted.
        assert early.pread(len(pattern), 0) == pattern
        early.pwrite(b"\xab" * 4096, 4096)
        assert early.pread(4096, 4096) == b"\xab" * 4096

        # The oldest silent sockets were the ones evicted (they see EOF after
        # the greeting), the newest still wait in their handshake.
        def closed(s):
            s.settimeout(5)
            try:
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return True
                    data += chunk
                    if len(data) >= 18:  # the greeting; now see whether EOF follows
                        s.settimeout(0.5)
            except socket.timeout:
                return False

        assert closed(socks[0])
        assert not closed(socks[-1])
    finally:
        for s in socks:
            s.close()
    early.shutdown()
    assert daemon.proc.poll() is None
