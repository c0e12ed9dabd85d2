"""Fuzzes the control socket of a real daemon: random, truncated and deeply
nested JSON bodies and random HTTP framing (methods, targets, headers, chunked
bodies, truncation, garbage). The daemon must never crash or answer 5xx (but
501 for an unsupported transfer coding, RFC 9112 §6.1), and
must answer a valid request afterwards.

Bounded in time: RPOINTD_FUZZ_SECONDS (default 20). The seed is printed;
RPOINTD_FUZZ_SEED replays a run.
"""
import json
import os
import random
import re
import socket
import time

MiB = 1 << 20

METHODS = [b"GET", b"PUT", b"POST", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE",
           b"CONNECT", b"BREW", b"get", b"G\x00T", b"", b"PUT PUT"]
TARGETS = [b"/", b"/health", b"/disks", b"/disks/f", b"/disks/f?force=true", b"/vms",
           b"/vms/v", b"/restorePointCollections/c", b"/restorePointCollections/c/restorePoints/p",
           b"/operations/x", b"/disks/%zz", b"/disks/%00", b"*", b"http://x/disks",
           b"/disks/f?api-version=1999-01-01", b"/" + b"a" * 5000, b"/disks/\xff",
           b"/disks/f?x=%", b""]
HEADER_NAMES = [b"Host", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Expect",
                b"Connection", b"X-Junk", b"Content-Length ", b" Host", b"Te"]
CODINGS = [b"chunked", b"gzip", b"identity", b"foo", b"chunked, identity", b"gzip, chunked",
           b"CHUNKED", b"chunked;x=1", b""]
KEYS = ["properties", "sizeBytes", "kind", "disks", "configuration", "id", "name", "type",
        "path", "x", "", "\u00e9", "a" * 300]


def rand_json_value(rng, depth):
    r = rng.random()
    if depth > 0 and r < 0.3:
        return {rng.choice(KEYS): rand_json_value(rng, depth - 1)
                for _ in range(rng.randint(0, 4))}
    if depth > 0 and r < 0.5:
        return [rand_json_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return rng.choice([None, True, False, 0, 1, -1, 512, 4096, MiB, 0.5, "x", "/disks/f",
                       {"id": "/disks/f"}, [], {}, "\u0000", "\ud7ff"])


def rand_json_text(rng):
    kind = rng.random()
    if kind < 0.15:  # deep nesting, under and over the limit
        d = rng.choice([10, 60, 62, 63, 64, 65, 100, 1000, 50000, 200000])
        open_, close = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        body = open_ * d + b"1" + close * d
        if rng.random() < 0.2:
            body = body[:rng.randrange(len(body))]
        return (b'{"properties": {"disks": [{"id": "/disks/f"}], "configuration": ' + body
                + b"}}")
    if kind < 0.25:  # numbers and keys the parser must refuse
        return rng.choice([b'{"properties": {"sizeBytes": 1e400}}',
                           b'{"properties": {"sizeBytes": -1e400}}',
                           b'{"properties": {"sizeBytes": 123456789012345678901234567890}}',
                           b'{"properties": {"sizeBytes": 1048576, "sizeBytes": 2}}',
                           b'{"properties": {}, "properties": {}}',
                           b'{"properties": {"sizeBytes": NaN}}',
                           b'{"properties": {"sizeBytes": 1048576}} trailing'])
    text = json.dumps(rand_json_value(rng, rng.randint(0, 8))).encode()
    if rng.random() < 0.3:
        text = b'{"properties": ' + text + b"}"
    r = rng.random()
    if r < 0.2 and text:
        text = text[:rng.randrange(len(text))]  # truncated
    elif r < 0.35 and text:
        i = rng.randrange(len(text))
        text = text[:i] + bytes([rng.randrange(256)]) + text[i + 1:]  # a flipped byte
    elif r < 0.45:
        text = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))  # garbage
    return text


def chunked(rng, body):
    out = b""
    i = 0
    while i < len(body):
        n = rng.randint(1, max(1, len(body) - i))
        size = b"%x" % n
        if rng.random() < 0.05:
            size = rng.choice([b"zz", b"-1", b"ffffffffffffffffff", b"", b"1;ext=1"])
        out += size + b"\r\n" + body[i:i + n] + b"\r\n"
        i += n
    return out + rng.choice([b"0\r\n\r\n", b"0\r\nTrailer: x\r\n\r\n", b"0\r\n", b""])


RESOURCE_TARGETS = [b"/disks/f", b"/disks/g", b"/vms/v", b"/restorePointCollections/c",
                    b"/restorePointCollections/c/restorePoints/p",
                    b"/restorePointCollections/c/restorePoints/p/verify"]


def well_framed(rng):
    """A correct HTTP request whose JSON body is fuzzed: reaches the handlers."""
    body = rand_json_text(rng)
    return (rng.choice([b"PUT", b"PUT", b"PATCH", b"POST"]) + b" " + rng.choice(RESOURCE_TARGETS)
            + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def rand_request(rng):
    r = rng.random()
    if r < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if r < 0.4:
        return well_framed(rng)
    method = rng.choice(METHODS)
    target = rng.choice(TARGETS)
    version = rng.choice([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""])
    body = rand_json_text(rng) if rng.random() < 0.7 else b""
    head = method + b" " + target + b" " + version + b"\r\n"
    headers = [b"Host: x"]
    if rng.random() < 0.6:
        headers.append(b"Content-Type: " + rng.choice([b"application/json", b"text/plain",
                                                       b"application/x-www-form-urlencoded"]))
    framing = rng.random()
    if framing < 0.5:
        n = len(body) if rng.random() < 0.8 else rng.choice([0, len(body) + 5, 2**70, -1])
        headers.append(b"Content-Length: %d" % n)
    elif framing < 0.75:
        headers.append(b"Transfer-Encoding: " + rng.choice(CODINGS))
        if rng.random() < 0.8:
            body = chunked(rng, body)
        if rng.random() < 0.1:
            headers.append(b"Content-Length: %d" % len(body))
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(HEADER_NAMES)
        value = rng.choice([b"x", b"100-continue", b"close", b"keep-alive", b"chunked", b"5",
                            b"a\r\n folded", b"\x00", b"b" * 20000])
        headers.append(name + b": " + value)
    if rng.random() < 0.05:
        headers.append(b"NoColonHere")
    rng.shuffle(headers)
    data = head + b"\r\n".join(headers) + b"\r\n\r\n" + body
    if rng.random() < 0.15:
        data = data[:rng.randrange(len(data) + 1)]  # truncated anywhere
    return data


STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def statuses(out):
    """Status codes of the responses in `out` (bodies skipped by Content-Length)."""
    codes = []
    while out:
        m = STATUS.match(out)
        assert m, f"not an HTTP response: {out[:200]!r}"
        end = out.find(b"\r\n\r\n")
        assert end > 0, f"truncated response header: {out[:200]!r}"
        head = out[:end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        codes.append(int(m.group(1)))
        out = out[end + 4 + length:]
    return codes


def exchange(path, data, timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    out = b""
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees the end, no waiting out timeouts
        except OSError:
            pass  # closed early (413, 400): what it answered is still readable
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def test_fuzz_control_socket(daemon):
    seed = int(os.environ.get("RPOINTD_FUZZ_SEED", random.randrange(1 << 32)))
    seconds = float(os.environ.get("RPOINTD_FUZZ_SECONDS", "20"))
    print(f"fuzz seed {seed} ({seconds}s); replay with RPOINTD_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    assert daemon.api("PUT", "/disks/f", {"properties": {"sizeBytes": MiB}}).status == 201
    deadline = time.monotonic() + seconds
    cases = answered = 0
    seen = {}
    while time.monotonic() < deadline:
        # Sometimes several requests on one connection (pipelined).
        data = b"".join(rand_request(rng) for _ in range(rng.choice([1, 1, 1, 2, 3])))
        out = exchange(daemon.control_sock, data)
        cases += 1
        assert daemon.proc.poll() is None, (
            f"rpointd died on case {cases} (seed {seed}): {data[:300]!r}\n{daemon.log()}")
        codes = statuses(out)
        for c in codes:
            seen[c] = seen.get(c, 0) + 1
            assert c < 500 or c == 501, (  # 501: an unsupported transfer coding
                f"{c} for case {cases} (seed {seed}): {data[:300]!r} -> {out[:500]!r}")
        answered += bool(codes)
        if cases % 50 == 0:
            assert daemon.api("GET", "/health", timeout=5).status == 200
    print(f"{cases} cases, {answered} answered; statuses {sorted(seen.items())}")
    assert cases > 50
    r = daemon.api("GET", "/health")
    assert r.status == 200
    assert daemon.api("PUT", "/disks/after", {"properties": {"sizeBytes": MiB}}).status == 201
