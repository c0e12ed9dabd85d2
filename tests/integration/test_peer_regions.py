"""Regions on other hosts: two daemons in two network namespaces joined by a veth pair.

Host A (10.77.0.1) has its own region `local` and a region `far` kept by host B
(10.77.0.2, peer_region local). Both have an NBD TCP listener with TLS and the
peer API (peers.listen, HTTPS with mutual TLS) on their namespace address; the
PKI (one CA, a server and a client certificate per host, and an intruder with
another CA's) is made with certtool as test_nbd_tls.py does.

A collection in `far` is created through A's API and appears in B's own API. A
point copied there moves its chunks over NBD-TLS (libnbd on B reads A's
short-lived export): the bytes on the veth are measured on the first (full)
copy and on the next one after a 1 MiB change. B restores the copied points
with A gone, byte-identical to the disk at each cut. The link is cut
(`ip link set down`) mid-copy and restored; each side is killed (-9) mid-copy
and restarted, and the copy resumes (only what B still lacks crosses the wire
again) to Succeeded; B stopped for seconds and back; the source of a running
copy cannot be deleted (409), and A restarted without its source's region fails
clearly, on B too within seconds (A sends an abort); a running copy deleted on
either host is canceled on both (B keeps no point, no pull, no store point),
at once even while B's reads wait out a retry backoff of A gone; a client or a peer without a certificate our CA signed is
refused. Root is needed (ip netns); under CI=true its absence fails.

Incremental copies from a base (VM `vmb`, disk `big`: 2048 data slots of one
pattern): a copy after a one-chunk change posts a pull that names the base and
lists that slot only (its size, the slots listed and the peer's lookups are in
the operation's output), B checks the list against the grant's
rpoint:changed context and restores byte-identical; B's base deleted: A sends
full lists; A's base deleted before B asked for the context: the copy fails
(CopyBaseUnavailable) and a new copy succeeds.
"""
import hashlib
import json
import os
import random
import shutil
import ssl
import subprocess
import time

import pytest

import tls_pki
from conftest import require, strict
from rpointd_harness import Daemon, nbd_write, operation_path

MiB = 1 << 20
DISK = 16 * MiB
A_IP, B_IP = "10.77.0.1", "10.77.0.2"


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def make_cert(ca, d, role, cn, extra=""):
    """tls_pki's certificate, in a tls.dir of its own that also holds the CA."""
    d.mkdir(parents=True, exist_ok=True)
    tls_pki.make_cert(ca, d, role, cn, extra)
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")


class NsDaemon(Daemon):
    """rpointd inside a network namespace (ip netns exec execs it: same pid)."""

    def __init__(self, ns, *a, **kw):
        super().__init__(*a, **kw)
        self.ns = ns

    def args(self):
        return ["ip", "netns", "exec", self.ns] + super().args()

    def arm(self, rules):
        self.arm_faults(rules)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    if os.geteuid() != 0:
        if strict():
            pytest.fail("test_peer_regions needs root (ip netns) and CI=true forbids a skip")
        pytest.skip("needs root for ip netns")
    require("ip", "certtool", "nbdcopy", "curl")
    pytest.importorskip("nbd")
    root = tmp_path_factory.mktemp("peers")
    tag = str(os.getpid() % 100000)
    ns_a, ns_b = f"rpA{tag}", f"rpB{tag}"
    if_a, if_b = f"vpa{tag}", f"vpb{tag}"
    made = []
    daemons = []
    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b)
        sh("ip", "link", "set", if_a, "netns", ns_a)
        sh("ip", "link", "set", if_b, "netns", ns_b)
        for ns, ifname, ip in ((ns_a, if_a, A_IP), (ns_b, if_b, B_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")

        ca = root / "ca"
        tls_pki.make_ca(ca, "rpointd peers test CA")
        pki = {}
        for host, ip in (("a", A_IP), ("b", B_IP)):
            d = root / f"pki-{host}"
            make_cert(ca, d, "server", f"host-{host}", f'ip_address = "{ip}"\n')
            make_cert(ca, d, "client", f"host-{host}")
            pki[host] = d
        other = root / "other-ca"
        tls_pki.make_ca(other, "some other CA")
        intruder = root / "intruder"
        make_cert(other, intruder, "client", "intruder")
        make_cert(other, intruder, "server", "intruder", f'ip_address = "{B_IP}"\n')
        shutil.copy(ca / "ca-cert.pem", intruder / "ca-cert.pem")  # trusts our CA

        def cfg(ip, d, regions):
            return (f'nbd:\n  tcp: "{ip}:10809"\ntls:\n  dir: {d}\n'
                    f'peers:\n  listen: "{ip}:10443"\naccess:\n  host: {ip}\n'
                    f"regions:\n{regions}")

        a = NsDaemon(ns_a, root / "A", config_text=cfg(
            A_IP, pki["a"],
            f"  - {{name: local, path: {root}/A-local, default: true}}\n"
            f'  - {{name: far, peer: "{B_IP}:10443", peer_region: local}}\n'
            f'  - {{name: bogus, peer: "{B_IP}:10444"}}\n'),
            env={"RPOINTD_FAULTS_FILE": str(root / "faults-a")})
        b = NsDaemon(ns_b, root / "B", config_text=cfg(
            B_IP, pki["b"], f"  - {{name: local, path: {root}/B-local, default: true}}\n"),
            env={"RPOINTD_FAULTS_FILE": str(root / "faults-b")})
        os.makedirs(root / "A", exist_ok=True)
        os.makedirs(root / "B", exist_ok=True)
        for f in ("faults-a", "faults-b"):
            (root / f).write_text("\n")
        b.start()
        daemons.append(b)
        a.start()
        daemons.append(a)
        a.create_disk("a", DISK)
        rnd = random.Random(7)
        data = bytearray(rnd.randbytes(DISK))
        nbd_write(a.nbd_uri("a"), [(off, bytes(data[off:off + 4 * MiB]))
                                   for off in range(0, DISK, 4 * MiB)])
        a.create_vm("vm", ["a"])
        a.create_collection("c", "vm", location="local")
        yield {"a": a, "b": b, "data": data, "ns_a": ns_a, "ns_b": ns_b, "if_a": if_a,
               "pki": pki, "intruder": intruder, "root": root, "rnd": rnd}
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def wire_bytes(rig):
    """Bytes A's end of the veth sent and received."""
    total = 0
    for what in ("tx_bytes", "rx_bytes"):
        r = sh("ip", "netns", "exec", rig["ns_a"], "cat",
               f"/sys/class/net/{rig['if_a']}/statistics/{what}")
        total += int(r.stdout)
    return total


def point_id(c, rp):
    return f"/restorePointCollections/{c}/restorePoints/{rp}"


def start_copy(d, dst, name, src):
    r = d.api("PUT", point_id(dst, name),
              {"properties": {"sourceRestorePoint": {"id": point_id(*src)}}})
    assert r.status == 201, r
    return operation_path(r)


def sha_of_restore(d, c, rp, disk_name):
    """Restores c/rp's disk `a` on d as a new disk and hashes its bytes."""
    d.restore_disk(disk_name, c, rp, "a")
    import nbd
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri(disk_name))
    s = hashlib.sha256()
    for off in range(0, DISK, 4 * MiB):
        s.update(h.pread(4 * MiB, off))
    h.shutdown()
    return s.hexdigest()


def cut_point(rig, name, change_at=None):
    """A point of A's disk, after writing 1 MiB of new data at change_at; returns
    the sha256 of what the disk held at its cut."""
    a, data = rig["a"], rig["data"]
    if change_at is not None:
        new = rig["rnd"].randbytes(MiB)
        data[change_at:change_at + MiB] = new
        nbd_write(a.nbd_uri("a"), [(change_at, new)])
    a.create_restore_point("c", name)
    return hashlib.sha256(bytes(data)).hexdigest()


def wait_progress(d, c, rp, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = d.get_restore_point(c, rp, expand="instanceView")
        iv = p["properties"].get("instanceView", {})
        pcts = [x.get("replicationStatus", {}).get("completionPercent", 0)
                for x in iv.get("diskRestorePoints", [])]
        if pcts and max(pcts) > 0:
            return max(pcts)
        time.sleep(0.05)
    raise AssertionError(f"no progress on {c}/{rp}: {p}")


def test_far_collection_copy_incremental_and_restore_on_peer(rig):
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    # The peer's own API lists it, in its region `local`.
    r = b.api("GET", "/restorePointCollections/cf")
    assert r.status == 200, r
    assert r.json["location"] == "local", r.json
    # Points in a far region are made by copy.
    r = a.start_restore_point("cf", "direct")
    assert r.status == 400, r
    assert "made by copy" in r.json["error"]["message"], r.json

    sha1 = cut_point(rig, "rp1")
    before = wire_bytes(rig)
    op = a.wait_operation(start_copy(a, "cf", "rp1", ("c", "rp1")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    full = wire_bytes(rig) - before
    assert DISK <= full <= DISK * 1.10, f"full copy moved {full} bytes on the wire"

    sha2 = cut_point(rig, "rp2", change_at=5 * MiB + 12345)
    before = wire_bytes(rig)
    op = a.wait_operation(start_copy(a, "cf", "rp2", ("c", "rp2")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    incr = wire_bytes(rig) - before
    # 1 MiB unaligned touches 17 chunks of 64 KiB: ~1.06 MiB of data, plus the
    # chunk list (256 digests), TLS and the polls.
    print(f"wire bytes: full copy {full}, incremental {incr} (disk {DISK})")
    assert MiB <= incr <= 1.5 * MiB, f"incremental copy moved {incr} bytes on the wire"
    rp = a.get_restore_point("cf", "rp2", expand="instanceView")
    assert rp["properties"]["provisioningState"] == "Succeeded"
    assert rp["properties"]["sourceRestorePoint"]["id"] == point_id("c", "rp2")
    # Its data is on B: A refuses to verify or restore it, naming the peer.
    r = a.api("POST", point_id("cf", "rp2") + "/verify")
    assert r.status == 409 and B_IP in r.json["error"]["message"], r

    # B alone: its own API lists the points and restores them exactly.
    a.stop()
    try:
        r = b.api("GET", "/restorePointCollections/cf/restorePoints")
        assert r.status == 200, r
        names = sorted(p["name"] for p in r.json["value"])
        assert names == ["rp1", "rp2"], r.json
        assert sha_of_restore(b, "cf", "rp1", "r1") == sha1
        assert sha_of_restore(b, "cf", "rp2", "r2") == sha2
    finally:
        a.start()


def test_link_cut_mid_copy_retries_and_completes(rig):
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    sha = cut_point(rig, "cut1", change_at=0)
    # B holds all but the ~17 chunks the change touched: slow each one read.
    b.arm("peer.chunk=delay300")
    try:
        op = start_copy(a, "cf", "cut1", ("c", "cut1"))
        wait_progress(a, "cf", "cut1")
        la, lb = len(a.log_all()), len(b.log_all())
        sh("ip", "-n", rig["ns_a"], "link", "set", rig["if_a"], "down")
        # Down for at least 3 s, and until a side has seen the cut: a poll or
        # read in flight when the link went down just stalls (TCP retransmits)
        # until its own timeout, so a fixed outage could pass unnoticed.
        t0 = time.monotonic()
        while (time.monotonic() - t0 < 3 or
               "retrying" not in a.log_all()[la:] + b.log_all()[lb:]):
            assert time.monotonic() - t0 < 40, "no side noticed the cut"
            time.sleep(0.2)
        sh("ip", "-n", rig["ns_a"], "link", "set", rig["if_a"], "up")
        b.arm("")
        done = a.wait_operation(op, timeout=90)
    finally:
        sh("ip", "-n", rig["ns_a"], "link", "set", rig["if_a"], "up")
        b.arm("")
    assert done["status"] == "Succeeded", (done, a.log(), b.log())
    assert "retrying" in a.log_all() + b.log_all()
    assert sha_of_restore(b, "cf", "cut1", "rcut1") == sha


def fresh_point(rig, name):
    """A point of A's disk after writing all of it anew (random bytes B holds
    none of: every one of its 256 chunks must cross); returns the sha256 of
    what the disk held at its cut."""
    a, data = rig["a"], rig["data"]
    new = rig["rnd"].randbytes(DISK)
    data[:] = new
    nbd_write(a.nbd_uri("a"), [(off, new[off:off + 4 * MiB]) for off in range(0, DISK, 4 * MiB)])
    a.create_restore_point("c", name)
    return hashlib.sha256(new).hexdigest()


CHUNKS = DISK // (64 << 10)


def wait_received(b, c, rp, at_least, timeout=60):
    """Until B's record of c/rp shows at_least blocks copied; returns them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = b.api("GET", point_id(c, rp) + "?$expand=instanceView")
        if r.status == 200:
            iv = r.json["properties"].get("instanceView", {})
            done = sum(x.get("replicationStatus", {}).get("blocksCopied", 0)
                       for x in iv.get("diskRestorePoints", []))
            if not done:  # the percentage when no block counts are shown
                pct = [x.get("replicationStatus", {}).get("completionPercent", 0)
                       for x in iv.get("diskRestorePoints", [])]
                done = (max(pct) if pct else 0) * CHUNKS // 100
            if done >= at_least:
                return done
        time.sleep(0.05)
    raise AssertionError(f"B did not reach {at_least} blocks of {c}/{rp}: {b.log()}")


def received_result(b, c, rp):
    """The result B's job logged when it recorded c/rp copied (the last one)."""
    marker = f"restore point {c}/{rp}: copied from "
    lines = [ln for ln in b.log_all().splitlines() if marker in ln]
    assert lines, b.log()
    return json.loads(lines[-1].split(marker, 1)[1].split(": ", 1)[1])


def interrupted_copy(rig, name, received, interrupt):
    """Copies a fresh point `name` of A to far collection cf with B's reads
    slowed (peer.chunk=delay40); once B holds `received` chunks, calls
    interrupt(got), lifts the delay and waits: the copy must end Succeeded and
    byte-identical. Returns (final operation, wire bytes before the copy,
    what interrupt returned)."""
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    sha = fresh_point(rig, name)
    b.arm("peer.chunk=delay40")
    try:
        before = wire_bytes(rig)
        op = start_copy(a, "cf", name, ("c", name))
        got = wait_received(b, "cf", name, received)
        mid = interrupt(got)
        b.arm("")
        done = a.wait_operation(op, timeout=120)
    finally:
        b.arm("")
    assert done["status"] == "Succeeded", (done, a.log(), b.log())
    assert sha_of_restore(b, "cf", name, "r" + name) == sha
    return done, before, mid


def test_sender_killed_mid_copy_resumes_and_sends_only_the_rest(rig):
    """kill -9 of A mid-copy: its restart resumes the copy (shares the point
    again under new tokens, posts it again: B takes the new uris and goes on),
    Succeeded, byte-identical, and what crossed the wire after the restart is
    only what B still lacked."""
    a, b = rig["a"], rig["b"]

    def kill_sender(got):
        a.kill9()
        mid = wire_bytes(rig)
        a.start()
        return mid

    _, before, mid = interrupted_copy(rig, "k1", CHUNKS // 3, kill_sender)
    assert "resuming" in a.log_all()
    after = wire_bytes(rig)
    first, second = mid - before, after - mid
    print(f"sender kill: {first} bytes on the wire before, {second} after (disk {DISK})")
    assert first + second <= 1.15 * DISK, (first, second)
    assert second <= DISK * 0.8, (first, second)
    assert b.get_restore_point("cf", "k1")["properties"]["provisioningState"] == "Succeeded"
    res = received_result(b, "cf", "k1")
    assert res["chunksMoved"] + res["chunksReused"] == CHUNKS, res


def test_sender_killed_twice_quickly_still_resumes(rig):
    """Two restarts in a row (the first resumption killed as it starts): one
    copy, Succeeded, byte-identical."""
    a = rig["a"]

    def kill_sender_twice(got):
        for _ in range(2):
            a.kill9()
            a.start()

    interrupted_copy(rig, "k1b", CHUNKS // 4, kill_sender_twice)


def test_peer_killed_mid_copy_resumes_from_its_checkpoints(rig):
    """kill -9 of B mid-copy: B's restart resumes its half from its pull and
    checkpoints (the chunks it checkpointed are named, not read again), A
    keeps polling through the outage; Succeeded, byte-identical."""
    a, b = rig["a"], rig["b"]

    def kill_peer(got):
        time.sleep(1.2)  # past a checkpoint (every second)
        b.kill9()
        mid = wire_bytes(rig)
        b.arm("")
        b.start()
        return got, mid

    _, before, (got, mid) = interrupted_copy(rig, "k2", CHUNKS // 3, kill_peer)
    assert "resuming" in b.log_all()
    after = wire_bytes(rig)
    first, second = mid - before, after - mid
    res = received_result(b, "cf", "k2")
    print(f"peer kill: {got}+ chunks before, resumed run moved {res['chunksMoved']} and "
          f"reused {res['chunksReused']}; wire {first} before, {second} after")
    assert res["chunksMoved"] + res["chunksReused"] == CHUNKS, res
    assert res["chunksReused"] >= got, res
    assert res["chunksMoved"] <= CHUNKS - got, res
    assert first + second <= 1.15 * DISK, (first, second)
    p = a.get_restore_point("cf", "k2")
    assert p["properties"]["provisioningState"] == "Succeeded", p


def test_peer_down_for_seconds_then_back(rig):
    """B stopped (SIGTERM) for 4 s mid-copy: its half stays Creating, A retries
    with backoff; B back: Succeeded, byte-identical."""
    a, b = rig["a"], rig["b"]

    def peer_down(got):
        b.stop()
        time.sleep(4)
        b.arm("")
        b.start()

    interrupted_copy(rig, "k3", CHUNKS // 3, peer_down)
    assert "retrying" in a.log_all()


def test_source_unreadable_then_sender_restarted_fails_clearly(rig):
    """The source point of a running copy cannot be deleted (409 naming the
    copy). A killed, and restarted with its region `local` gone: the restart
    cannot resume the copy and says why; never Succeeded on A. A new copy of
    another point still works (the region back)."""
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    fresh_point(rig, "k4")
    gc_orphans(b)
    b.arm("peer.chunk=delay40")
    local = rig["root"] / "A-local"
    try:
        op = start_copy(a, "cf", "k4", ("c", "k4"))
        wait_received(b, "cf", "k4", CHUNKS // 4)
        r = a.api("DELETE", point_id("c", "k4"))
        assert r.status == 409, r
        assert "source of a copy in progress" in r.json["error"]["message"], r
        assert point_id("cf", "k4") in r.json["error"]["message"], r
        a.kill9()
        os.rename(local, str(local) + ".away")
        a.start()
    finally:
        b.arm("")
    try:
        t0 = time.monotonic()
        done = a.wait_operation(op, timeout=30)
        assert done["status"] == "Failed", done
        p = a.get_restore_point("cf", "k4")["properties"]
        assert p["provisioningState"] == "Failed", p
        msg = json.dumps(done)
        assert "cannot resume" in msg and "unavailable" in msg, msg
        # A tells B at once (an abort on the peer API): B's half fails within
        # seconds, not after peers.deadline_seconds (120 s), saying why.
        bp = wait_point_ended(b, "cf", "k4", timeout=20)
        print(f"B's half ended {time.monotonic() - t0:.1f} s after A's restart")
        assert bp["provisioningState"] == "Failed", bp
        assert "sending host ended the copy" in bp["error"]["message"], bp
        assert "unavailable" in bp["error"]["message"], bp
        assert_receive_released(rig, "cf", "k4")
    finally:
        if not local.exists():
            assert a.stop() == 0, a.log()
            os.rename(str(local) + ".away", local)
            a.start()
    sha = cut_point(rig, "k4b", change_at=3 * MiB)
    done = a.wait_operation(start_copy(a, "cf", "k4b", ("c", "k4b")), timeout=60)
    assert done["status"] == "Succeeded", (done, a.log(), b.log())
    assert sha_of_restore(b, "cf", "k4b", "rk4b") == sha


def wait_point_ended(d, c, rp, timeout):
    """d's record of c/rp once it is no longer Creating (None: deleted)."""
    deadline = time.monotonic() + timeout
    while True:
        r = d.api("GET", point_id(c, rp))
        if r.status == 404:
            return None
        assert r.status == 200, r
        p = r.json["properties"]
        if p["provisioningState"] != "Creating":
            return p
        assert time.monotonic() < deadline, (f"{c}/{rp} still Creating after {timeout} s", p,
                                             d.log()[-3000:])
        time.sleep(0.1)


def operation_of(d, c, rp):
    """The newest operation d holds for point c/rp."""
    r = d.api("GET", "/operations")
    assert r.status == 200, r
    ops = [o for o in r.json["value"] if o["properties"]["resourceId"] == point_id(c, rp)]
    assert ops, r.json
    return ops[0]


def gc_orphans(d):
    """A GC of d's region `local` that first deletes store points no restore
    point names; its answer."""
    r = d.api("POST", "/regions/local/gc?orphans=true")
    assert r.status == 200, (r, d.log()[-3000:])
    return r.json


def assert_receive_released(rig, c, rp):
    """B keeps nothing of an ended receive of c/rp: its pull file is gone, its
    region's GC runs (no hold, no point being created) and finds no store
    point left unnamed (gc_orphans before the copy cleared older ones)."""
    b = rig["b"]
    pull = os.path.join(b.state_dir, "staging", "peer-pulls", c, rp + ".pull")
    assert not os.path.exists(pull), pull
    res = gc_orphans(b)
    assert res["storePointsDeleted"] == 0, res


def canceled_copy(rig, name, cancel_on):
    """A fresh point `name` copied to far collection cf with B's reads slowed;
    once B holds a quarter of it, the point is deleted on host `cancel_on`
    (a or b). The delete answers 204 within seconds, B keeps nothing, and A's
    operation ends Failed (Canceled). Returns A's operation."""
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    fresh_point(rig, name)
    gc_orphans(b)
    b.arm("peer.chunk=delay40")
    try:
        op = start_copy(a, "cf", name, ("c", name))
        wait_received(b, "cf", name, CHUNKS // 4)
        t0 = time.monotonic()
        r = rig[cancel_on].api("DELETE", point_id("cf", name))
        took = time.monotonic() - t0
    finally:
        b.arm("")
    print(f"delete on {cancel_on} of a running copy answered in {took:.2f} s")
    assert r.status == 204, (r, a.log()[-3000:], b.log()[-3000:])
    assert took < 20, took
    assert rig[cancel_on].api("GET", point_id("cf", name)).status == 404
    done = a.wait_operation(op, timeout=30)
    assert done["status"] == "Failed", done
    assert done["error"]["code"] == "Canceled", done
    # B: no point (never a half one Succeeded), its operation Canceled.
    assert wait_point_ended(b, "cf", name, timeout=20) is None
    bop = operation_of(b, "cf", name)
    assert bop["status"] == "Failed" and bop["error"]["code"] == "Canceled", bop
    assert_receive_released(rig, "cf", name)
    return done


def test_deleting_a_running_copy_on_the_sender_cancels_it_on_both_hosts(rig):
    """DELETE of the far point on A mid-copy: A stops, tells B (abort), B
    discards what it received and deletes its point; A's record is gone, its
    operation Failed (Canceled). The same copy again succeeds, byte-identical."""
    a, b = rig["a"], rig["b"]
    done = canceled_copy(rig, "x1", "a")
    assert "deleted on the sending host" in done["error"]["message"], done
    sha = cut_point(rig, "x1b", change_at=7 * MiB)
    op = a.wait_operation(start_copy(a, "cf", "x1", ("c", "x1b")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    assert sha_of_restore(b, "cf", "x1", "rx1") == sha


def test_deleting_a_running_copy_on_the_receiver_cancels_it_on_both_hosts(rig):
    """DELETE of the point on B (the keeping host) mid-copy: B stops and
    deletes it; A's next poll finds it gone there: A's copy ends Failed
    (Canceled, naming B), and its record can be deleted."""
    a = rig["a"]
    done = canceled_copy(rig, "x2", "b")
    assert B_IP in done["error"]["message"], done
    p = a.get_restore_point("cf", "x2")["properties"]
    assert p["provisioningState"] == "Failed", p
    assert a.api("DELETE", point_id("cf", "x2")).status == 204


def test_deleting_a_copy_whose_reads_wait_to_retry_returns_at_once(rig):
    """A killed mid-copy: B's NBD reads fail and retry, the backoff doubling to
    5 s. Once B waits 5 s before its next try, a DELETE of the point on B
    answers 204 at once: the cancel wakes the wait instead of waiting it out."""
    a, b = rig["a"], rig["b"]
    a.create_collection("cf", "vm", location="far")
    fresh_point(rig, "w1")
    gc_orphans(b)
    b.arm("peer.chunk=delay40")
    try:
        op = start_copy(a, "cf", "w1", ("c", "w1"))
        wait_received(b, "cf", "w1", CHUNKS // 4)
        lb = len(b.log_all())
        a.kill9()
        b.arm("")
        t0 = time.monotonic()
        while "retrying in 5000 ms" not in b.log_all()[lb:]:
            assert time.monotonic() - t0 < 40, b.log()[-3000:]
            time.sleep(0.02)
        t1 = time.monotonic()
        r = b.api("DELETE", point_id("cf", "w1"))
        took = time.monotonic() - t1
        print(f"delete on B of a copy waiting to retry answered in {took:.2f} s")
        assert r.status == 204, (r, b.log()[-3000:])
        assert took < 2, took
        assert b.api("GET", point_id("cf", "w1")).status == 404
        bop = operation_of(b, "cf", "w1")
        assert bop["status"] == "Failed" and bop["error"]["code"] == "Canceled", bop
    finally:
        b.arm("")
        if a.proc is None or a.proc.poll() is not None:
            a.start()
    # A resumes its half (and may post it again): end it on both hosts, so
    # that nothing of it is left.
    a.wait_operation(op, timeout=60)
    assert a.api("DELETE", point_id("cf", "w1")).status in (204, 404)
    assert b.api("DELETE", point_id("cf", "w1")).status in (204, 404)


def curl_peer(rig, *cert_args):
    return sh("ip", "netns", "exec", rig["ns_a"], "curl", "-sS", "--max-time", "10",
              "--cacert", str(rig["pki"]["a"] / "ca-cert.pem"), *cert_args,
              f"https://{B_IP}:10443/peer/v1", check=False)


def test_peer_api_refuses_clients_without_our_certificate(rig):
    good = rig["pki"]["a"]
    r = curl_peer(rig, "--cert", str(good / "client-cert.pem"), "--key",
                  str(good / "client-key.pem"))
    assert r.returncode == 0 and json.loads(r.stdout)["service"] == "rpointd-peer", r
    r = curl_peer(rig)
    assert r.returncode != 0 and "rpointd-peer" not in r.stdout, r
    bad = rig["intruder"]
    r = curl_peer(rig, "--cert", str(bad / "client-cert.pem"), "--key",
                  str(bad / "client-key.pem"))
    assert r.returncode != 0 and "rpointd-peer" not in r.stdout, r
    assert "refused" in rig["b"].log_all()


def test_peer_with_a_certificate_we_did_not_sign_is_refused(rig):
    """Region `bogus` names a TLS server on B whose certificate another CA signed."""
    a, bad = rig["a"], rig["intruder"]
    script = ("import socket,ssl\n"
              "c=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
              f"c.load_cert_chain('{bad}/server-cert.pem','{bad}/server-key.pem')\n"
              f"s=socket.create_server(('{B_IP}',10444))\n"
              "print('ready',flush=True)\n"
              "while True:\n"
              "  n,_=s.accept()\n"
              "  try:\n"
              "    t=c.wrap_socket(n,server_side=True); t.recv(10000)\n"
              "    t.sendall(b'HTTP/1.1 201 Created\\r\\nContent-Length: 2\\r\\n\\r\\n{}')\n"
              "  except Exception: pass\n"
              "  n.close()\n")
    srv = subprocess.Popen(["ip", "netns", "exec", rig["ns_b"], "/usr/bin/python3", "-c", script],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        r = a.api("PUT", "/restorePointCollections/cb",
                  {"location": "bogus", "properties": {"source": {"id": "/vms/vm"}}})
        assert r.status >= 400, r
        assert "TLS handshake" in r.json["error"]["message"], r.json
        assert a.api("GET", "/restorePointCollections/cb").status == 404
    finally:
        srv.kill()
        srv.wait()


# ---- incremental copies from a base (the rpoint:changed context) ----

BIG = 128 * MiB
CHUNK = 64 * 1024
SLOTS = BIG // CHUNK


def sha_of_disk(d, disk_name, size):
    import nbd
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri(disk_name))
    s = hashlib.sha256()
    for off in range(0, size, 4 * MiB):
        s.update(h.pread(min(4 * MiB, size - off), off))
    h.shutdown()
    return s.hexdigest()


@pytest.fixture(scope="module")
def big(rig):
    """Disk `big` (2048 slots of 64 KiB) of VM `vmb`, every slot data: one
    pattern everywhere (the peer gets it once, so the full copies are cheap on
    the wire, while a list of every slot's digest is ~150 KB)."""
    a, b = rig["a"], rig["b"]
    a.create_disk("big", BIG)
    a.create_vm("vmb", ["big"])
    a.create_collection("cb", "vmb", location="local")
    a.create_collection("cbf", "vmb", location="far")
    pattern = rig["rnd"].randbytes(CHUNK)
    data = bytearray(BIG)
    data[0:CHUNK] = pattern
    nbd_write(a.nbd_uri("big"), [(0, pattern)])
    a.create_restore_point("cb", "bp0")
    op = a.wait_operation(start_copy(a, "cbf", "bp0", ("cb", "bp0")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    block = pattern * (4 * MiB // CHUNK)
    nbd_write(a.nbd_uri("big"), [(off, block) for off in range(0, BIG, 4 * MiB)])
    data[:] = block * (BIG // (4 * MiB))
    a.create_restore_point("cb", "bp1")
    op = a.wait_operation(start_copy(a, "cbf", "bp1", ("cb", "bp1")), timeout=120)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    return {"data": data, "n": 1}


def change_big(rig, big, name, slot):
    """One new 64 KiB chunk at `slot`, then point cb/name; sha256 at its cut."""
    new = rig["rnd"].randbytes(CHUNK)
    big["data"][slot * CHUNK:(slot + 1) * CHUNK] = new
    nbd_write(rig["a"].nbd_uri("big"), [(slot * CHUNK, new)])
    rig["a"].create_restore_point("cb", name)
    return hashlib.sha256(bytes(big["data"])).hexdigest()


def restored_sha(d, c, rp, disk_name):
    d.restore_disk(disk_name, c, rp, "big")
    return sha_of_disk(d, disk_name, BIG)


def test_incremental_copy_sends_only_the_change(rig, big):
    a, b = rig["a"], rig["b"]
    sha = change_big(rig, big, "bp2", 1000)
    before = wire_bytes(rig)
    op = a.wait_operation(start_copy(a, "cbf", "bp2", ("cb", "bp2")), timeout=60)
    wire = wire_bytes(rig) - before
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    res = op["properties"].get("output", {})
    print(f"incremental copy of 1 chunk of {SLOTS}: {wire} bytes on the wire, result {res}")
    # The pull message names the base and lists the one changed slot (a full
    # list: 2048 digests, ~150 KB), and the peer looks that one up.
    assert res.get("base") == "bp1", res
    assert res.get("chunksListed") == 1, res
    assert res.get("pullBytes", 1 << 30) < 4096, res
    assert res.get("chunksLookedUp", 1 << 30) <= 1, res
    assert res.get("bytesMoved") == CHUNK, res
    # On the wire: the chunk, TLS handshakes and polls; not a list of the disk.
    assert CHUNK <= wire <= CHUNK + 96 * 1024, f"{wire} bytes on the wire"
    # B's copy starts from its bp1 (the slots the context did not mark) and
    # restores exactly.
    assert restored_sha(b, "cbf", "bp2", "rbp2") == sha


def test_incremental_copy_falls_back_when_the_base_is_gone_on_the_peer(rig, big):
    a, b = rig["a"], rig["b"]
    # B's copy of bp2 goes; A still records it Succeeded, so A offers it as base.
    b.delete_restore_point("cbf", "bp2")
    sha = change_big(rig, big, "bp3", 7)
    op = a.wait_operation(start_copy(a, "cbf", "bp3", ("cb", "bp3")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    res = op["properties"].get("output", {})
    assert "baseRefused" in res and "bp2" in res["baseRefused"], res
    assert "base" not in res and res["chunksListed"] == SLOTS, res
    assert "sending full lists" in a.log_all()
    assert restored_sha(b, "cbf", "bp3", "rbp3") == sha


def test_base_deleted_on_the_sender_mid_copy_fails_loudly(rig, big):
    a, b = rig["a"], rig["b"]
    sha = change_big(rig, big, "bp4", 33)
    # B waits before it asks for rpoint:changed:cb/bp3; A deletes bp3 meanwhile.
    b.arm("peer.changed=delay3000")
    try:
        op = start_copy(a, "cbf", "bp4", ("cb", "bp4"))
        time.sleep(0.5)
        a.delete_restore_point("cb", "bp3")
        done = a.wait_operation(op, timeout=60)
    finally:
        b.arm("")
    assert done["status"] == "Failed", done
    assert "CopyBaseUnavailable" in json.dumps(done), done
    st = b.get_restore_point("cbf", "bp4")["properties"]["provisioningState"]
    assert st == "Failed", st
    # Copied again: bp3's source is gone, bp2 is gone on B: full lists.
    done = a.wait_operation(start_copy(a, "cbf", "bp4b", ("cb", "bp4")), timeout=60)
    assert done["status"] == "Succeeded", (done, a.log(), b.log())
    assert restored_sha(b, "cbf", "bp4b", "rbp4b") == sha



def test_a_point_made_again_under_a_base_name_is_not_a_base(rig, big):
    """cbf/bp4b, the newest far point, is a copy of cb/bp4. cb/bp4 is deleted and
    cut again after a change: the diff against the new cb/bp4 would miss that
    change on B's copy of the old one."""
    a, b = rig["a"], rig["b"]
    a.delete_restore_point("cb", "bp4")
    change_big(rig, big, "bp4", 50)
    sha = change_big(rig, big, "bp6", 51)
    op = a.wait_operation(start_copy(a, "cbf", "bp6", ("cb", "bp6")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    res = op["properties"].get("output", {})
    assert res.get("base") != "bp4b", res
    assert restored_sha(b, "cbf", "bp6", "rbp6") == sha

# ---- the peer listener's TLS credentials reload on SIGHUP ----

def peer_cert_seen(rig):
    """DER (hex) of the certificate B's peer API presents to a fresh handshake from A."""
    good = rig["pki"]["a"]
    script = ("import socket,ssl\n"
              f"c=ssl.create_default_context(cafile='{good}/ca-cert.pem')\n"
              f"c.load_cert_chain('{good}/client-cert.pem','{good}/client-key.pem')\n"
              f"s=c.wrap_socket(socket.create_connection(('{B_IP}',10443),timeout=10),"
              f"server_hostname='{B_IP}')\n"
              "print(s.getpeercert(binary_form=True).hex())\n")
    r = sh("ip", "netns", "exec", rig["ns_a"], "/usr/bin/python3", "-c", script)
    return bytes.fromhex(r.stdout.strip())


def test_sighup_reloads_the_peer_api_certificate(rig):
    a, b, pki_b = rig["a"], rig["b"], rig["pki"]["b"]
    old = peer_cert_seen(rig)
    assert old == ssl.PEM_cert_to_DER_cert((pki_b / "server-cert.pem").read_text())
    # A new server certificate (same CA, new key) in B's tls.dir, then SIGHUP.
    tls_pki.make_cert(rig["root"] / "ca", pki_b, "server", "host-b-renewed",
                      f'ip_address = "{B_IP}"\n')
    new = ssl.PEM_cert_to_DER_cert((pki_b / "server-cert.pem").read_text())
    assert new != old
    b.sighup_and_wait("SIGHUP: peer API TLS credentials reloaded")
    assert peer_cert_seen(rig) == new
    # A broken certificate: logged, and new handshakes still get the good one.
    good_pem = (pki_b / "server-cert.pem").read_text()
    (pki_b / "server-cert.pem").write_text("not a certificate\n")
    try:
        b.sighup_and_wait("SIGHUP: peer API keeps the TLS credentials in use")
        assert peer_cert_seen(rig) == new
    finally:
        (pki_b / "server-cert.pem").write_text(good_pem)
    # Copies go on working with the renewed certificate.
    a.create_collection("cf", "vm", location="far")
    sha = cut_point(rig, "renewed", change_at=3 * MiB)
    op = a.wait_operation(start_copy(a, "cf", "renewed", ("c", "renewed")), timeout=60)
    assert op["status"] == "Succeeded", (op, a.log(), b.log())
    assert sha_of_restore(b, "cf", "renewed", "rrenewed") == sha


def test_peers_deadline_seconds_bounds_a_copy_to_an_unreachable_peer(rig):
    """peers.deadline_seconds: 2 on A, the link down: the copy ends Failed
    (PeerUnreachable) after ~2 s of retries, not the default 120 s."""
    a = rig["a"]
    original = a.config_text
    listen = f'peers:\n  listen: "{A_IP}:10443"\n'
    assert listen in original
    a.stop()
    a.config_text = original.replace(listen, listen + "  deadline_seconds: 2\n")
    a.start()
    try:
        a.create_collection("cf", "vm", location="far")
        cut_point(rig, "dl1", change_at=11 * MiB)
        sh("ip", "-n", rig["ns_a"], "link", "set", rig["if_a"], "down")
        t0 = time.monotonic()
        done = a.wait_operation(start_copy(a, "cf", "dl1", ("c", "dl1")), timeout=30)
        took = time.monotonic() - t0
    finally:
        sh("ip", "-n", rig["ns_a"], "link", "set", rig["if_a"], "up")
        a.stop()
        a.config_text = original
        a.start()
    assert done["status"] == "Failed", done
    assert "gave up after 2 s" in json.dumps(done), done
    assert took < 20, took
