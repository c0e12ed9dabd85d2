"""NBD test targets and a raw NBD client, shared by the NBD integration tests.

By default the tests run against the real daemon (rpointd, disks created with
the control API). RPOINTD_NBD_TARGET=testserver runs them against
build/nbd/nbd_testserver instead (the NBD server alone, serving the files of a
directory), which is handy while the daemon is being changed and for comparing.

RawClient speaks the protocol byte by byte, for what libnbd refuses to send:
unknown commands and flags, bad magic, truncated messages, clients that vanish.
"""
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from rpointd_harness import BUILD, Daemon, RPOINTD

TESTSERVER = os.path.join(BUILD, "nbd", "nbd_testserver")

# Protocol constants (doc/proto.md of the NetworkBlockDevice project).
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
OPT_EXTENDED_HEADERS = 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_TOO_BIG = 2**31 + 9
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS = 0, 1, 5
REPLY_TYPE_ERROR = 2**15 + 1

EPERM, EIO, EINVAL, ENOSPC, ENOTSUP = 1, 5, 22, 28, 95


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonTarget:
    """Disks made with the control API of a real rpointd."""

    kind = "daemon"

    def __init__(self, tmp_path, tcp_port=None):
        if not os.path.exists(RPOINTD):
            pytest.skip(f"{RPOINTD} is not built")
        config = None
        if tcp_port:
            config = f'nbd:\n  tcp: "127.0.0.1:{tcp_port}"\n'
        self.tcp_port = tcp_port
        self.daemon = Daemon(tmp_path / "state", config_text=config).start()
        self.sock = self.daemon.nbd_sock

    def create(self, name, size):
        self.daemon.create_disk(name, size)
        return self.uri(name)

    def create_read_only(self, name, size):
        """A read-only export of `size` zero bytes: a disk restore point of a new disk."""
        self.daemon.create_disk(name, size)
        self.daemon.create_vm(name + "-vm", [name])
        self.daemon.create_collection(name + "-c", name + "-vm")
        self.daemon.create_restore_point(name + "-c", "rp")
        return self.daemon.rp_uri(name + "-c", "rp", name)

    def uri(self, name):
        return self.daemon.nbd_uri(name)

    def alive(self):
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def log(self):
        return self.daemon.log()

    def stop(self):
        return self.daemon.stop()

    def close(self):
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            rc = self.daemon.stop()
            assert rc == 0, "rpointd did not exit 0 on SIGTERM:\n" + self.daemon.log()
        elif self.daemon.proc is not None:
            pytest.fail(f"rpointd died (rc={self.daemon.proc.returncode}):\n{self.daemon.log()}")


class StandaloneTarget:
    """The NBD server alone (nbd_testserver) serving files of a directory."""

    kind = "testserver"

    def __init__(self, tmp_path, tcp_port=None, extra_args=()):
        if not os.path.exists(TESTSERVER):
            pytest.skip(f"{TESTSERVER} is not built")
        self.tcp_port = tcp_port
        if tcp_port:
            extra_args = (*extra_args, "--tcp", f"127.0.0.1:{tcp_port}")
        self.dir = tmp_path / "exports"
        self.dir.mkdir()
        self.sock = str(tmp_path / "nbd.sock")
        self.log_path = str(tmp_path / "testserver.log")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [TESTSERVER, "--dir", str(self.dir), "--unix", self.sock, "--log-level", "debug",
             *extra_args], stdout=log, stderr=log)
        log.close()
        deadline = time.time() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("nbd_testserver did not start:\n" + self.log())
            time.sleep(0.02)

    def create(self, name, size):
        with open(self.dir / name, "wb") as f:
            f.truncate(size)
        return self.uri(name)

    def create_read_only(self, name, size):
        """nbd_testserver serves `*.ro` files read-only."""
        return self.create(name + ".ro", size)

    def uri(self, name):
        return f"nbd+unix:///{name}?socket={self.sock}"

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, timeout=30):
        self.stopped = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("nbd_testserver did not stop on SIGTERM:\n" + self.log())

    def close(self):
        if getattr(self, "stopped", False):
            return
        if self.proc.poll() is None:
            rc = self.stop()
            assert rc == 0, "nbd_testserver did not exit 0 on SIGTERM:\n" + self.log()
        else:
            pytest.fail(f"nbd_testserver died (rc={self.proc.returncode}):\n{self.log()}")


def make_target(tmp_path, tcp=False):
    """The server under test; with tcp=True it also listens on 127.0.0.1 (tcp_uri())."""
    port = free_tcp_port() if tcp else None
    kind = os.environ.get("RPOINTD_NBD_TARGET", "daemon")
    if kind == "testserver":
        t = StandaloneTarget(tmp_path, tcp_port=port)
    else:
        t = DaemonTarget(tmp_path, tcp_port=port)
    if tcp:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    t.close()
                    raise RuntimeError("NBD TCP listener did not come up:\n" + t.log())
                time.sleep(0.05)
    return t


def tcp_uri(target, name):
    return f"nbd://127.0.0.1:{target.tcp_port}/{name}"


class ProtocolError(Exception):
    pass


class RawClient:
    """A deliberately minimal NBD client over a Unix socket."""

    def __init__(self, sock_path, timeout=10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        self.structured = False
        self.size = None
        self.tx_flags = None

    def close(self):
        self.s.close()

    def send(self, data):
        self.s.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ProtocolError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self, timeout=5):
        """True when the server closes the connection (EOF or reset) within timeout."""
        self.s.settimeout(timeout)
        try:
            while True:
                data = self.s.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # --- handshake ---

    def greeting(self, client_flags=3):
        g = self.recv_exact(18)
        magic, opt, flags = struct.unpack(">QQH", g)
        assert magic == NBDMAGIC and opt == IHAVEOPT, g
        assert flags & 1, "server must set FIXED_NEWSTYLE"
        if client_flags is not None:
            self.send(struct.pack(">I", client_flags))
        return flags

    def option(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        return opt, rtype, self.recv_exact(length) if length else b""

    def go(self, name, structured=False, meta=False, opt=OPT_GO):
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            _, rtype, _ = self.opt_reply()
            assert rtype == REP_ACK
            self.structured = True
        if meta:
            q = b"base:allocation"
            n = name.encode()
            self.option(OPT_SET_META_CONTEXT,
                        struct.pack(">I", len(n)) + n + struct.pack(">II", 1, len(q)) + q)
            replies = []
            while True:
                _, rtype, data = self.opt_reply()
                replies.append((rtype, data))
                if rtype != REP_META_CONTEXT:
                    break
            assert replies[-1][0] == REP_ACK, replies
            self.meta_id = struct.unpack(">I", replies[0][1][:4])[0] if len(replies) > 1 else None
        n = name.encode()
        self.option(opt, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        while True:
            _, rtype, data = self.opt_reply()
            if rtype == REP_INFO:
                if struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                    self.size, self.tx_flags = struct.unpack(">QH", data[2:12])
                continue
            return rtype

    def connect(self, name, structured=False, meta=False):
        self.greeting()
        rtype = self.go(name, structured=structured, meta=meta)
        assert rtype == REP_ACK, f"GO failed: {rtype:#x}"
        return self

    # --- transmission ---

    def request(self, cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)

    def reply(self, read_len=None):
        """One reply: (error, cookie, data) for simple replies; structured
        replies are gathered until the DONE chunk: error is that of the first
        error chunk (or 0), data the concatenated OFFSET_DATA payloads, and
        .chunks lists (type, flags, payload)."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_len) if (read_len and err == 0) else b""
            self.chunks = []
            return err, cookie, data
        self.chunks = []
        err = 0
        data = b""
        while True:
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            self.chunks.append((rtype, flags, payload))
            if rtype & 0x8000 and err == 0:
                err = struct.unpack(">I", payload[:4])[0]
            elif rtype == REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            if flags & REPLY_FLAG_DONE:
                return err, cookie, data
            magic = struct.unpack(">I", self.recv_exact(4))[0]


def libnbd_alive(uri, size=None):
    """Connects with libnbd, reads the first sector (and the last if size given)."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(512, 0)
    if size:
        h.pread(512, size - 512)
    h.shutdown()
    return True
